"""CrossPool: the same greedy tokens in every pool mode and over every transport, FFN weights
only in FFN servers, the layer-wise pipeline, and an FFN server dying mid-request."""

from __future__ import annotations

import pytest
from crosspool_scheduler import layer_pipeline

from sglang_crosspool import Engine
from sglang_crosspool.models.checkpoint import CheckpointFiles
from sglang_crosspool.testing.checkpoints import ARCHS
from sglang_crosspool.testing.faults import failed_cleanly, kill_ffn_server_mid_run
from sglang_crosspool.testing.multimodel import GREEDY, run_all

ATTENTION_KEYS = ("self_attn", "embed_tokens", "lm_head", "layernorm", "model.norm", ".gate.weight")


def full_ffn_bytes(stats) -> int:
    return stats["ffn_bytes_here"]


@pytest.mark.parametrize("options", [
    dict(pool_mode="static"),
    dict(pool_mode="crosspool", ffn_servers=3, ffn_transport="local"),
    dict(pool_mode="crosspool", ffn_servers=2, ffn_transport="local", pipeline_microbatches=2),
], ids=["static", "crosspool-local", "crosspool-local-pipelined"])
def test_in_process_modes_match_monolithic(arch_paths, monolithic_reference, options):
    outputs, stats = run_all(arch_paths, **options)
    assert outputs == monolithic_reference[0]
    assert stats["pool_mode"] == options["pool_mode"]
    assert stats["kv"]["used_pages"] == 0
    # The weights are the same bytes, however they are placed.
    assert sum(stats["ffn_bytes_per_server"]) == full_ffn_bytes(monolithic_reference[1])


@pytest.mark.parametrize("transport, servers", [("shm", 2), ("dist", 3)])
def test_ffn_server_processes_match_monolithic_and_hold_only_ffn(arch_paths, monolithic_reference, transport,
                                                                 servers):
    outputs, stats = run_all(arch_paths, pool_mode="crosspool", ffn_servers=servers,
                             ffn_transport=transport, pipeline_microbatches=2)
    assert outputs == monolithic_reference[0]
    # The attention worker holds no FFN bytes; the servers hold all of them, each a share.
    assert stats["ffn_bytes_here"] == 0
    per_server = stats["ffn_bytes_per_server"]
    assert len(per_server) == servers and all(b > 0 for b in per_server)
    assert sum(per_server) == full_ffn_bytes(monolithic_reference[1])
    assert stats["attention_bytes"] == monolithic_reference[1]["attention_bytes"]
    assert stats["pipeline"]["steps"] > 0 and 0 <= stats["pipeline"]["bubble_fraction"] < 1


def test_ffn_servers_never_read_attention_tensors(arch_paths):
    engine = Engine(arch_paths, served_model_name=list(ARCHS), pool_mode="crosspool",
                    ffn_servers=2, ffn_transport="shm")
    try:
        ready = engine.core.ffn.pool.ready
        keys = [k for r in ready for k in r.keys_read]
        assert keys and all("experts" in k or "shared_expert" in k for k in keys), keys
        assert not [k for k in keys if any(a in k for a in ATTENTION_KEYS)]
        # Each expert tensor was read by exactly one server.
        assert len(keys) == len(set(keys))
        every_ffn_key = {f"{name}:{k}" for name, p in zip(ARCHS, arch_paths)
                         for k in CheckpointFiles(p).keys()
                         if "experts" in k or "shared_expert" in k}
        assert set(keys) == every_ffn_key
        assert engine.core.ffn.local_bytes() == 0
    finally:
        engine.shutdown()


def test_pipeline_with_two_micro_batches_gives_the_same_tokens(tiny_models):
    path = tiny_models["olmoe"]
    prompts = [[1, 2, 3], list(range(20, 40)), [7] * 5, [300, 301]]
    outs = {}
    for depth in (1, 2, 3):
        engine = Engine(path, pool_mode="crosspool", ffn_servers=2, ffn_transport="shm",
                        pipeline_microbatches=depth)
        try:
            result = engine.generate(input_ids=prompts, sampling_params=GREEDY)
            outs[depth] = [o["output_ids"] for o in result]
            pipe = engine.stats()["pipeline"]
            if depth > 1:
                assert pipe["steps"] > 0
                spans = engine.core.last_timeline.spans
                assert {s.kind for s in spans} == {"attention", "submit", "wait"}
                assert len({s.mb for s in spans}) >= 2
            else:
                assert pipe["steps"] == 0
        finally:
            engine.shutdown()
    assert outs[1] == outs[2] == outs[3]


def test_pipeline_order_overlaps_every_ffn_with_other_attention():
    ops = layer_pipeline([4, 4])
    for mb in (0, 1):
        for layer in range(4):
            submit = ops.index(next(o for o in ops if (o.kind, o.mb, o.layer) ==
                                    ("submit", mb, layer)))
            wait = ops.index(next(o for o in ops if (o.kind, o.mb, o.layer) ==
                                  ("wait", mb, layer)))
            between = ops[submit + 1 : wait]
            assert any(o.kind == "attention" and o.mb != mb for o in between) or (
                layer == 3 and mb == 1)
    # Each micro-batch's ops keep their own layer order.
    for mb in (0, 1):
        kinds = [(o.kind, o.layer) for o in ops if o.mb == mb]
        assert kinds == [k for layer in range(4) for k in
                         (("attention", layer), ("submit", layer), ("wait", layer))]


def test_killed_ffn_server_ends_requests_with_an_error_and_refuses_new_ones(tiny_models):
    engine = Engine(tiny_models["qwen2_moe"], pool_mode="crosspool", ffn_servers=2,
                    ffn_transport="shm")
    core = engine.core
    try:
        states = kill_ffn_server_mid_run(core, "qwen2_moe", server=1)
        assert failed_cleanly(core, states, "qwen2_moe", server=1) == []
    finally:
        engine.shutdown()
