"""The engine with the Triton attention backend gives the torch backend's greedy tokens."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from sglang_crosspool import Engine  # noqa: E402

PROMPTS = [[3, 4, 5, 6, 7], list(range(40, 77)), [9]]
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_triton_backend_matches_torch_backend(tiny_models, arch):
    outs = {}
    for backend in ("torch", "triton"):
        # 16-token chunks: batches mix prefill chunks with decodes, then decode-only steps.
        engine = Engine(tiny_models[arch], attention_backend=backend, chunked_prefill_size=16)
        outs[backend] = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS,
                                                                 sampling_params=GREEDY)]
        assert engine.stats()["kv"]["used_pages"] == 0
    assert outs["triton"] == outs["torch"]
