"""Tensor and expert parallelism (--tp-size, --ep-size) on CPU: gloo over 2 and 4 processes.

Each case starts one Engine over the four architectures and DeepSeek-V2 (rank 0 in this
process, followers spawned) and checks its greedy tokens against the same Engine at TP 1.
The prompts span several KV blocks, and the second round repeats a prompt so that the prefix
cache's block sharing (retain / free) is replayed by the followers too.
"""

from __future__ import annotations

import pytest
import torch

from sglang_crosspool import Engine
from sglang_crosspool.distributed import init_group
from sglang_crosspool.distributed.spawn import run_ranks
from sglang_crosspool.models.checkpoint import CheckpointFiles, DummyFiles
from sglang_crosspool.models.config import load_spec
from sglang_crosspool.models.parallel import ParallelError, ShardPlan
from sglang_crosspool.testing.checkpoints import ARCHS, make_model
from sglang_crosspool.testing.faults import child_pids

GREEDY = {"max_new_tokens": 6, "temperature": 0.0}
LONG = [(7 * i + 3) % 1000 for i in range(140)]  # two whole KV blocks at TP 2 and 4
ROUNDS = [[LONG, [5, 6, 7]], [LONG + [11, 12], [9, 10]]]


@pytest.fixture(scope="module")
def all_models(tiny_models, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tp_models")
    return [tiny_models[a] for a in ARCHS] + [str(make_model(root / "deepseek_v2",
                                                              "deepseek_v2", seed=1))]


def _generate(paths: list[str], **options) -> tuple[dict, dict]:
    names = [ARCHS[i] if i < len(ARCHS) else "deepseek_v2" for i in range(len(paths))]
    tokens = {}
    with Engine(paths, served_model_name=names, device="cpu", dtype="float32",
                **options) as engine:
        for rnd, prompts in enumerate(ROUNDS):
            for name in names:
                outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, model=name)
                tokens[(rnd, name)] = [o["output_ids"] for o in outs]
        stats = engine.stats()
    return tokens, stats


@pytest.fixture(scope="module")
def reference(all_models):
    return _generate(all_models)[0]


@pytest.mark.parametrize("tp, ep", [(2, 1), (4, 1), (2, 2), (4, 4)],
                         ids=["tp2", "tp4", "ep2", "ep4"])
def test_greedy_tokens_equal_tp1(all_models, reference, tp, ep):
    tokens, stats = _generate(all_models, tp_size=tp, ep_size=ep)
    assert tokens == reference
    par = stats["parallel"]
    assert (par["tp_size"], par["ep_size"]) == (tp, ep)
    # 4 heads / 2 KV heads: split at TP 2, each KV head on two ranks at TP 4; MLA: every rank.
    qwen, mla = par["models"]["qwen3_moe"], par["models"]["deepseek_v2"]
    assert qwen["heads_per_rank"] == 4 // tp and qwen["kv_replicas"] == max(1, tp // 2)
    assert qwen["vocab_parallel"]  # the tiny vocabulary divides by 2 and 4
    assert mla["kv_replicas"] == tp
    assert mla["replicated_kv_bytes_per_token"] == (tp - 1) * mla["kv_bytes_per_token"] // tp


def test_tp_plus_ep_groups(all_models, reference):
    """TP 4 with 2 expert groups: experts sliced in two, each expert's rows split in two."""
    tokens, _ = _generate(all_models[:2], tp_size=4, ep_size=2)
    assert tokens == {k: v for k, v in reference.items() if k[1] in ARCHS[:2]}


# -- the cut itself (no processes) -----------------------------------------------------------

def test_head_split_and_replication():
    # Qwen3-235B-A22B: 64 heads, 4 KV heads; at TP 8 each KV head is kept by two ranks.
    split = [ShardPlan(r, 8).heads(64, 4, 128) for r in range(8)]
    assert [s.kv_head_start for s in split] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {(s.heads, s.kv_heads, s.kv_replicas) for s in split} == {(8, 1, 2)}
    # q heads of a rank use that rank's KV head (GQA group of 16 q heads per KV head).
    assert all(s.head_start // 16 == s.kv_head_start for s in split)
    assert ShardPlan(1, 2).heads(32, 8, 128).kv_rows == (4 * 128, 8 * 128)
    with pytest.raises(ParallelError, match="attention heads"):
        ShardPlan(0, 3).heads(4, 2, 16)
    with pytest.raises(ParallelError, match="KV heads"):
        ShardPlan(0, 4).heads(12, 3, 16)


def test_expert_slices_and_groups():
    assert [ShardPlan(r, 4, 4).experts(6) for r in range(4)] == [[0, 1], [2, 3], [4], [5]]
    plan = [ShardPlan(r, 4, 2) for r in range(4)]
    assert [p.experts(8) for p in plan] == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2
    assert [p.expert_rows(32) for p in plan] == [(0, 16), (16, 32)] * 2
    assert ShardPlan(3, 4, 1).expert_rows(32) == (24, 32)
    with pytest.raises(ParallelError, match="divide"):
        ShardPlan(0, 4, 3)


def test_config_refusals(tiny_models):
    path = tiny_models["qwen3_moe"]
    with pytest.raises(ValueError, match="attention heads cannot be split over tp_size 3"):
        Engine(path, device="cpu", tp_size=3)
    with pytest.raises(ValueError, match="ffn_transport 'dist'"):
        Engine(path, device="cpu", tp_size=2, pool_mode="crosspool", ffn_transport="dist")
    with pytest.raises(ValueError, match="pipeline_microbatches"):
        Engine(path, device="cpu", tp_size=2, pipeline_microbatches=2)
    with pytest.raises(ValueError, match="must divide tp_size"):
        Engine(path, device="cpu", tp_size=2, ep_size=4)


def test_shard_reads_only_its_part(tiny_models):
    """A rank's slice read from the safetensors file (and from dummy weights) equals the
    slice of the whole tensor."""
    path = tiny_models["mixtral"]
    spec = load_spec(path)
    key = "model.layers.0.self_attn.o_proj.weight"
    shape = (spec.hidden_size, spec.q_size)
    for files in (CheckpointFiles(path), DummyFiles(path)):
        whole = files.get(key, shape)
        part = files.get(key, shape, part=(1, 16, 48))
        assert torch.equal(part, whole[:, 16:48])


def test_a_tp_plan_launches_one_tensor_parallel_worker(tiny_models, tmp_path):
    """`plan --monolithic-layout tp` spreads every model over both devices: the launcher runs
    one worker at --tp-size 2 over them (CPU processes standing in for the GPUs)."""
    import subprocess
    import sys

    from sglang_crosspool.server_args import ServerArgs

    out = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "sglang_crosspool.plan", "--model-path",
                    tiny_models["qwen3_moe"], "--served-model-name", "a", "--devices", "2",
                    "--device-memory", "64MB", "--kv-page-bytes", "4096",
                    "--monolithic-layout", "tp", "--out", str(out)],
                   check=True, capture_output=True)
    args = ServerArgs.from_cli(["--plan", str(out), "--pool-mode", "monolithic", "--devices",
                                "cpu,cpu"])
    assert (args.tp_size, args.device, args.devices) == (2, "cpu", ())
    assert args.engine_config().tp_size == 2


def test_fused_expert_layout_and_dummy_weights(tiny_models, tmp_path, reference):
    """TP 2 reads its rows of fused expert tensors ([E, 2I, H] gate then up), and random
    `dummy` shards make the same model as dummy weights at TP 1."""
    fused = str(make_model(tmp_path / "fused", "qwen3_moe", seed=1, expert_layout="fused"))
    tokens, _ = _generate([fused], tp_size=2)
    assert tokens == {k: v for k, v in reference.items() if k[1] == "qwen3_moe"}
    path = [tiny_models["mixtral"]]
    want, _ = _generate(path, load_format="dummy")
    got, _ = _generate(path, load_format="dummy", tp_size=2, ep_size=2)
    assert got == want


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton backend on CPU needs TRITON_INTERPRET=1")
def test_decode_graph_steps_in_lockstep(tiny_models, reference, monkeypatch):
    """Decode steps through every rank's DecodeGraphs (the static path, as on CUDA but without
    capture): rank 0 tells the follower to replay, and the tokens stay TP 1's."""
    from sglang_crosspool.engine.tensor_parallel import STATIC_GRAPHS_ENV

    monkeypatch.setenv(STATIC_GRAPHS_ENV, "1")
    tokens, stats = _generate([tiny_models["olmoe"]], tp_size=2, attention_backend="triton",
                              max_running_requests=4)
    want = {k: v for k, v in reference.items() if k[1] == "olmoe"}
    assert {(r, "olmoe"): v for (r, _), v in tokens.items()} == want
    assert stats["cuda_graphs"]["qwen3_moe"]["runs"] > 0


@pytest.mark.parametrize("transport", ["local", "shm", "p2p"])
def test_crosspool_attention_at_tp2(tiny_models, reference, transport):
    """Crosspool with the attention side at TP 2: the experts stay in the weights pool (FFN
    servers in process, or processes over shared memory), rank 0 crosses and broadcasts."""
    paths = [tiny_models["qwen3_moe"], tiny_models["qwen2_moe"]]
    tokens, stats = _generate(paths, tp_size=2, pool_mode="crosspool", ffn_servers=2,
                              ffn_transport=transport)
    assert tokens == {k: v for k, v in reference.items() if k[1] in ARCHS[:2]}
    assert stats["parallel"]["models"]["qwen3_moe"]["heads_per_rank"] == 2
    with pytest.raises(ValueError, match="ep_size > 1"):
        Engine(paths[0], device="cpu", tp_size=2, ep_size=2, pool_mode="crosspool")


def _agree(rank: int, world: int, init_method: str, cases: list) -> list[bool]:
    from sglang_crosspool.engine.tensor_parallel import agree_on_graphs

    group = init_group(rank, world, init_method)
    try:
        return [agree_on_graphs(group, statuses[rank]) for statuses in cases]
    finally:
        group.close()


def test_ranks_agree_on_graphs():
    """One rank that could not capture makes every rank step eagerly."""
    cases = [["ok", "ok"], ["ok", "RuntimeError: capture"]]
    assert run_ranks(_agree, 2, args=(cases,)) == [[True, False], [True, False]]


def test_vocabulary_tp_size_does_not_divide_stays_whole(tmp_path):
    """1030 rows over 4 ranks: embeddings and lm_head whole on every rank, logits on rank 0."""
    path = str(make_model(tmp_path / "odd", "mixtral", seed=4, vocab_size=1030))
    want, _ = _generate([path])
    got, stats = _generate([path], tp_size=4)
    assert got == want and not stats["parallel"]["models"]["qwen3_moe"]["vocab_parallel"]


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the small-batch MoE kernel on CPU needs TRITON_INTERPRET=1")
def test_small_batch_moe_kernel_over_shards(tiny_models, reference):
    """The small-batch MoE path (CUDA's default at <= 2 tokens) over an expert's split rows
    (TP 2) and over an expert slice (EP 2), with qwen2_moe's gated shared expert split."""
    want = {(r, "qwen3_moe"): v for (r, m), v in reference.items() if m == "qwen2_moe"}
    for ep in (1, 2):
        tokens, _ = _generate([tiny_models["qwen2_moe"]], tp_size=2, ep_size=ep,
                              moe_small_batch="on")
        assert tokens == want, ep  # (served under the first name _generate gives)


def test_a_failed_step_ends_every_request_and_no_later_step_runs(tiny_models):
    """A step that fails on rank 0 partway (its followers may wait in that step's collectives)
    ends the requests in flight and those queued behind them with an error, at once: no later
    step may run out of lockstep with the followers."""
    with Engine(tiny_models["qwen3_moe"], device="cpu", dtype="float32",
                max_running_requests=1, tp_size=2) as engine:
        attention = next(iter(engine.core.attention.values()))
        o_proj, calls = attention.o_proj, []

        def fails_once(layer, o):
            calls.append(layer)
            if len(calls) == 2:  # layer 1 of the first step, after layer 0's all-reduce
                raise RuntimeError("injected rank-0 failure")
            return o_proj(layer, o)

        attention.o_proj = fails_once
        outs = engine.generate(input_ids=[[5, 6, 7, 8], [9, 10, 11, 12]],
                               sampling_params={"max_new_tokens": 4, "temperature": 0.0})
        assert engine.core.unavailable and "tensor-parallel step failed" in engine.core.unavailable
        assert len(calls) == 2  # nothing ran after the failed step
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs), outs


def test_ranks_that_fail_to_load_end_the_start_cleanly(tmp_path):
    """Every rank fails to read a broken checkpoint: the handshake (before any capture or
    collective of a step) carries the errors, rank 0 raises, and no rank is left waiting."""
    import time

    path = make_model(tmp_path / "broken", "qwen3_moe", seed=1)
    shard = next(path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:64])  # a header that promises more than is there
    start = time.monotonic()
    with pytest.raises(Exception) as failed:
        Engine(str(path), device="cpu", dtype="float32", tp_size=2)
    assert time.monotonic() - start < 60
    assert "cannot read safetensors" in str(failed.value), failed.value
    deadline = time.monotonic() + 20  # and the follower is gone
    while _ranks() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ranks()


def _ranks() -> list[int]:
    """This process's rank processes still running."""
    import os

    return child_pids(os.getpid(), b"sglang_crosspool.distributed.spawn")
