"""Models loaded and unloaded in a live engine (engine/live_models.py), in process.

A model loaded while serving answers as it does when served from start-up; the other model's
answers do not change; after the unload the KV pool, the weight bytes and the config are what
they were; requests in flight finish first (or end, with force); a model too large for the KV
budget or the free memory is refused with 507 and nothing is touched."""

from __future__ import annotations

import time

import pytest

from sglang_crosspool import Engine
from sglang_crosspool.engine.core import UnknownModel
from sglang_crosspool.engine.live_models import ModelOpError, even_shares
from sglang_crosspool.engine.request import EngineRequest
from sglang_crosspool.engine.sampling_params import SamplingParams
from sglang_crosspool.testing.checkpoints import make_config_only

GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
SMALL = {"kv_page_bytes": 1024}  # 8-token blocks: the long prompt below leaves cached blocks
PROMPTS = [[1, 2, 3, 4, 5], list(range(40, 75))]
MODES = {"monolithic": {}, "crosspool-local": {"pool_mode": "crosspool", "ffn_servers": 2},
         # FFN server processes over torch.distributed (gloo); shm runs in tests/e2e
         "crosspool-dist": {"pool_mode": "crosspool", "ffn_servers": 2, "ffn_transport": "dist"}}


def outputs(engine: Engine, model: str) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY,
                                                     model=model)]


def footprint(engine: Engine) -> dict:
    s = engine.stats()
    return {"kv": {k: s["kv"][k] for k in ("used_pages", "mapped_pages", "cached_pages")},
            "kv_models": sorted(s["kv"]["models"]), "attention_bytes": s["attention_bytes"],
            "ffn_bytes_per_server": s["ffn_bytes_per_server"], "models": engine.models,
            "scheduler": sorted(s["scheduler"]["models"])}


@pytest.fixture(scope="module")
def expected_b(tiny_models) -> list[list[int]]:
    """The mixtral model's answers when served from start-up (every pool mode gives these)."""
    alone = Engine(tiny_models["mixtral"], served_model_name="b", **SMALL)
    yield outputs(alone, "b")
    alone.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_load_serve_unload_leaves_the_engine_as_it_was(tiny_models, expected_b, mode):
    opts = {**SMALL, **MODES[mode]}
    engine = Engine(tiny_models["qwen3_moe"], served_model_name="a", **opts)
    before_a = outputs(engine, "a")
    engine.flush_cache()
    before = footprint(engine)

    loaded = engine.load_model(tiny_models["mixtral"], "b")
    assert engine.models == ["a", "b"]
    assert loaded["attention_bytes"] == loaded["estimate"]["attention_bytes"] > 0
    assert loaded["ffn_bytes"] == loaded["estimate"]["ffn_bytes"] > 0
    servers = 2 if mode != "monolithic" else 1
    assert sum(loaded["estimate"]["ffn_experts_per_server"]) == 4
    assert len(loaded["shares"]) == servers
    assert outputs(engine, "b") == expected_b
    assert outputs(engine, "a") == before_a
    during = engine.stats()
    assert during["kv"]["models"]["b"]["cached_pages"] > 0  # the long prompt's blocks
    assert during["attention_bytes"] == before["attention_bytes"] + loaded["attention_bytes"]

    freed = engine.unload_model("b")
    assert freed["attention_bytes"] == loaded["attention_bytes"]
    assert freed["ffn_bytes"] == loaded["ffn_bytes"]
    assert freed["prefix_cache_blocks"] > 0
    engine.flush_cache()
    assert footprint(engine) == before
    assert outputs(engine, "a") == before_a
    with pytest.raises(UnknownModel):
        engine.generate(input_ids=[1, 2], model="b")
    # The same name can be loaded again.
    engine.load_model(tiny_models["mixtral"], "b")
    assert outputs(engine, "b") == expected_b
    engine.shutdown()


@pytest.mark.parametrize("mode", ["crosspool-local", "crosspool-dist"])
def test_rebalance_moves_experts_while_the_tokens_stay(tiny_models, mode):
    engine = Engine([tiny_models["qwen3_moe"], tiny_models["mixtral"]],
                    served_model_name=["a", "b"], **SMALL, **MODES[mode])
    expected = {m: outputs(engine, m) for m in "ab"}
    ffn = engine.core.ffn
    even = ffn.shares("a")
    assert sorted(map(len, even)) == [4, 4]  # qwen3_moe tiny: 8 experts
    before = engine.stats()["ffn_bytes_per_server"]
    moved = engine.rebalance({"a": [[], list(range(8))]})
    assert moved["models"]["a"]["moved_experts"] == 4
    assert ffn.shares("a") == [[], list(range(8))]
    after = engine.stats()["ffn_bytes_per_server"]
    assert sum(after) == sum(before) and after[0] < before[0] and after[1] > before[1]
    assert {m: outputs(engine, m) for m in "ab"} == expected
    moved = engine.rebalance()  # spread evenly again, moving as few as can be
    assert moved["models"]["a"]["moved_experts"] == 4
    assert sorted(map(len, ffn.shares("a"))) == [4, 4]
    assert engine.stats()["ffn_bytes_per_server"] == before
    assert {m: outputs(engine, m) for m in "ab"} == expected
    assert engine.rebalance() == {"models": {}}  # nothing left to move
    for placement, status in (({"a": [[0], [1]]}, 400), ({"zz": [[0], [1]]}, 404),
                              ([1, 2], 400)):
        with pytest.raises(ModelOpError) as e:
            engine.rebalance(placement)
        assert e.value.status == status
    assert engine.stats()["live_models"]["rebalances"] == 2
    engine.shutdown()


def test_even_shares_moves_as_few_experts_as_it_can():
    # Server 0 keeps 2 of its 5, server 1 keeps its one; the 3 spare go where room is.
    assert even_shares([[0, 1, 2, 3, 4], [5], []]) == [[0, 1], [2, 5], [3, 4]]
    assert even_shares([[0, 2], [1, 3]]) == [[0, 2], [1, 3]]
    # 3 over 4 servers: the one holding all keeps one, no server gets two.
    assert even_shares([[0, 1, 2], [], [], []]) == [[0], [1], [2], []]


def _start(core, rid: str, model: str, tokens: int):
    return core.add_request(EngineRequest(rid, model, [1, 2, 3], SamplingParams(
        max_new_tokens=tokens, temperature=0, ignore_eos=True)))


def test_unload_waits_for_requests_in_flight_and_force_ends_them(tiny_models):
    engine = Engine(tiny_models["qwen3_moe"], served_model_name="a")
    core = engine.core
    engine.load_model(tiny_models["olmoe"], "b")
    a, b = _start(core, "a1", "a", 30), _start(core, "b1", "b", 30)
    for _ in range(3):
        core.step()
    name, ended = core.live.begin_unload({"served_model_name": "b"})
    assert name == "b" and ended == []
    with pytest.raises(UnknownModel, match="not served"):
        _start(core, "b2", "b", 1)
    assert engine.stats()["live_models"]["draining"] == ["b"]
    while core.has_work():
        assert core.live.poll() == []  # b1 still runs: nothing freed yet
        core.step()
    assert len(b.output_ids) == 30 and b.finish_reason["type"] == "length"
    assert len(a.output_ids) == 30
    (op, model, result), = core.live.poll()
    assert (op, model) == ("unload_model", "b") and result["ended_by_force"] == 0
    assert engine.models == ["a"]

    engine.load_model(tiny_models["olmoe"], "b")
    b = _start(core, "b3", "b", 30)
    core.step()
    _, ended = core.live.begin_unload({"served_model_name": "b", "force": True})
    assert ended == [b] and b.finish_reason["status_code"] == 503
    assert "unloaded" in b.finish_reason["message"]
    (_, _, result), = core.live.poll()
    assert result["ended_by_force"] == 1
    assert engine.stats()["kv"]["used_pages"] == 0
    engine.shutdown()


def test_refusals_touch_nothing(tiny_models, tmp_path):
    engine = Engine(tiny_models["qwen3_moe"], served_model_name="a", kv_pages=6)
    before = footprint(engine)
    # Four layers of K and V: one block is 8 pages, over the 6 of the budget.
    deep = make_config_only(tmp_path / "deep", tiny_models["mixtral"], num_hidden_layers=4)
    with pytest.raises(ModelOpError, match="KV budget") as e:
        engine.load_model(deep, "deep", load_format="dummy")
    assert e.value.status == 507
    # Weights far over any machine's free memory (from config.json alone: nothing is read).
    # 4096 experts of 3 x 64 x 2^20 float32: 3.3 TB of FFN weights.
    huge = make_config_only(tmp_path / "huge", tiny_models["mixtral"], num_hidden_layers=1,
                            intermediate_size=1 << 20, num_local_experts=4096)
    with pytest.raises(ModelOpError, match="does not fit") as e:
        engine.load_model(huge, "huge", load_format="dummy")
    assert e.value.status == 507
    for args, status in (({"model_path": tiny_models["mixtral"], "served_model_name": "a"}, 400),
                         ({"model_path": str(tmp_path / "missing")}, 400),
                         ({}, 400)):
        with pytest.raises(ModelOpError) as e:
            engine.core.live.begin_load(args)
        assert e.value.status == status
    with pytest.raises(ModelOpError) as e:
        engine.core.live.begin_unload({"served_model_name": "nope"})
    assert e.value.status == 404
    assert not engine.core.live.busy
    assert footprint(engine) == before
    engine.shutdown()

    static = Engine(tiny_models["qwen3_moe"], pool_mode="static")
    with pytest.raises(ModelOpError, match="static") as e:
        static.load_model(tiny_models["mixtral"], "b")
    assert e.value.status == 501
    static.shutdown()


def test_a_failed_load_leaves_nothing_behind(tiny_models, tmp_path):
    engine = Engine(tiny_models["qwen3_moe"], served_model_name="a")
    before = footprint(engine)
    # config.json without weight files: the load starts, then reading the weights fails.
    empty = make_config_only(tmp_path / "empty", tiny_models["mixtral"])
    start = time.monotonic()
    with pytest.raises(ModelOpError) as e:
        engine.load_model(empty, "empty")
    assert e.value.status == 500 and "failed" in e.value.message
    assert time.monotonic() - start < 30
    assert footprint(engine) == before
    engine.shutdown()
