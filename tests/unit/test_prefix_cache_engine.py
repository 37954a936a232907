"""The prefix cache in the engine: the same greedy outputs as without it (four architectures,
chunked prefill across the cached boundary, logprobs), cached_tokens, no prefix shared between
models, eviction instead of retraction under a tiny page budget, /flush_cache's core call."""

from __future__ import annotations

import pytest

from sglang_crosspool import Engine
from sglang_crosspool.engine.request import EngineRequest
from sglang_crosspool.engine.sampling_params import SamplingParams
from sglang_crosspool.testing.checkpoints import ARCHS

# 1 KiB pages: the tiny models' 128-byte K slots give 8-token blocks.
SMALL = {"kv_page_bytes": 1024, "chunked_prefill_size": 12}
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
SYSTEM = list(range(40, 80))  # a shared 40-token "system prompt": 5 blocks


def conversation(engine: Engine) -> list[dict]:
    """Turn one, then turn two (turn one + its answer + more) with a sibling sharing only
    SYSTEM, run together."""
    first = SYSTEM + [3, 4, 5]
    out1 = engine.generate(input_ids=first, sampling_params=GREEDY)
    second = first + out1["output_ids"] + [7, 8, 9]
    sibling = SYSTEM + list(range(200, 215))
    return [out1] + engine.generate(input_ids=[second, sibling], sampling_params=GREEDY)


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_with_the_cache_equal_outputs_without(tiny_models, arch):
    cold = conversation(Engine(tiny_models[arch], disable_radix_cache=True, **SMALL))
    engine = Engine(tiny_models[arch], **SMALL)
    warm = conversation(engine)
    assert [o["output_ids"] for o in warm] == [o["output_ids"] for o in cold]
    assert [o["meta_info"]["cached_tokens"] for o in cold] == [0, 0, 0]
    # Turn one computed 43 + 11 tokens (its last token has no KV yet): 6 blocks, 48 tokens.
    # Turn two starts at 48 and prefills 10 more in chunks of 12 shared with its sibling,
    # which starts after SYSTEM.
    assert [o["meta_info"]["cached_tokens"] for o in warm] == [0, 48, 40]
    kv = engine.stats()["kv"]
    assert kv["used_pages"] == 0 and kv["mapped_pages"] == kv["cached_pages"] > 0


def test_a_prefix_cached_by_one_model_is_never_used_by_another(tiny_models):
    # One checkpoint served twice: same tokens, same block size, yet separate caches.
    engine = Engine([tiny_models["olmoe"]] * 2, served_model_name=["a", "b"], **SMALL)
    prompt = SYSTEM + [1, 2]
    a1 = engine.generate(input_ids=prompt, sampling_params=GREEDY, model="a")
    b1 = engine.generate(input_ids=prompt, sampling_params=GREEDY, model="b")
    a2 = engine.generate(input_ids=prompt, sampling_params=GREEDY, model="a")
    assert [o["meta_info"]["cached_tokens"] for o in (a1, b1, a2)] == [0, 0, 40]
    assert a1["output_ids"] == b1["output_ids"] == a2["output_ids"]
    models = engine.stats()["kv"]["models"]
    assert models["a"]["cached_pages"] == models["b"]["cached_pages"] > 0


def test_logprobs_are_the_same_and_their_positions_are_computed(tiny_models):
    cold = Engine(tiny_models["qwen2_moe"], disable_radix_cache=True, **SMALL)
    warm = Engine(tiny_models["qwen2_moe"], **SMALL)
    prompt = SYSTEM + [9, 9, 9]
    warm.generate(input_ids=prompt, sampling_params=GREEDY)
    for start in (0, 30, -1):
        kw = dict(input_ids=prompt, sampling_params=GREEDY, return_logprob=True,
                  logprob_start_len=start)
        want, got = cold.generate(**kw), warm.generate(**kw)
        assert got["output_ids"] == want["output_ids"]
        for key in ("input_token_logprobs", "output_token_logprobs"):
            w, g = want["meta_info"][key], got["meta_info"][key]
            assert [e[1] for e in g] == [e[1] for e in w]
            assert [e[0] for e in g] == pytest.approx([e[0] for e in w], abs=1e-4)
        # Rows from logprob_start_len on are computed: the cache serves whole blocks before.
        limit = len(prompt) - 2 if start == -1 else max(start, 1) - 1
        assert got["meta_info"]["cached_tokens"] == limit // 8 * 8


def test_eviction_under_a_tiny_budget_serves_without_retraction(tiny_models):
    path = tiny_models["qwen3_moe"]
    probe = Engine(path, **SMALL)
    per_block = probe.core.kv_pool.pages_per_block(probe.models[0])
    # 12 blocks. Every request needs 7 at its longest; finished ones leave 6 cached.
    options = dict(SMALL, kv_pages=12 * per_block)
    prompts = [list(range(100 * i + 1, 100 * i + 45)) for i in range(1, 5)]
    cold = Engine(path, disable_radix_cache=True, **options)
    warm = Engine(path, **options)
    want = [cold.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    got = [warm.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    # Two requests at once: 14 blocks without the cache would not fit 12 with 6 cached.
    pair = [SYSTEM + [1], SYSTEM + [2]]
    want += [o["output_ids"] for o in cold.generate(input_ids=pair, sampling_params=GREEDY)]
    got += [o["output_ids"] for o in warm.generate(input_ids=pair, sampling_params=GREEDY)]
    assert got == want
    assert cold.stats()["scheduler"]["retractions"] > 0  # the pair does not fit uncached
    stats = warm.stats()
    assert stats["scheduler"]["retractions"] == 0
    assert stats["scheduler"]["prefix_cache"]["evicted_blocks"] > 0
    assert stats["kv"]["used_pages"] == 0
    assert stats["kv"]["mapped_pages"] == stats["kv"]["cached_pages"] <= 12 * per_block


def test_flush_is_refused_while_a_request_runs_and_then_unmaps_every_page(tiny_models):
    engine = Engine(tiny_models["mixtral"], **SMALL)
    core = engine.core
    engine.generate(input_ids=SYSTEM + [5], sampling_params=GREEDY)
    core.add_request(EngineRequest("busy", engine.models[0], SYSTEM + [6],
                                   SamplingParams(max_new_tokens=3)))
    core.step()
    assert not engine.flush_cache()
    while core.has_work():
        core.step()
    assert core.kv_pool.used_pages > 0
    assert engine.flush_cache()
    kv = engine.stats()["kv"]
    assert kv["mapped_pages"] == kv["cached_pages"] == kv["used_pages"] == 0
    backend = core.kv_pool.backend
    assert backend.map_calls == backend.unmap_calls
    again = engine.generate(input_ids=SYSTEM + [5], sampling_params=GREEDY)
    assert again["meta_info"]["cached_tokens"] == 0


def test_disable_radix_cache_flag_reaches_the_engine_config(tiny_models):
    from sglang_crosspool.server_args import ServerArgs

    argv = ["--model-path", tiny_models["olmoe"]]
    assert ServerArgs.from_cli(argv, make_demo=False).engine_config().radix_cache
    off = ServerArgs.from_cli(argv + ["--disable-radix-cache"], make_demo=False)
    assert not off.engine_config().radix_cache


def test_the_layer_pipeline_runs_cached_prefixes_of_two_models(tiny_models):
    # Crosspool with two FFN servers (in process) and two micro-batches a step: batches of
    # both models, each starting after its cached prefix, run through the layer pipeline.
    paths = [tiny_models["qwen3_moe"], tiny_models["mixtral"]]
    options = dict(SMALL, served_model_name=["q", "m"], pool_mode="crosspool", ffn_servers=2,
                   ffn_transport="local", pipeline_microbatches=2)
    prompts = [SYSTEM + [1, 2], SYSTEM + [3], SYSTEM + list(range(300, 320)), SYSTEM + [4]]
    models = ["q", "m", "q", "m"]
    outs = {}
    for disable in (True, False):
        engine = Engine(paths, disable_radix_cache=disable, **options)
        engine.generate(input_ids=[SYSTEM + [9]] * 2, sampling_params=GREEDY, model=["q", "m"])
        outs[disable] = engine.generate(input_ids=prompts, sampling_params=GREEDY, model=models)
        assert engine.stats()["pipeline"]["steps"] > 0
    assert [o["output_ids"] for o in outs[False]] == [o["output_ids"] for o in outs[True]]
    assert [o["meta_info"]["cached_tokens"] for o in outs[False]] == [40] * 4
