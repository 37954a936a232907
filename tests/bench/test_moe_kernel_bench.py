"""benchmark/moe_kernel_bench.py on CPU (tiny shape, Triton interpreter): every batch has a
baseline row and a small-batch row that agrees with it, and the JSON names a tuned config."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from benchmark import moe_kernel_bench


def test_cpu_run_writes_rows_and_configs(tmp_path):
    out = tmp_path / "moe.json"
    rc = moe_kernel_bench.main(["--device", "cpu", "--out", str(out), "--batches", "1,8",
                                "--calls", "2", "--layers", "2", "--budget-s", "0",
                                "--write-configs", str(tmp_path / "configs")])
    data = json.loads(out.read_text())
    assert rc == 0 and data["errors"] == []
    assert [(s["shape"], s["batch"]) for s in data["summary"]] == [("tiny", 1), ("tiny", 8)]
    for batch in (1, 8):
        rows = [r for r in data["rows"] if r["batch"] == batch]
        assert {r["path"] for r in rows} == {"fused_moe", "small"}
        small = next(r for r in rows if r["path"] == "small")
        assert small["max_abs_diff_vs_baseline"] < 1e-4 and small["us"] > 0
        assert any("skipped" in r for r in rows)  # the sweep stops at the budget
    name = "moe_small_batch_E=8_N=48_H=64_device=cpu_dtype=float32.json"
    assert set(data["tuned_configs"]) == {name}
    written = json.loads((tmp_path / "configs" / name).read_text())
    assert set(written) == {"1", "8"} and written["1"]["BLOCK_N"] == 16
