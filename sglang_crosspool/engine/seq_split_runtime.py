"""Attention sequence split at run time: one engine over N ranks, one request's KV on all.

The lockstep runtime of tensor parallelism (engine/tensor_parallel.py) with other parts:

    rank 0: SeqSplitEngineCore (scheduler, sampling)      ranks 1..N-1: SeqSplitFollower
    - attention whole on every rank (its weights are small: what grows is the KV)
    - the FFN: monolithic pool mode: divided over the ranks as expert parallelism (experts by
      expert, dense and shared MLPs by intermediate rows, one all-reduce per layer), or whole
      on every rank where the model's shapes cannot be cut so (`ffn_shard`); crosspool: in
      the weights pool's FFN servers, reached by rank 0's executor, its output broadcast to
      the other ranks each layer (`SplitFFN`): the KV-pool GPUs hold attention and KV only
    - KV: a SplitKVPool on every rank, each rank's pages in its own pool (memory/kv_split.py);
      rank 0's scheduler places blocks, the step message carries its journal, followers replay
    - attention: seq_split.wrap (engine/seq_split.py): partials over local pages, one
      all_gather per layer, merged by log-sum-exp; everything after it is identical per rank

Ranks are `attention_split_size` processes (GPUs device..device+N-1 on CUDA). Not supported
(refused in EngineConfig.build): tensor parallelism inside the split, the static pool mode,
micro-batch pipelining; CUDA graphs are not captured (eager steps).
"""

from __future__ import annotations

import logging

import torch

from sglang_crosspool.config import EngineConfig
from sglang_crosspool.distributed.group import Group, SingleGroup
from sglang_crosspool.engine import seq_split
from sglang_crosspool.engine.core import load_attention
from sglang_crosspool.engine.tensor_parallel import (
    TPEngineCore,
    TPFFNExecutor,
    TPFollower,
    add_kv,
    make_kv_pool,
    make_runner,
    rank_device,
    run_follower,
)
from sglang_crosspool.ffn.executor import FFNExecutor
from sglang_crosspool.ffn.factory import make_ffn_executor
from sglang_crosspool.memory.device_memory import DeviceMemory
from sglang_crosspool.memory.kv_split import SplitKVPool
from sglang_crosspool.models.checkpoint import open_checkpoint
from sglang_crosspool.models.parallel import ParallelError, ShardPlan
from sglang_crosspool.models.registry import get_architecture
from sglang_crosspool.tokenizer import load_tokenizer

log = logging.getLogger("sglang_crosspool.seq_split")


def ffn_shard(spec, group: Group) -> ShardPlan:
    """How the split's ranks divide a model's FFN: expert parallelism over all of them
    (ShardPlan(rank, N, N)) where its experts and MLP widths allow it, else whole (ShardPlan())."""
    shard = ShardPlan(group.rank, group.world_size, group.world_size)
    try:
        if any(spec.moe_layers):
            shard.experts(spec.num_experts)
        if spec.shared_expert_intermediate_size:
            shard.dense_rows(spec.shared_expert_intermediate_size)
        if not all(spec.moe_layers):
            shard.dense_rows(spec.dense_intermediate_size)
    except ParallelError as e:
        log.warning("%s: the FFN stays whole on every rank of the sequence split (%s)",
                    spec.path, e)
        return ShardPlan()
    return shard


def load_parts(config: EngineConfig, entry, group: Group, device):
    """A model's attention half, whole, and its FFN half, this rank's share (`ffn_shard`)."""
    arch = get_architecture(entry.spec.model_type)
    files = open_checkpoint(entry.path, config.load_format, device)
    dtype = config.torch_dtype
    attention = arch.attention_cls(entry.spec, files, device, dtype)
    shard = ffn_shard(entry.spec, group)
    ffn = arch.ffn_cls(entry.spec, files, device, dtype, moe_small_batch=config.moe_small_batch,
                       shard=shard, group=group if shard.sharded else SingleGroup(device))
    return attention, ffn


def _split_pool(config: EngineConfig, device, group: Group) -> SplitKVPool:
    return SplitKVPool(make_kv_pool(config, device), group.rank, group.world_size)


def _split_runner(config: EngineConfig, entry, attention, pool: SplitKVPool, ffn, group):
    runner = make_runner(config, entry, attention, pool, ffn)
    runner.backend = seq_split.wrap(runner.backend, group, pool.rank_slots(entry.name))
    return runner


class SplitFFN(FFNExecutor):
    """The crosspool FFN under a sequence split. Every rank computes the same hidden states;
    rank 0 (`inner`: the crosspool executor) crosses to the FFN servers, and the output is
    broadcast from it to the other ranks (`inner` None there), in the order the layers run."""

    def __init__(self, inner: FFNExecutor | None, group: Group):
        self.inner = inner
        self.group = group

    def submit(self, model, layer, hidden, routing):
        handle = self.inner.submit(model, layer, hidden, routing) if self.inner else None
        return handle, hidden

    def wait(self, handle):
        inner, hidden = handle
        out = self.inner.wait(inner) if self.inner else torch.empty_like(hidden)
        return self.group.broadcast(out.contiguous(), src=0)

    def begin_step(self, plan, graph: bool = False) -> None:
        if self.inner:
            self.inner.begin_step(plan, graph)

    def end_step(self) -> None:
        if self.inner:
            self.inner.end_step()

    def close(self) -> None:
        if self.inner:
            self.inner.close()

    def failure(self) -> str | None:
        return self.inner.failure() if self.inner else None

    def local_bytes(self) -> int:
        return self.inner.local_bytes() if self.inner else 0

    def server_bytes(self) -> list[int]:
        return self.inner.server_bytes() if self.inner else []


class SeqSplitEngineCore(TPEngineCore):
    """Rank 0 of a sequence split (module docstring)."""

    def _ranks(self, config: EngineConfig) -> tuple:
        return follower_main, config.attention_split_size, "seq-rank"

    def _init_models(self, ffn) -> None:
        cfg = self.config
        self.attention, halves, self.tokenizers = {}, {}, {}
        for entry in cfg.models:
            if cfg.pool_mode == "crosspool":  # the experts live in the weights pool
                self.attention[entry.name] = load_attention(entry, cfg.load_format,
                                                            self.device, cfg.torch_dtype)
            else:
                self.attention[entry.name], halves[entry.name] = load_parts(
                    cfg, entry, self.group, self.device)
            self.tokenizers[entry.name] = load_tokenizer(entry.path)
        if ffn is None:
            ffn = SplitFFN(make_ffn_executor(cfg), self.group) if cfg.pool_mode == "crosspool" \
                else TPFFNExecutor(halves, self.device)
        self.ffn = ffn
        self.unavailable = None

    def _init_kv_pool(self) -> None:
        self.kv_pool = _split_pool(self.config, self.device, self.group)
        self.device_memory = DeviceMemory(self.config.device, self.kv_pool.local)
        for entry in self.config.models:
            self._add_kv(entry)

    def _add_runner(self, entry) -> None:
        self.runners[entry.name] = _split_runner(self.config, entry, self.attention[entry.name],
                                                 self.kv_pool, self.ffn, self.group)

    def _capture_graphs(self) -> None:
        self.graphs, self.pair_graphs, self._graph_pool = {}, {}, None  # eager steps

    def parallel_stats(self) -> dict:
        """Each rank's KV pages (the split's point: one request's pages on every rank) and how
        each model's FFN is divided."""
        return {"attention_split": "seq", "ranks": self.group.world_size,
                "kv_pages_per_rank": self.kv_pool.stats()["ranks"],
                "ffn_expert_parallel": {name: parts[0].shard.sharded for name, parts in
                                        getattr(self.ffn, "halves", {}).items()}}


class SeqSplitFollower(TPFollower):
    """A follower rank of a sequence split: the whole model, its own share of the KV pages;
    `run` (TPFollower's) replays rank 0's journal and runs every step's forward."""

    def __init__(self, config: EngineConfig, group: Group):
        self.config = config
        self.group = group
        self.device = rank_device(config, group.rank)
        self.attention, halves = {}, {}
        for entry in config.models:
            if config.pool_mode == "crosspool":
                self.attention[entry.name] = load_attention(entry, config.load_format,
                                                            self.device, config.torch_dtype)
            else:
                self.attention[entry.name], halves[entry.name] = load_parts(
                    config, entry, group, self.device)
        self.ffn = SplitFFN(None, group) if config.pool_mode == "crosspool" else \
            TPFFNExecutor(halves, self.device)
        self.kv_pool = _split_pool(config, self.device, group)
        for entry in config.models:
            add_kv(self.kv_pool, config, entry, self.attention[entry.name])
        self.runners = {entry.name: _split_runner(config, entry, self.attention[entry.name],
                                                  self.kv_pool, self.ffn, group)
                        for entry in config.models}


def follower_main(rank: int, world_size: int, init_method: str, config: EngineConfig,
                  parent_pid: int) -> None:
    """A follower process: join, load, answer rank 0's start-up handshake, mirror its steps."""
    run_follower(rank, world_size, init_method, config, parent_pid, "seq", SeqSplitFollower)


__all__ = ["SeqSplitEngineCore", "SeqSplitFollower"]
