"""The small CPU configuration of the pool-mode experiment: does the harness measure correctly?

Four tiny models, a 40-request bursty trace clamped to their 512-token context (plus one
request over that context, which the server must refuse with 400), time-scaled so each mode
takes seconds and replayed again at twice the rate (the load sweep), run on static, monolithic and crosspool (FFN servers over shm) with a KV budget
small enough to force retractions. The assertions are about accounting, not speed: every request
completed or recorded as an error, token counts equal to the server's own counters, k-1 gaps for
k tokens, summaries consistent with the records, the KV timeline sampled, the plots written.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise

import pytest

from benchmark import experiment, trace
from benchmark.stats import percentile

pytest.importorskip("fastapi")
pytest.importorskip("aiohttp")

TRACE_FLAGS = ["--models", "4", "--requests", "40", "--rate", "2", "--seed", "7",
               "--max-context", "256", "--max-output", "24"]
MODES = ["static", "monolithic", "crosspool"]
TOO_LONG = {"id": 40, "model": "m01", "prompt_len": 600, "output_len": 4, "long": True,
            "prompt_seed": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    recs = trace.main(["--out", str(root / "trace.jsonl"), *TRACE_FLAGS])
    recs.append({**TOO_LONG, "t": recs[len(recs) // 2]["t"]})
    recs.sort(key=lambda r: r["t"])
    trace.write_trace(recs, root / "trace.jsonl")
    results = experiment.main([
        "--trace", str(root / "trace.jsonl"), "--tiny", "--modes", ",".join(MODES),
        "--time-scale", "0.4", "--loads", "1,2", "--slo-ttft", "5", "--slo-tbt", "1",
        "--poll-interval", "0.1", "--server-args", "--max-total-tokens 1024",
        "--mode-args", "crosspool=--ffn-servers 1 --ffn-transport shm",
        "--out", str(root / "out")])
    return root, recs, results


def test_trace_reproducible(run, tmp_path):
    _, recs, _ = run
    again = trace.main(["--out", str(tmp_path / "again.jsonl"), *TRACE_FLAGS])
    assert again == [r for r in recs if r["id"] != TOO_LONG["id"]]


@pytest.mark.parametrize("mode", MODES)
def test_every_request_accounted_for(run, mode):
    _, recs, results = run
    r = results["runs"][mode]
    assert "error" not in r, r.get("error")
    assert sorted(x["id"] for x in r["records"]) == sorted(x["id"] for x in recs)
    s = r["overall"]
    assert s["sent"] == len(recs) == 41
    assert s["completed"] + s["errors"] == s["sent"]
    assert sum(m["sent"] for m in r["per_model"].values()) == s["sent"]
    bad = [x for x in r["records"] if not x["ok"]]
    assert [x["id"] for x in bad] == [TOO_LONG["id"]], bad
    assert bad[0]["status"] == 400 and "context length" in bad[0]["error"]
    assert s["rejected"] == 1 and s["failed"] == 0
    assert r["server_exit_code"] in (0, -15)


@pytest.mark.parametrize("mode", MODES)
def test_tokens_match_the_server(run, mode):
    _, _, results = run
    r = results["runs"][mode]
    gen, prompt = Counter(), Counter()
    for x in r["records"]:
        gen[x["model"]] += x["completion_tokens"]
        if x["ok"]:
            prompt[x["model"]] += x["prompt_tokens"]
            assert x["completion_tokens"] == x["output_len"]  # ignore_eos: exactly as asked
            assert x["prompt_tokens"] == x["prompt_len"]
            assert len(x["gaps"]) == x["completion_tokens"] - 1
            assert x["ttft"] is not None and x["ttft"] > 0
            assert all(g >= 0 for g in x["gaps"])
    counters = r["server_counters"]
    assert {m: v for m, v in counters["generation_tokens"].items() if v} == dict(gen)
    assert {m: v for m, v in counters["prompt_tokens"].items() if v} == dict(prompt)


@pytest.mark.parametrize("mode", MODES)
def test_summaries_follow_the_records(run, mode):
    _, _, results = run
    r = results["runs"][mode]
    s = r["overall"]
    gaps = [g for x in r["records"] for g in x["gaps"]]
    ttfts = [x["ttft"] for x in r["records"] if x["ttft"] is not None]
    assert s["tbt_count"] == len(gaps)
    assert s["tbt_p99"] == pytest.approx(percentile(gaps, 99))
    assert s["ttft_p50"] == pytest.approx(percentile(ttfts, 50))
    assert s["longest_context"] == max(x["prompt_tokens"] + x["completion_tokens"]
                                       for x in r["records"] if x["ok"])
    assert 0 <= s["goodput_requests"] <= s["completed"]
    assert s["preempted"] >= 0
    tl = r["kv_timeline"]
    assert len(tl) >= 3 and all(b["t"] >= a["t"] for a, b in pairwise(tl))
    used = [sum(k["pool_used"].values()) for k in tl]
    total = sum(tl[0]["pool_total"].values())
    assert 0 < max(used) <= total


def test_results_and_plots_written(run):
    root, _, results = run
    out = root / "out"
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["runs"]) == MODES
    assert saved["command"].startswith("python -m benchmark.experiment")
    for name in ("tbt_cdf.png", "kv_pages.png", "p99_tbt.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert (out / "p99_tbt_vs_load.png").read_bytes()[:4] == b"\x89PNG"
    assert len(results["plots"]) == 4


@pytest.mark.parametrize("mode", MODES)
def test_load_sweep(run, mode):
    _, recs, results = run
    sweep = results["load_sweep"][mode]
    assert [p["load"] for p in sweep] == [1.0, 2.0]
    assert sweep[0]["overall"] == results["runs"][mode]["overall"]
    for p in sweep:
        s = p["overall"]
        assert s["sent"] == len(recs) and s["completed"] + s["errors"] == s["sent"]
        assert s["completed"] == len(recs) - 1
