"""benchmark/crossing_bench.py on CPU: every CPU transport against an echo FFN server, GPU-only
transports skipped with a note, the JSON it writes (the GPU run uses the same code)."""

from __future__ import annotations

import json

import pytest

from benchmark import crossing_bench


def test_crossing_bench_on_cpu(tmp_path, capsys):
    pytest.importorskip("zmq")
    out = tmp_path / "crossing.json"
    result = crossing_bench.main([
        "--device", "cpu", "--transports", "shm,dist,local,cuda-ipc,nccl", "--tokens", "1,4",
        "--hidden", "64,32", "--iters", "5", "--warmup", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["device"] == "cpu" and result["torch"] and not result["errors"]
    assert set(result["skipped"]) == {"cuda-ipc", "nccl"}
    rows = {(r["transport"], r["tokens"], r["hidden"]) for r in result["crossings"]}
    assert rows == {(t, n, h) for t in ("shm", "dist", "local") for n in (1, 4) for h in (64, 32)}
    assert all(0 < r["median_us"] <= r["p90_us"] and r["stream_us"] > 0
               for r in result["crossings"])
    assert len(result["copies"]) == 4
    assert "skipped nccl" in capsys.readouterr().out
