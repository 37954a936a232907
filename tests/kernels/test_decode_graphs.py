"""The decode-graph path (static buffers, padded buckets) gives the eager path's tokens.

On CPU nothing is captured: `DecodeGraphs(capture=False)` runs the same padded static buffers
eagerly, which is what this checks (padding rows, the packed upload, bucket choice).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from sglang_crosspool import Engine  # noqa: E402
from sglang_crosspool.engine.cuda_graph import DecodeGraphs, graph_buckets  # noqa: E402

PROMPTS = [[3, 4, 5, 6, 7], list(range(40, 77)), [9]]
GREEDY = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_buckets(96)[-4:] == [56, 64, 80, 96]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_static_decode_path_matches_eager(tiny_models, arch):
    outs = {}
    for static in (False, True):
        engine = Engine(tiny_models[arch], attention_backend="triton", chunked_prefill_size=16,
                        max_running_requests=4)
        core = engine.core
        name = core.config.model_names[0]
        if static:
            assert not core.graphs  # nothing is captured on CPU
            core.graphs[name] = DecodeGraphs(core.runners[name], core.kv_pool, [1, 4],
                                             max_blocks=8, capture=False)
            assert core.kv_pool.used_pages == 0  # the capture block was given back
        outs[static] = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS,
                                                                sampling_params=GREEDY)]
        if static:
            # 3 running requests go through the bucket of 4 (one padding row).
            assert core.graphs[name].runs >= GREEDY["max_new_tokens"] - 1
        assert core.stats()["kv"]["used_pages"] == 0  # pages left are the prefix cache's
    assert outs[True] == outs[False]
