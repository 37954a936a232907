"""benchmark/prefix_cache_bench.py end to end on CPU, at a toy size: two real servers, the
cached one prefills fewer tokens and reports them, the JSON it writes."""

from __future__ import annotations

import json

import pytest

from benchmark import prefix_cache_bench


def test_prefix_cache_bench_on_cpu(tmp_path):
    pytest.importorskip("fastapi")
    out = tmp_path / "bench.json"
    results = prefix_cache_bench.main([
        "--archs", "qwen3_moe", "--size", "tiny", "--conversations", "2", "--turns", "2",
        "--system-words", "40", "--user-words", "4", "--max-tokens", "3", "--out", str(out),
        "--server-args=--skip-server-warmup"])
    assert json.loads(out.read_text())["results"] == results
    cache, cold = results["radix_cache"], results["no_cache"]
    assert cache["requests"] == cold["requests"] == 4
    assert cache["prompt_tokens"] == cold["prompt_tokens"]  # same conversations, same answers
    assert cold["prefill_tokens"] == cold["prompt_tokens"] and cold["cached_pages_at_end"] == 0
    assert 0 < cache["prefill_tokens"] < cold["prefill_tokens"]
    assert cache["cached_tokens"] % 32 == 0 and cache["cached_pages_at_end"] > 0
