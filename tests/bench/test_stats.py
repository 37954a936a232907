"""Statistics, gap folding and Prometheus parsing of the benchmark harness, on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark import prom
from benchmark.runner import new_record, on_chunk
from benchmark.stats import cdf, is_rejected, meets_slo, percentile, summarize, summarize_by_model


def test_percentile_by_hand():
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4; position (n-1)q/100
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 1000):
        xs = rng.lognormal(size=n).tolist()
        for q in (1, 50, 90, 99, 99.9):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def rec(model, ok=True, ttft=0.1, gaps=(), status=200, prompt=10):
    return {"model": model, "ok": ok, "ttft": ttft, "gaps": list(gaps), "status": status,
            "prompt_tokens": prompt, "completion_tokens": len(gaps) + 1 if ok else 0}


def test_summarize_counts_slo_and_contexts():
    recs = [rec("a", gaps=[0.01, 0.02, 0.03]), rec("a", ttft=3.0, gaps=[0.01]),
            rec("b", gaps=[0.5, 0.01], prompt=100),
            rec("b", ok=False, ttft=None, status=503), rec("b", ok=False, ttft=None, status=500)]
    s = summarize(recs, duration=2.0, slo_ttft=1.0, slo_tbt=0.1)
    assert (s["sent"], s["completed"], s["errors"], s["rejected"], s["failed"]) == (5, 3, 2, 1, 1)
    assert s["goodput_requests"] == 1  # the second breaks TTFT, the third TBT
    assert s["goodput_rps"] == pytest.approx(0.5)
    assert s["longest_context"] == 103
    assert s["tbt_count"] == 6
    assert s["tbt_p50"] == pytest.approx(percentile([0.01, 0.02, 0.03, 0.01, 0.5, 0.01], 50))
    assert s["ttft_p99"] == pytest.approx(percentile([0.1, 3.0, 0.1], 99))
    by = summarize_by_model(recs, 2.0)
    assert by["a"]["sent"] == 2 and by["b"]["errors"] == 2 and by["b"]["goodput_requests"] == 1


def test_slo_and_rejection_rules():
    assert meets_slo(rec("a", gaps=[0.01]), None, None)
    assert not meets_slo(rec("a", ok=False), None, None)
    assert meets_slo(rec("a", gaps=[]), 1.0, 0.001)  # a one-token answer has no gaps
    assert is_rejected(rec("a", ok=False, status=503))
    assert not is_rejected(rec("a", ok=False, status=500))


def test_cdf():
    xs, ys = cdf([3.0, 1.0, 2.0, 2.0])
    assert xs == [1.0, 2.0, 2.0, 3.0]
    assert ys == [0.25, 0.5, 0.75, 1.0]


def test_on_chunk_gaps_from_completion_token_deltas():
    r = new_record({"id": 0, "model": "a", "t": 0.0, "prompt_len": 5, "output_len": 6})
    r["sent_at"] = 10.0
    st = {"last": None}
    on_chunk(r, {"completion_tokens": 2, "prompt_tokens": 5}, 10.5, st)  # 2 in the first chunk
    on_chunk(r, {"completion_tokens": 2}, 10.6, st)  # nothing new: no gap
    on_chunk(r, {"completion_tokens": 3}, 10.7, st)
    on_chunk(r, {"completion_tokens": 6, "finish_reason": {"type": "length"}}, 11.0, st)
    assert r["ttft"] == pytest.approx(0.5)
    assert r["gaps"] == pytest.approx([0.0, 0.2, 0.1, 0.1, 0.1])
    assert len(r["gaps"]) == r["completion_tokens"] - 1
    assert r["prompt_tokens"] == 5 and r["finish_reason"] == {"type": "length"}


def test_prometheus_parse():
    text = """# HELP x
sglang_crosspool:kv_pool_pages_used{pool="kv"} 12.0
sglang_crosspool:kv_pages_used{model_name="m00"} 7.0
sglang_crosspool:kv_pages_used{model_name="m01"} 5.0
sglang:generation_tokens_total{model_name="m00"} 1e3
sglang:num_retractions 2.0
"""
    s = prom.parse(text)
    assert prom.by_label(s, prom.MODEL_PAGES, "model_name") == {"m00": 7.0, "m01": 5.0}
    k = prom.kv_sample(s, 1.5)
    assert k["pool_used"] == {"kv": 12.0} and k["retractions"] == 2.0
    assert prom.by_label(s, prom.GEN_TOKENS, "model_name") == {"m00": 1000.0}
