"""benchmark/tp_gpu_bench.py runs end to end on CPU (tiny checkpoint, gloo): TP 1, TP 2 and
EP 2 each measure every batch, the logits are finite and a TP rank holds less than TP 1; under
the Triton interpreter the +graph modes run the graphs' static path (no capture on CPU)."""

from __future__ import annotations

import json
import os

import pytest

from benchmark import tp_gpu_bench


def test_cpu_run_measures_every_mode(tmp_path):
    out = tmp_path / "tp.json"
    rc = tp_gpu_bench.main(["--device", "cpu", "--out", str(out), "--batches", "1,3",
                            "--iters", "1", "--modes", "tp1,tp2,ep2,tp2+symm"])
    data = json.loads(out.read_text())
    assert rc == 0 and data["failed"] == [], data["failed"]
    table = data["summary"]["decode_step_ms_by_batch"]
    assert set(table) == {"1", "3"} and all(set(row) == {"tp1", "tp2", "ep2", "tp2+symm"}
                                            for row in table.values())
    # No symmetric memory on CPU: +symm falls back to the group's own all-reduce.
    assert [r["symm_all_reduce"] for r in data["modes"]["tp2+symm"]["per_rank"]] == [False] * 2
    for mode in data["modes"].values():
        for rank in mode["per_rank"]:
            assert all(row["finite"] for row in rank["batches"].values())
    weights = data["summary"]["weight_bytes_per_rank"]
    assert len(weights["tp2"]) == 2 and max(weights["tp2"]) < weights["tp1"][0]
    assert data["modes"]["ep2"]["per_rank"][1]["batches"]["3"]["all_reduce_us"] > 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton backend on CPU needs TRITON_INTERPRET=1")
def test_cpu_graph_modes_run_the_static_path(tmp_path):
    out = tmp_path / "tp.json"
    rc = tp_gpu_bench.main(["--device", "cpu", "--out", str(out), "--batches", "2",
                            "--iters", "1", "--modes", "ep2+graph",
                            "--attention-backend", "triton"])
    data = json.loads(out.read_text())
    assert rc == 0 and data["failed"] == [], data["failed"]
    assert set(data["summary"]["decode_step_ms_by_batch"]["2"]) == {"ep2+graph"}
    assert all(r["batches"]["2"]["finite"] for r in data["modes"]["ep2+graph"]["per_rank"])
    assert data["modes"]["ep2+graph"]["per_rank"][0]["batches"]["2"]["graph_vs_eager_max_abs"] \
        < 1e-3
