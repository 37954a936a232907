"""The decode-graph path over the p2p crossing on CPU: the static buffers split into two
pipelined micro-batches, each replay announced to the FFN servers with its plan, give the
tokens of eager monolithic decoding. (On CPU nothing is captured: `capture=False` runs the
graph's body as is, which is what the servers' plans and the slots are checked against.)"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from sglang_crosspool import Engine  # noqa: E402
from sglang_crosspool.engine.cuda_graph import DecodeGraphs  # noqa: E402
from sglang_crosspool.transport import messages as m  # noqa: E402
from sglang_crosspool.transport.links import P2PLink  # noqa: E402

PROMPTS = [[3, 4, 5, 6, 7], list(range(40, 57)), [9], [11, 12]]
GREEDY = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}


def test_pipelined_static_decode_over_p2p_matches_eager_monolithic(tiny_models, monkeypatch):
    path = tiny_models["qwen3_moe"]
    options = dict(attention_backend="triton", chunked_prefill_size=32, max_running_requests=4)
    engine = Engine(path, **options)
    try:
        want = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS,
                                                         sampling_params=GREEDY)]
    finally:
        engine.shutdown()

    sent = []
    original = P2PLink.step
    monkeypatch.setattr(P2PLink, "step", lambda self, msg: (sent.append(msg),
                                                            original(self, msg))[1])
    engine = Engine(path, pool_mode="crosspool", ffn_transport="p2p", ffn_servers=2,
                    pipeline_microbatches=2, **options)
    try:
        core = engine.core
        name = core.config.model_names[0]
        graphs = core.graphs[name] = DecodeGraphs(core.runners[name], core.kv_pool, [1, 4],
                                                  max_blocks=8, capture=False, microbatches=2)
        assert graphs.microbatches == 2
        assert graphs.graphs[4].plan == ((name, 2), (name, 2))
        assert graphs.graphs[1].plan == ((name, 1),)
        got = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS,
                                                        sampling_params=GREEDY)]
        assert graphs.runs >= GREEDY["max_new_tokens"] - 1
        # Decode steps were announced with the bucket's two halves, once per server.
        plans = [msg.plan for msg in sent if isinstance(msg, m.Step)]
        assert plans.count(((name, 2), (name, 2))) >= 2 * (GREEDY["max_new_tokens"] - 1)
        assert core.stats()["kv"]["used_pages"] == 0  # pages left are the prefix cache's
    finally:
        engine.shutdown()
    assert got == want
