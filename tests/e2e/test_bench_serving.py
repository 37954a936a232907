"""`python -m sglang.bench_serving --backend sglang` (the real one) against one model of the
server, offline: `--dataset-name random-ids` needs no download, and the tokenizer is the
checkpoint folder's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang.bench_serving")


@pytest.mark.parametrize("stream", [True, False])
def test_bench_serving_sglang_backend(server, tmp_path, stream):
    before = server.internal_state()
    out_file = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
           "--base-url", f"{server.url}/models/qwen-a", "--model", server.paths["qwen-a"],
           "--dataset-name", "random-ids", "--num-prompts", "8", "--random-input-len", "32",
           "--random-output-len", "8", "--random-range-ratio", "1", "--request-rate", "inf",
           "--max-concurrency", "4", "--warmup-requests", "1", "--seed", "1",
           "--output-file", str(out_file), "--disable-tqdm"]
    if not stream:
        cmd.append("--disable-stream")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "Serving Benchmark Result" in log
    assert "Successful requests:                     8" in log
    result = json.loads(out_file.read_text().splitlines()[-1])
    assert result["completed"] == 8
    assert result["total_output_tokens"] == 8 * 8  # ignore_eos: every request runs to its end
    assert result["mean_ttft_ms"] > 0 and result["mean_e2e_latency_ms"] > 0
    if stream:
        assert result["mean_itl_ms"] > 0
    after = server.wait_idle()
    assert after["kv"]["used_pages"] == 0
    assert before["scheduler"]["retractions"] <= after["scheduler"]["retractions"]
