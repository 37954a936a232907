"""benchmark/mla_gpu_check.py runs end to end on CPU (tiny shape, Triton interpreter): every
section succeeds and the JSON holds the figures the GPU run will fill."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from benchmark import mla_gpu_check  # noqa: E402


def test_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "mla.json"
    rc = mla_gpu_check.main(["--device", "cpu", "--out", str(out), "--iters", "1",
                             "--ctxs", "40,70"])
    data = json.loads(out.read_text())
    assert rc == 0 and data["failed_sections"] == [], data["failed_sections"]
    sections = data["sections"]
    for ctx in ("40", "70"):
        assert sections["kernel_accuracy"]["vs_reference"][ctx]["max_abs_diff"] < 1e-4
        assert sections["kernel_timing"]["per_ctx"][ctx]["ms"] > 0
        assert "eager" in sections["engine_decode_step"][ctx]
    assert sections["engine_build"]["mla_backend"] == "TritonLatentAttention"
    assert sections["absorption"]["max_abs_diff"] < 1e-4
    assert sections["engine_decode_step"]["40"]["triton_vs_torch_path_max_abs_logit_diff"] < 1e-4
    assert sections["engine_generate"]["repeatable"]
    assert sections["engine_generate"]["kv_used_pages_after"] == 0
    assert all("error" not in row for row in sections["kernel_config_sweep"]["rows"])
