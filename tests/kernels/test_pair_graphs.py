"""Two models' decode steps pipelined in one (pair) graph over the p2p crossing, on CPU: each
step announces one plan with both models' batches, padded to a shared bucket, and every
request gets the tokens of eager monolithic decoding. (On CPU nothing is captured:
`capture=False` runs the pair graph's body over the static buffers as is.)"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from sglang_crosspool.config import EngineConfig  # noqa: E402
from sglang_crosspool.engine.core import EngineCore  # noqa: E402
from sglang_crosspool.engine.cuda_graph import DecodeGraphs  # noqa: E402
from sglang_crosspool.engine.pair_graphs import PairGraphs  # noqa: E402
from sglang_crosspool.engine.request import EngineRequest  # noqa: E402
from sglang_crosspool.engine.sampling_params import SamplingParams  # noqa: E402
from sglang_crosspool.transport import messages as m  # noqa: E402
from sglang_crosspool.transport.links import P2PLink  # noqa: E402

# Three requests of one model and one of the other: their batches pad to buckets 4 and 1,
# and the pair runs both in bucket 4.
PROMPTS = {"a": [[3, 4, 5, 6, 7], list(range(40, 57)), [9]], "b": [[11, 12]]}
NEW_TOKENS = 5


def run(config, attach=None) -> dict[tuple[str, int], list[int]]:
    core = EngineCore(config)
    try:
        if attach is not None:
            attach(core)
        params = SamplingParams.from_dict({"max_new_tokens": NEW_TOKENS, "temperature": 0,
                                           "ignore_eos": True})
        states = {(model, i): core.add_request(EngineRequest(f"{model}{i}", model, ids, params))
                  for model, prompts in PROMPTS.items() for i, ids in enumerate(prompts)}
        while not all(s.finished for s in states.values()):
            core.step()
        return {key: s.output_ids for key, s in states.items()}
    finally:
        core.shutdown()


def test_two_models_in_one_pipelined_step_match_eager_monolithic(tiny_models, monkeypatch):
    paths = [tiny_models["qwen3_moe"], tiny_models["olmoe"]]  # 2 and 3 layers: uneven
    options = dict(served_model_name=["a", "b"], attention_backend="triton",
                   chunked_prefill_size=64, max_running_requests=4)
    want = run(EngineConfig.build(paths, **options))

    sent = []
    original = P2PLink.step
    monkeypatch.setattr(P2PLink, "step", lambda self, msg: (sent.append(msg),
                                                            original(self, msg))[1])
    config = EngineConfig.build(paths, pool_mode="crosspool", ffn_transport="p2p",
                                ffn_servers=2, pipeline_models=True, **options)
    pairs = []

    def attach(core):
        for name in ("a", "b"):
            core.graphs[name] = DecodeGraphs(core.runners[name], core.kv_pool, [1, 4],
                                             max_blocks=8, capture=False)
        pair = PairGraphs(core.graphs["a"], core.graphs["b"], [1, 4], capture=False)
        core.pair_graphs[("a", "b")] = pair
        pairs.append(pair)

    got = run(config, attach)
    assert got == want
    pair = pairs[0]
    assert pair.graphs[4].plan == (("a", 4), ("b", 4))
    assert pair.runs >= NEW_TOKENS - 1  # the decode steps ran as pairs
    plans = [msg.plan for msg in sent if isinstance(msg, m.Step)]
    assert plans.count((("a", 4), ("b", 4))) >= 2 * (NEW_TOKENS - 1)  # once per server


def test_pair_buckets_and_fit(tiny_models):
    config = EngineConfig.build([tiny_models["qwen3_moe"], tiny_models["olmoe"]],
                                served_model_name=["a", "b"], attention_backend="triton",
                                pool_mode="crosspool", ffn_transport="p2p",
                                pipeline_models=True)
    core = EngineCore(config)
    try:
        first = DecodeGraphs(core.runners["a"], core.kv_pool, [1, 2, 8], max_blocks=4,
                             capture=False)
        second = DecodeGraphs(core.runners["b"], core.kv_pool, [1, 2], max_blocks=4,
                              capture=False)
        pair = PairGraphs(first, second, [1, 2, 8], capture=False)
        assert sorted(pair.graphs) == [1, 2]  # no bucket past the smaller static buffers
        assert pair.max_bs == 2
    finally:
        core.shutdown()
