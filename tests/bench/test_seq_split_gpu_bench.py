"""benchmark/seq_split_gpu_bench.py runs end to end on CPU (tiny shape, gloo, Triton
interpreter): both modes measure, the split holds twice the tokens, every logit is finite."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from benchmark import seq_split_gpu_bench


def test_cpu_run_measures_both_modes(tmp_path):
    out = tmp_path / "seq.json"
    rc = seq_split_gpu_bench.main(["--device", "cpu", "--out", str(out), "--iters", "1",
                                   "--ctxs", "40", "--no-serve-longest"])
    data = json.loads(out.read_text())
    assert rc == 0 and data["failed_sections"] == [], data["failed_sections"]
    summary = data["summary"]
    assert summary["seq"]["pool_tokens"] == 2 * summary["single"]["pool_tokens"]
    for mode in ("single", "seq"):
        for rank in data["sections"][f"measure_{mode}"]["per_rank"]:
            assert rank["decode"]["40"]["fits"] and rank["decode"]["40"]["finite_logits"]
    assert data["sections"]["measure_seq"]["per_rank"][1]["backend"] == \
        "SeqSplitLatentAttention"
