"""Tensor and expert parallelism at run time: one engine, tp_size ranks in lockstep.

    rank 0 (this process: Engine or the scheduler process)     ranks 1..N-1 (spawned followers)
    EngineCore: scheduler, KV books, sampling                  TPFollower: no scheduler
    step(): schedule -> _forward_one(model, StepLists)
        broadcast_object(StepMessage: model, lists, KV journal, graph?, rows) -> replay journal
        forward over its shard  <-- all-reduce per layer -->   forward over its shard
        logits of its vocab rows  <-- all-gather -->           logits of its vocab rows
        sample

Every rank loads only its share of each model (`models/parallel.py`: heads, intermediate rows,
expert slice) onto its own device (cuda:k+rank, or the CPU) and keeps its own KV pool with the
same blocks mapped: rank 0's pool records block operations (`KVPool.journal`) and the step
message carries them, so a follower's pool replays them before the step's forward.
Embeddings and lm_head are vocab-parallel where tp_size divides the vocabulary (else whole on
every rank, and only rank 0 computes logits). Control
messages go over the group's gloo control group (a follower waits for the next step however
long the server idles); tensors over the device group (NCCL on CUDA, gloo on CPU).

`make_core(config)` is what Engine and the scheduler process call: an `EngineCore` at TP 1,
else a `TPEngineCore`, which spawns its followers, joins the group and checks that every rank
loaded before it serves.

Decode steps as CUDA graphs (`decode_graphs`): every rank captures the same buckets of every
model in the same order at start-up (the warm-up runs all-reduce, so they capture together;
the NCCL all-reduces are inside the graphs), and a step message says whether rank 0 replays a
graph, so the followers replay theirs. No graph memory budget under TP: a rank that skipped a
bucket another captured would leave the ranks out of step.
NOTE: captured graphs with NCCL inside have not run on a GPU yet (`benchmark/tp_gpu_bench.py`
+graph modes measure exactly that); `--disable-cuda-graph` runs every step eagerly.

Pool modes: static and monolithic hold each rank's FFN shard (expert slices or rows); in
crosspool the experts stay in the weights pool, rank 0 alone crosses to it and broadcasts the
FFN output to the other ranks each layer (`make_ffn`; those steps run eagerly).

Not supported yet (refused in `EngineConfig.build` or here, with the reason): crosspool over
the dist/nccl FFN transports (their torch.distributed group would be the ranks' own),
micro-batch pipelining, loading or unloading models while serving, several attention
workers (--devices). A rank that dies makes the engine unavailable (503), as a dead FFN
server does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from sglang_crosspool.config import EngineConfig
from sglang_crosspool.distributed.group import Group, init_group
from sglang_crosspool.distributed.spawn import start_ranks, tcp_init_method
from sglang_crosspool.engine.attention import get_attention_backend
from sglang_crosspool.engine.core import EngineCore
from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists
from sglang_crosspool.engine.model_runner import ModelRunner
from sglang_crosspool.ffn.executor import LocalFFNExecutor
from sglang_crosspool.memory.kv_pool import KVPool
from sglang_crosspool.memory.page_backend import make_backend
from sglang_crosspool.models.checkpoint import open_checkpoint
from sglang_crosspool.models.parallel import ShardPlan
from sglang_crosspool.models.registry import get_architecture
from sglang_crosspool.tokenizer import load_tokenizer

log = logging.getLogger("sglang_crosspool.tp")

# Tests only: graphs' static path (padded buffers, no capture) on CPU, on every rank.
STATIC_GRAPHS_ENV = "SGLANG_CROSSPOOL_TP_STATIC_GRAPHS"
TIMEOUT_S = 600.0  # a tensor collective waiting this long for a rank: the rank is gone
CONTROL_TIMEOUT_S = 7 * 24 * 3600.0  # a follower waits for the next step while the server idles
_REFUSED = ("loading or unloading models while serving is not supported under tensor "
            "parallelism (--tp-size / --ep-size) yet")


def make_core(config: EngineConfig) -> EngineCore:
    """The engine core the config asks for: one process, or rank 0 of a TP group."""
    if config.attention_split == "seq":  # issue 16: one request's KV over every rank
        from sglang_crosspool.engine.seq_split_runtime import SeqSplitEngineCore

        return SeqSplitEngineCore(config)
    if config.tp_size == 1 and config.ep_size == 1:
        return EngineCore(config)
    return TPEngineCore(config)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """Rank r's device: the CPU, or the r-th GPU from the configured one."""
    dev = torch.device(config.device)
    return dev if dev.type != "cuda" else torch.device("cuda", (dev.index or 0) + rank)


# -- one rank's parts (the same on rank 0 and followers) -------------------------------------

def load_shard(config: EngineConfig, entry, shard: ShardPlan, group: Group, device):
    """A model's attention half and FFN half on this rank: its share only (crosspool: no FFN
    half, None: the experts live in the weights pool)."""
    arch = get_architecture(entry.spec.model_type)
    files = open_checkpoint(entry.path, config.load_format, device)
    dtype = config.torch_dtype
    attention = arch.attention_cls(entry.spec, files, device, dtype, shard=shard, group=group)
    if config.pool_mode == "crosspool":
        return attention, None
    ffn = arch.ffn_cls(entry.spec, files, device, dtype, moe_small_batch=config.moe_small_batch,
                       shard=shard, group=group)
    return attention, ffn


def make_kv_pool(config: EngineConfig, device) -> KVPool:
    backend = make_backend(device, config.kv_page_bytes, config.kv_page_backend)
    pages = config.kv_pages or max(1, config.kv_budget_bytes // backend.page_bytes)
    return KVPool(backend, pages, reserve_pages=config.kv_reserve_pages)


def add_kv(pool: KVPool, config: EngineConfig, entry, attention) -> None:
    """A model's KV ranges for this rank's KV heads (an MLA latent: whole on every rank)."""
    s = entry.spec
    pool.add_model(entry.name, s.num_layers, attention.heads.kv_heads, s.head_dim,
                   config.torch_dtype, max_tokens=entry.context_length * config.max_running_requests,
                   latent=s.kv_latent)


def make_runner(config: EngineConfig, entry, attention, pool: KVPool, ffn) -> ModelRunner:
    heads = attention.heads
    backend = get_attention_backend(config.attention_backend)(
        heads.heads, heads.kv_heads, entry.spec.head_dim, config.torch_dtype)
    return ModelRunner(entry.name, attention, pool.models[entry.name], backend, ffn)


class TPFFNExecutor(LocalFFNExecutor):
    """Each model's FFN shard in this process; its forward all-reduces over the group."""

    def live_models_refused(self) -> str | None:
        return _REFUSED


def make_ffn(config: EngineConfig, halves: dict, group: Group, device):
    """This rank's FFN executor: its shards (static, monolithic), or under crosspool the
    weights pool reached by rank 0 alone, its output broadcast to the other ranks each layer
    (seq_split_runtime.SplitFFN, shared with the sequence split)."""
    if config.pool_mode != "crosspool":
        return TPFFNExecutor(halves, device)
    from sglang_crosspool.engine.seq_split_runtime import SplitFFN
    from sglang_crosspool.ffn.factory import make_ffn_executor

    return SplitFFN(make_ffn_executor(config) if group.rank == 0 else None, group)


def decode_graphs(config: EngineConfig, runners: dict, kv_pool: KVPool,
                  device) -> tuple[dict, str | None]:
    """Each model's decode graphs on this rank, in model order, with EngineCore's buckets;
    and the capture's status: None (nothing to capture, the same on every rank), "ok", or
    why it failed (then no graphs: `agree_on_graphs` makes every rank step eagerly)."""
    from sglang_crosspool.engine.cuda_graph import DecodeGraphs, graph_buckets

    capture = device.type == "cuda"
    if not config.cuda_graph or not (capture or os.environ.get(STATIC_GRAPHS_ENV) == "1"):
        return {}, None
    pool = torch.cuda.graph_pool_handle() if capture else None
    running = config.max_running_requests
    buckets = [b for b in config.cuda_graph_bs or () if b <= running] or \
        graph_buckets(min(config.cuda_graph_max_bs, running))
    graphs = {}
    try:
        for entry in config.models:
            runner = runners[entry.name]
            if not (runner.backend.supports_graphs and runner.ffn.supports_graphs):
                continue  # the same answer on every rank
            max_blocks = -(-entry.context_length // kv_pool.block_tokens(entry.name))
            graphs[entry.name] = DecodeGraphs(runner, kv_pool, buckets, max_blocks,
                                              capture=capture, pool=pool)
    except Exception as e:  # NOTE: every rank must then step eagerly (agree_on_graphs)
        log.exception("capturing the decode graphs failed")
        graphs.clear()
        if capture:
            torch.cuda.empty_cache()
        return {}, f"{type(e).__name__}: {e}"
    return graphs, ("ok" if graphs else None)


def agree_on_graphs(group: Group, status: str | None) -> bool:
    """After every rank captured (status "ok" or an error): True when all did; otherwise
    every rank drops its graphs, since one rank replaying while another steps eagerly would
    leave their collectives out of step. One control broadcast per rank."""
    ok = True
    for src in range(group.world_size):
        said = group.broadcast_object(status if src == group.rank else None, src=src)
        if said != "ok":
            ok = False
            log.warning("rank %d did not capture its decode graphs (%s): every rank steps "
                        "eagerly", src, said)
    return ok


def set_quotas(pool: KVPool, config: EngineConfig) -> None:
    if config.pool_mode == "static":  # as EngineCore._init_kv_pool
        share = pool.total_pages // len(config.models)
        for entry in config.models:
            pool.set_quota(entry.name, share)


# -- rank 0 -----------------------------------------------------------------------------------

@dataclass
class StepMessage:
    """What a follower needs for one forward: the model, the step's host lists and the KV
    block operations since the last message."""

    model: str
    lists: StepLists
    journal: list
    graph: bool = False  # rank 0 replays the model's decode graph for this step
    rows: list[int] | None = None  # the logits rows rank 0 takes (vocab-parallel: gathered)


class TPEngineCore(EngineCore):
    """Rank 0 of a TP group: the engine core over its shard, followers in lockstep."""

    def __init__(self, config: EngineConfig, group: Group | None = None):
        self.procs = []
        if group is None:
            group = self._start_followers(config)
        self.group = group
        self.shard = ShardPlan(0, config.tp_size, config.ep_size)
        self._handshaken = False
        try:
            super().__init__(config)  # its _init_graphs does the start-up handshake first
            if getattr(self, "graph_status", None) is not None and \
                    not agree_on_graphs(self.group, self.graph_status):
                self.graphs = {}
        except BaseException as e:
            if not isinstance(e, _RankFailed) and not self._handshaken:
                self._check_ranks(f"{type(e).__name__}: {e}", raise_=False)
            self._stop(tell=False)  # every follower leaves after a failed handshake
            raise
        self.kv_pool.journal = []
        log.info("tensor parallel: tp_size %d, ep_size %d (%d processes)", config.tp_size,
                 config.ep_size, group.world_size)

    def _ranks(self, config: EngineConfig) -> tuple:
        """The followers' entry point, the group's size and the processes' name."""
        return follower_main, config.tp_size, "tp-rank"

    def _start_followers(self, config: EngineConfig) -> Group:
        init_method = tcp_init_method()
        main, size, name = self._ranks(config)
        self.procs = start_ranks(main, size, init_method, args=(config, os.getpid()), name=name)
        try:
            group = init_group(0, size, init_method, rank_device(config, 0),
                               timeout_s=TIMEOUT_S, control_timeout_s=CONTROL_TIMEOUT_S)
            choose_all_reduce(config, group)
            return group
        except BaseException:
            for proc in self.procs:  # they would wait for the rendezvous until its timeout
                proc.kill()
                proc.join()
            raise

    def _check_ranks(self, error: str | None, raise_: bool = True) -> None:
        """Start-up handshake: every rank says whether it loaded (one broadcast per rank)."""
        errors = []
        for src in range(self.group.world_size):
            said = self.group.broadcast_object(error if src == 0 else None, src=src)
            if said is not None and src > 0:
                errors.append(f"rank {src}: {said}")
        if errors and raise_:
            raise _RankFailed("tensor-parallel ranks failed to start:\n" + "\n".join(errors))

    # -- start-up over this rank's shard ----------------------------------------------------

    def _init_models(self, ffn) -> None:
        self.attention, halves, self.tokenizers = {}, {}, {}
        for entry in self.config.models:
            self.attention[entry.name], halves[entry.name] = load_shard(
                self.config, entry, self.shard, self.group, self.device)
            self.tokenizers[entry.name] = load_tokenizer(entry.path)
        self.ffn = ffn or make_ffn(self.config, halves, self.group, self.device)
        self.unavailable = None

    def _add_kv(self, entry) -> None:
        add_kv(self.kv_pool, self.config, entry, self.attention[entry.name])

    def _add_runner(self, entry) -> None:
        self.runners[entry.name] = make_runner(self.config, entry, self.attention[entry.name],
                                               self.kv_pool, self.ffn)

    def _init_graphs(self) -> None:
        # The start-up handshake comes before any capture: capturing runs collectives, which
        # a rank that failed to load would never join.
        self._handshaken = True
        self._check_ranks(None)
        self._capture_graphs()

    def _capture_graphs(self) -> None:
        self.pair_graphs, self._graph_pool = {}, None
        self.graphs, self.graph_status = decode_graphs(self.config, self.runners, self.kv_pool,
                                                       self.device)
        if self.graphs:
            log.info("tensor parallel: decode graphs for batch sizes %s",
                     {name: g.stats()["buckets"] for name, g in self.graphs.items()})

    # -- the step ---------------------------------------------------------------------------

    def _forward_one(self, model: str, step: StepLists, rows: list[int]) -> torch.Tensor:
        journal, self.kv_pool.journal = self.kv_pool.journal, []
        graphs = self.graphs.get(model)  # the base class decides the same way
        graph = graphs is not None and graphs.fits(step)
        try:
            self.group.broadcast_object(StepMessage(model, step, journal, graph, rows))
            return super()._forward_one(model, step, rows)
        except Exception as e:
            # NOTE: the ranks may have stopped at different collectives: none may follow.
            self.unavailable = f"a tensor-parallel step failed: {type(e).__name__}: {e}"
            log.error("%s; the engine stops serving", self.unavailable)
            raise

    def _run_batches(self):
        done = super()._run_batches()
        if self.unavailable and self.states:
            # A failed step ends everything in flight: the followers may be stuck in that
            # step's collectives, so no later step may run (new requests get 503).
            done += self._fail_all(self.unavailable)
        return done

    def check_health(self):
        if not self.unavailable:
            dead = [p.name for p in self.procs if not p.is_alive()]
            if dead:
                return self._fail_all(f"tensor-parallel rank(s) died: {', '.join(dead)}")
        return super().check_health()

    def recover(self) -> bool:
        return False  # a TP group is not restarted in place

    def stats(self) -> dict:
        out = super().stats()
        out["parallel"] = self.parallel_stats()
        return out

    def parallel_stats(self) -> dict:
        """Per model: heads and KV heads per rank, and the KV bytes that hold replicated KV
        heads (an MLA latent counts as a head kept by every rank)."""
        page_bytes, ranks = self.kv_pool.page_bytes, self.config.tp_size
        models = {}
        for name, attention in self.attention.items():
            h, s = attention.heads, attention.spec
            mapped = self.kv_pool.pages_in_use(name) * page_bytes
            replicated = mapped * (h.kv_replicas - 1) // h.kv_replicas
            # Per token over all ranks: what they hold, and the copies beyond the first.
            per_rank = s.kv_bytes_per_token(self.config.dtype) * h.kv_heads // s.num_kv_heads
            models[name] = {"heads_per_rank": h.heads, "kv_heads_per_rank": h.kv_heads,
                            "vocab_parallel": attention.vocab_rows is not None,
                            "kv_replicas": h.kv_replicas, "kv_bytes_per_rank": mapped,
                            "replicated_kv_bytes_per_rank": replicated,
                            "replicated_kv_bytes": replicated * ranks,
                            "kv_bytes_per_token": per_rank * ranks,
                            "replicated_kv_bytes_per_token":
                                per_rank * ranks - s.kv_bytes_per_token(self.config.dtype)}
        return {"tp_size": self.config.tp_size, "ep_size": self.config.ep_size,
                "models": models}

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self._stop()

    def _stop(self, tell: bool = True) -> None:
        group, self.group = getattr(self, "group", None), None
        if group is None:
            return
        if tell and not self.unavailable and all(p.is_alive() for p in self.procs):
            try:
                group.broadcast_object(None)  # followers leave their loop
            except Exception:  # noqa: BLE001 - a follower is gone: it is killed below
                log.warning("could not tell the tensor-parallel followers to stop")
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        group.close()


class _RankFailed(RuntimeError):
    pass


# -- ranks 1..N-1 -----------------------------------------------------------------------------

class TPFollower:
    """One follower rank: its shards, KV pool and runners, and the loop that mirrors rank 0."""

    def __init__(self, config: EngineConfig, group: Group):
        self.config = config
        self.group = group
        self.device = rank_device(config, group.rank)
        shard = ShardPlan(group.rank, config.tp_size, config.ep_size)
        self.attention, halves = {}, {}
        for entry in config.models:
            self.attention[entry.name], halves[entry.name] = load_shard(
                config, entry, shard, group, self.device)
        self.ffn = make_ffn(config, halves, group, self.device)
        self.kv_pool = make_kv_pool(config, self.device)
        for entry in config.models:
            add_kv(self.kv_pool, config, entry, self.attention[entry.name])
        set_quotas(self.kv_pool, config)
        self.runners = {entry.name: make_runner(config, entry, self.attention[entry.name],
                                                self.kv_pool, self.ffn)
                        for entry in config.models}
        self.graphs, self.graph_status = {}, None  # captured after the handshake

    def capture_graphs(self) -> None:
        """After the start-up handshake, as rank 0 captures (TPEngineCore._init_graphs)."""
        self.graphs, self.graph_status = decode_graphs(self.config, self.runners, self.kv_pool,
                                                       self.device)

    @torch.inference_mode()
    def run(self) -> None:
        """Runs rank 0's steps until it says stop (None)."""
        while (msg := self.group.broadcast_object(None)) is not None:
            self.kv_pool.replay(msg.journal)
            if msg.graph:
                getattr(self, "graphs", {})[msg.model].run(msg.lists, [])
                continue
            runner = self.runners[msg.model]
            fb = ForwardBatch.from_lists(msg.lists, self.kv_pool.block_tokens(msg.model),
                                         self.device)
            if getattr(runner.model, "vocab_rows", None) is not None:
                # Vocab-parallel: every rank takes part in the logits' all-gather.
                runner.forward(fb, torch.tensor(msg.rows, dtype=torch.int64, device=self.device))
                continue
            runner.backend.prepare(fb)
            runner.layers(fb)  # logits and sampling are rank 0's


def follower_main(rank: int, world_size: int, init_method: str, config: EngineConfig,
                  parent_pid: int) -> None:
    """A follower process: join the group, load its shards, say so, mirror rank 0's steps."""
    def graphs_agreed(follower: TPFollower, group) -> None:
        follower.capture_graphs()
        if follower.graph_status is not None and not agree_on_graphs(group,
                                                                    follower.graph_status):
            follower.graphs = {}

    run_follower(rank, world_size, init_method, config, parent_pid, "tp", TPFollower,
                 graphs_agreed)


def run_follower(rank: int, world_size: int, init_method: str, config: EngineConfig,
                 parent_pid: int, label: str, make, after_handshake=None) -> None:
    """The body of a follower process (TP here, the sequence split's too): join the group,
    build the follower (`make(config, group)`), answer rank 0's start-up handshake
    (TPEngineCore._check_ranks: every rank says its load error or None), then mirror rank
    0's steps until it says stop."""
    logging.basicConfig(level=logging.INFO,
                        format=f"[%(asctime)s {label}-rank-{rank}] %(levelname)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    _exit_with_parent(parent_pid)
    group = init_group(rank, world_size, init_method, rank_device(config, rank),
                       timeout_s=TIMEOUT_S, control_timeout_s=CONTROL_TIMEOUT_S)
    choose_all_reduce(config, group)
    follower, error = None, None
    try:
        follower = make(config, group)
    except Exception as e:  # reported to rank 0 in the handshake
        log.exception("loading this rank's weights failed")
        error = f"{type(e).__name__}: {e}"
    failed = False
    for src in range(world_size):
        said = group.broadcast_object(error if src == rank else None, src=src)
        failed = failed or said is not None
    if failed:
        os._exit(1)
    if after_handshake is not None:
        after_handshake(follower, group)
    follower.run()
    group.close()


def choose_all_reduce(config: EngineConfig, group) -> None:
    """--tp-all-reduce symm-mem: every rank, right after joining (collective), switches the
    group's small bf16 all-reduces to symmetric memory; where that fails, NCCL stays."""
    if config.tp_all_reduce != "symm-mem" or group.world_size == 1:
        return
    why = group.enable_symm_mem()
    # Every rank takes the same path or none does: one rank on NCCL while another spins in
    # the two-shot barrier would hang the group. One control broadcast per rank.
    said = [group.broadcast_object(why if src == group.rank else None, src=src)
            for src in range(group.world_size)]
    failed = [(src, w) for src, w in enumerate(said) if w is not None]
    if failed:
        group.disable_symm_mem()
        log.warning("symmetric-memory all-reduce unavailable (rank %d: %s); NCCL all-reduce",
                    *failed[0])
    else:
        log.info("all-reduces of up to 2 MiB through symmetric memory")


def _exit_with_parent(parent_pid: int) -> None:
    """A follower blocked in a collective cannot notice rank 0's death; this thread does."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


__all__ = ["TPEngineCore", "TPFollower", "make_core", "rank_device"]
