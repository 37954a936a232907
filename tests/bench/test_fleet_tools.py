"""The pieces of benchmark/fleet_gpu_run.py and benchmark/crosscheck.py that run on any
machine: a trace mapped onto a fleet (by popularity, clamped to each model's context, names
kept when they are the fleet's), the per-GPU comparison with the plan, and the cross-check's
ratios against sglang.bench_serving's figures."""

from __future__ import annotations

import json

from benchmark import crosscheck, fleet_gpu_run


def fleet(tmp_path, contexts: dict[str, int]) -> dict:
    paths = {}
    for name, ctx in contexts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps({"max_position_embeddings": ctx}))
        paths[name] = tmp_path / name
    return paths


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def rec(i, model, prompt, output=10):
    return {"id": i, "t": 0.0, "model": model, "prompt_len": prompt, "output_len": output,
            "long": False, "prompt_seed": i}


def test_a_trace_maps_onto_the_fleet_by_popularity_and_context(tmp_path):
    paths = fleet(tmp_path, {"big": 40960, "small": 4096})
    src = write(tmp_path / "t.jsonl", [rec(0, "m07", 100), rec(1, "m03", 30000),
                                        rec(2, "m03", 100), rec(3, "m03", 200)])
    out = fleet_gpu_run.mapped_trace(src, tmp_path / "mapped.jsonl", paths)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    # m03, the most requested, becomes the fleet's first model; m07 the second.
    assert [r["model"] for r in got] == ["small", "big", "big", "big"]
    assert got[1]["prompt_len"] == 30000  # fits big's context
    kept = write(tmp_path / "own.jsonl", [rec(0, "small", 9000, 100)])
    mine = json.loads(fleet_gpu_run.mapped_trace(kept, tmp_path / "own-mapped.jsonl", paths)
                      .read_text())
    assert mine["model"] == "small"  # names of the fleet are kept
    assert mine["prompt_len"] + mine["output_len"] <= 4095  # clamped to small's context


def test_the_gpu_rows_compare_reported_and_device_bytes_with_the_plan():
    report = {"devices": [{"index": 0, "weights_ratio": 1.0,
                           "planned": {"weights_bytes": 1000, "kv_pages": 5, "role": "kv",
                                       "models": ["a"]},
                           "reported": {"weights_bytes": 1000, "kv_pages": 5,
                                        "device_memory": {"kv_mapped_bytes": 200}}}]}
    row = fleet_gpu_run.compare(report, used=[1500], idle=[250])[0]
    assert row["device_added_bytes"] == 1250
    assert row["device_added_less_kv_ratio"] == (1250 - 200) / 1000
    assert row["planned_kv_pages"] == row["reported_kv_pages"] == 5


def test_crosscheck_ratios_are_ours_over_bench_serving():
    ours = {"records": [{"ok": True, "ttft": 0.1, "gaps": [0.01, 0.03]},
                        {"ok": True, "ttft": 0.3, "gaps": [0.02]},
                        {"ok": False, "ttft": None, "gaps": []}]}
    theirs = {"median_ttft_ms": 200.0, "mean_ttft_ms": 100.0, "median_itl_ms": 20.0,
              "mean_itl_ms": 25.0, "completed": 2}
    got = crosscheck.compare(theirs, ours)
    assert got["ours"]["median_ttft_ms"] == 200.0 and got["ours"]["mean_tbt_ms"] == 20.0
    assert got["ratio_ours_over_bench_serving"]["median_ttft_ms"] == 1.0
    assert got["ratio_ours_over_bench_serving"]["mean_ttft_ms"] == 2.0
    assert got["within_10_percent"] == {"median_ttft_ms": True, "mean_ttft_ms": False,
                                        "median_tbt_ms": True, "mean_tbt_ms": False}
    assert got["completed"] == {"ours": 2, "bench_serving": 2}
