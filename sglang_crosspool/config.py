"""Engine configuration: built once from user options, frozen, shared read-only by every part.

Derived values (context length per model, KV budget in pages, KV page reserve) are computed
here, in `build`, and nowhere else.

The served model set can change while a server runs (`POST /load_model`, `/unload_model`):
the config stays frozen, and each change makes a new one (`with_model`, `without_model`) that
replaces the old wherever it is held (the engine core, the HTTP side). Everything else in it
(the KV budget, the page reserve, the FFN transport and its buffer sizes, the attention
backend) stays as start-up derived it; `engine/live_models.py` refuses a model these cannot
serve.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_crosspool.models.checkpoint import LOAD_FORMATS
from sglang_crosspool.models.config import ModelSpec
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.options import (
    ATTENTION_BACKENDS,
    ATTENTION_SPLITS,
    FFN_TRANSPORTS,
    GRAMMAR_BACKENDS,
    KV_PAGE_BACKENDS,
    MOE_SMALL_BATCH,
    POOL_MODES,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESERVE_BLOCKS = 2  # default KV page reserve on CUDA, in blocks of the largest model


@dataclass(frozen=True)
class ModelEntry:
    name: str  # served model name
    path: str
    spec: ModelSpec
    context_length: int


@dataclass(frozen=True)
class EngineConfig:
    models: tuple[ModelEntry, ...]
    device: str
    dtype: str
    max_running_requests: int
    chunked_prefill_size: int
    kv_page_bytes: int | None  # None: the backend's default (4 KiB on CPU, 2 MiB on CUDA)
    kv_pages: int | None  # physical KV budget in pages; None: from kv_budget_bytes
    kv_budget_bytes: int
    attention_backend: str
    random_seed: int
    pool_mode: str  # static | monolithic | crosspool
    ffn_servers: int  # crosspool: processes in the weights pool
    ffn_transport: str  # crosspool: local | p2p | shm | cuda-ipc | dist | nccl
    ffn_device: str  # crosspool: where FFN servers put their weights
    dist_backend: str  # ffn_transport="dist": gloo (CPU) or nccl (GPU); "nccl": always nccl
    pipeline_microbatches: int  # micro-batches in flight per step (layer-wise pipeline)
    ffn_placement: tuple | None  # ((model, ((expert ids of server 0), ...)), ...) or None
    # Decode as CUDA graphs (CUDA only, FFN in process): buckets up to cuda_graph_max_bs,
    # captured at start-up while their memory stays within cuda_graph_memory_bytes.
    cuda_graph: bool = True
    cuda_graph_max_bs: int = 32
    cuda_graph_bs: tuple[int, ...] | None = None  # the buckets exactly (SGLang's --cuda-graph-bs)
    cuda_graph_memory_bytes: int = 4 << 30
    kv_page_backend: str = "auto"  # auto | vmm | simulated (memory/page_backend.make_backend)
    kv_reserve_pages: int = 0  # created KV pages kept unmapped, so new blocks skip creation
    # auto | safetensors: read the checkpoint files; dummy: random weights made on the device
    # from config.json alone (models/checkpoint.open_checkpoint)
    load_format: str = "auto"
    grammar_backend: str = "xgrammar"  # xgrammar | none (engine/grammar.py)
    # JSON schemas allow any whitespace between tokens (SGLang's default) unless this is set.
    constrained_json_disable_any_whitespace: bool = False
    # Append the tokens a grammar forces (xgrammar's jump-forward) without sampling them.
    grammar_jump_forward: bool = False
    # Prefix cache (RadixAttention, per model, whole KV blocks); off: --disable-radix-cache.
    radix_cache: bool = True
    # ((model, pages), ...): a model's cached pages that other models' requests cannot evict.
    radix_cache_floor_pages: tuple[tuple[str, int], ...] = ()
    # Two models' decode batches pipelined in one step and one CUDA graph (crosspool p2p):
    # one's attention runs while the other's experts run; see engine/pair_graphs.py.
    pipeline_models: bool = False
    # Data-parallel attention (--dp-size): this worker is replica dp_rank of dp_size attention
    # workers serving the same models; in crosspool they share one set of FFN servers, started
    # by replica 0, each replica linked to them through sockets in ffn_link_dir.
    dp_size: int = 1
    dp_rank: int = 0
    ffn_link_dir: str | None = None
    # The small-batch MoE path (kernels/crosspool_kernels/moe_small_batch.py,
    # --moe-small-batch): auto | on | off. auto: on CUDA at <= 2 tokens, where it beat the
    # fused-MoE GEMM on an H200 (benchmark/results/moe-small-batch-h200/); on: <= 8 tokens,
    # Triton anywhere (the interpreter on CPU). FFN server processes and models loaded while
    # serving always use auto.
    moe_small_batch: str = "auto"
    # Tensor / expert parallelism of every model over tp_size ranks (processes; GPUs
    # device..device+tp_size-1 on CUDA), ep_size expert groups among them
    # (engine/tensor_parallel.py, models/parallel.py).
    tp_size: int = 1
    ep_size: int = 1
    # Attention split over attention_split_size ranks (issue 16; options.ATTENTION_SPLITS):
    # seq spreads each request's KV pages over the ranks (memory/kv_split.py,
    # engine/seq_split.py); head is tensor parallelism with the KV heads divided (tp_size).
    attention_split: str = "none"
    attention_split_size: int = 1
    # The TP ranks' all-reduce (--tp-all-reduce): nccl, or symm-mem (torch symmetric memory,
    # two-shot, for bf16 tensors up to 2 MiB: decode steps; larger ones stay on NCCL).
    tp_all_reduce: str = "nccl"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def model(self, name: str) -> ModelEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def with_model(self, entry: ModelEntry, shares=None) -> EngineConfig:
        """This config serving one more model; `shares`: its experts per FFN server, where the
        config carries a placement."""
        if entry.name in self.model_names:
            raise ValueError(f"served_model_name: {entry.name!r} is already served")
        placement = self.ffn_placement
        if placement is not None:
            placement = placement + ((entry.name, tuple(tuple(s) for s in shares)),)
        return dataclasses.replace(self, models=self.models + (entry,),
                                   ffn_placement=placement)

    def without_model(self, name: str) -> EngineConfig:
        self.model(name)  # KeyError if not served
        placement = self.ffn_placement
        if placement is not None:
            placement = tuple(p for p in placement if p[0] != name)
        return dataclasses.replace(
            self, models=tuple(m for m in self.models if m.name != name),
            ffn_placement=placement,
            radix_cache_floor_pages=tuple(f for f in self.radix_cache_floor_pages
                                          if f[0] != name))

    @classmethod
    def build(
        cls,
        model_path: str | list[str],
        served_model_name: str | list[str] | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        context_length: int | None = None,
        max_running_requests: int = 64,
        chunked_prefill_size: int = 512,
        kv_page_bytes: int | None = None,
        kv_pages: int | None = None,
        kv_budget_bytes: int = 256 << 20,
        attention_backend: str = "auto",
        random_seed: int = 0,
        pool_mode: str = "monolithic",
        ffn_servers: int = 1,
        ffn_transport: str = "auto",
        ffn_device: str | None = None,
        dist_backend: str | None = None,
        pipeline_microbatches: int = 1,
        ffn_placement=None,
        disable_cuda_graph: bool = False,
        cuda_graph_max_bs: int = 32,
        cuda_graph_bs=None,
        cuda_graph_memory_bytes: int = 4 << 30,
        kv_page_backend: str = "auto",
        kv_reserve_pages: int | None = None,
        load_format: str = "auto",
        grammar_backend: str = "xgrammar",
        constrained_json_disable_any_whitespace: bool = False,
        grammar_jump_forward: bool = False,
        disable_radix_cache: bool = False,
        radix_cache_floor_pages: dict[str, int] | None = None,
        pipeline_models: bool = False,
        moe_small_batch: str = "auto",
        tp_size: int = 1,
        ep_size: int = 1,
        attention_split: str = "none",
        attention_split_size: int = 1,
    ) -> EngineConfig:
        paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path)
        if not paths:
            raise ValueError("model_path: give at least one checkpoint directory")
        names = _served_names(paths, served_model_name)
        entries = [model_entry(path, name, context_length) for name, path in zip(names, paths)]
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
        for key, value in (("max_running_requests", max_running_requests),
                           ("chunked_prefill_size", chunked_prefill_size)):
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        _choice("pool_mode", pool_mode, POOL_MODES)
        _choice("ffn_transport", ffn_transport, FFN_TRANSPORTS)
        _choice("kv_page_backend", kv_page_backend, KV_PAGE_BACKENDS)
        _choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        _choice("load_format", load_format, LOAD_FORMATS)
        _choice("grammar_backend", grammar_backend, GRAMMAR_BACKENDS)
        _choice("moe_small_batch", moe_small_batch, MOE_SMALL_BATCH)
        _choice("attention_split", attention_split, ATTENTION_SPLITS)
        split = _attention_split(attention_split, attention_split_size, entries, pool_mode,
                                 tp_size, pipeline_models, pipeline_microbatches)
        tp_size = split.pop("tp_size", tp_size)
        attention_backend = _attention_backend(attention_backend, device, dtype, entries)
        for key, value in (("ffn_servers", ffn_servers),
                           ("pipeline_microbatches", pipeline_microbatches),
                           ("cuda_graph_max_bs", cuda_graph_max_bs)):
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        ffn_device = ffn_device or device
        ffn_transport = _auto_transport(ffn_transport, pool_mode, device, ffn_device)
        dist_backend = _ffn_link(pool_mode, ffn_transport, device, ffn_device, dist_backend)
        if pool_mode == "crosspool" and ffn_transport == "p2p" and ffn_servers > 1 \
                and torch.device(ffn_device).type == "cuda":
            # NOTE: two processes spinning on one GPU are time-sliced, not run side by side.
            raise ValueError(f"ffn_transport: 'p2p' needs one FFN server per GPU, and "
                             f"ffn_device={ffn_device!r} holds all {ffn_servers}; use "
                             f"ffn_servers=1 (on CPU any number works)")
        return cls(tuple(entries), device, dtype, max_running_requests, chunked_prefill_size,
                   kv_page_bytes, kv_pages, kv_budget_bytes, attention_backend, random_seed,
                   pool_mode, ffn_servers, ffn_transport, ffn_device, dist_backend,
                   pipeline_microbatches, _placement(ffn_placement, names, ffn_servers),
                   cuda_graph=not disable_cuda_graph, cuda_graph_max_bs=cuda_graph_max_bs,
                   cuda_graph_bs=_graph_sizes(cuda_graph_bs),
                   cuda_graph_memory_bytes=cuda_graph_memory_bytes,
                   kv_page_backend=kv_page_backend,
                   kv_reserve_pages=_reserve_pages(kv_reserve_pages, device, entries),
                   load_format=load_format, grammar_backend=grammar_backend,
                   constrained_json_disable_any_whitespace=constrained_json_disable_any_whitespace,
                   grammar_jump_forward=grammar_jump_forward,
                   radix_cache=not disable_radix_cache,
                   radix_cache_floor_pages=_floors(radix_cache_floor_pages, names),
                   pipeline_models=pipeline_models, moe_small_batch=moe_small_batch,
                   **_parallel(tp_size, ep_size, entries, pool_mode, device,
                               pipeline_microbatches, pipeline_models, ffn_transport,
                               ffn_device),
                   **split)


def _attention_split(kind: str, size: int, entries: list[ModelEntry], pool_mode: str,
                     tp_size: int, pipeline_models: bool, microbatches: int) -> dict:
    """Checks --attention-split / --attention-split-size. `head` is tensor parallelism of
    size ranks with no KV head replicated (tp_size); `seq` needs every rank's pool whole."""
    if kind == "none" or size == 1:
        return {"attention_split": "none", "attention_split_size": 1}
    if size < 1:
        raise ValueError(f"attention_split_size: must be >= 1, got {size}")
    if kind == "head":
        if tp_size not in (1, size):
            raise ValueError(f"attention_split head over {size} ranks is tp_size {size}, but "
                             f"tp_size {tp_size} was given")
        for e in entries:
            if e.spec.kv_latent or e.spec.num_kv_heads % size:
                what = "one latent KV head (MLA)" if e.spec.kv_latent else \
                    f"{e.spec.num_kv_heads} KV heads"
                raise ValueError(f"attention_split head over {size} ranks: model {e.name} has "
                                 f"{what}, which {size} ranks cannot divide without "
                                 f"replicating; use attention_split seq")
        return {"attention_split": "head", "attention_split_size": size, "tp_size": size}
    refused = [(tp_size > 1, ("tp_size > 1 (the split's ranks divide the experts already; "
                              "attention stays whole on each)")),
               (pool_mode == "static", "pool_mode 'static' (per-rank quotas are not wired)"),
               (pipeline_models, "pipeline_models"),
               (microbatches > 1, "pipeline_microbatches > 1")]
    for hit, what in refused:
        if hit:
            raise ValueError(f"attention_split seq: not supported with {what}")
    return {"attention_split": "seq", "attention_split_size": size}


def _parallel(tp_size: int, ep_size: int, entries: list[ModelEntry], pool_mode: str,
              device: str, microbatches: int, pipeline_models: bool, ffn_transport: str = "local",
              ffn_device: str | None = None) -> dict:
    """Checks --tp-size / --ep-size against the models and the other options; refuses what
    tensor parallelism does not run with yet."""
    from sglang_crosspool.models.parallel import ParallelError, ShardPlan

    if tp_size == 1 and ep_size == 1:
        return {"tp_size": 1, "ep_size": 1}
    try:
        plan = ShardPlan(0, tp_size, ep_size)
        for entry in entries:  # crosspool: the experts are the weights pool's to divide
            plan.spec_heads(entry.spec) if pool_mode == "crosspool" else plan.check(entry.spec)
    except ParallelError as e:
        raise ValueError(f"tp_size/ep_size: {e}") from None
    dev, ffn = torch.device(device), torch.device(ffn_device or device)
    first = dev.index or 0
    refused = [
        (pool_mode == "crosspool" and ep_size > 1,
         "crosspool and ep_size > 1 (its FFN servers divide the experts: --ffn-servers)"),
        (pool_mode == "crosspool" and ffn_transport in ("dist", "nccl"),
         (f"crosspool over ffn_transport {ffn_transport!r} (its torch.distributed group "
          "would be the ranks' own); use shm, p2p or local")),
        (pool_mode == "crosspool" and dev.type == ffn.type == "cuda" and ffn_transport != "local"
         and first < (ffn.index or 0) < first + tp_size,
         (f"the FFN servers on {ffn_device}, one of the ranks' GPUs (cuda:{first}.."
          f"cuda:{first + tp_size - 1}); put them on another")),
        (microbatches > 1, "pipeline_microbatches > 1"),
        (pipeline_models, "pipeline_models"),
    ]
    for hit, what in refused:
        if hit:
            raise ValueError(f"tp_size {tp_size} / ep_size {ep_size}: not supported with {what}")
    if dev.type == "cuda" and torch.cuda.is_available() and \
            (dev.index or 0) + tp_size > torch.cuda.device_count():
        raise ValueError(f"tp_size {tp_size}: ranks use {device} and the next GPUs, but only "
                         f"{torch.cuda.device_count()} are visible")
    return {"tp_size": tp_size, "ep_size": ep_size}


def model_entry(path, name: str, context_length: int | None = None) -> ModelEntry:
    """One served model from its checkpoint's config.json (weights are not read)."""
    spec, _ = resolve(path)
    ctx = min(context_length or spec.max_position_embeddings, spec.max_position_embeddings)
    return ModelEntry(name, str(path), spec, ctx)


def _auto_transport(transport: str, pool_mode: str, device: str, ffn_device: str) -> str:
    """`auto`: the p2p crossing when crosspool's FFN servers run on another GPU than
    attention; otherwise the in-process `local` one."""
    if transport != "auto":
        return transport
    attn, ffn = torch.device(device), torch.device(ffn_device)
    if (pool_mode == "crosspool" and attn.type == ffn.type == "cuda"
            and (attn.index or 0) != (ffn.index or 0)):
        return "p2p"
    return "local"


def _ffn_link(pool_mode: str, transport: str, device: str, ffn_device: str,
              backend: str | None) -> str:
    """The torch.distributed backend, after refusing FFN links that cannot work on these
    devices (here, before any FFN server process starts)."""
    if transport == "nccl":
        if backend not in (None, "nccl"):
            raise ValueError(f"dist_backend: {backend!r} contradicts ffn_transport 'nccl'")
        backend = "nccl"
    backend = backend or ("gloo" if device == "cpu" else "nccl")
    if pool_mode != "crosspool":
        return backend
    where = f"device={device!r}, ffn_device={ffn_device!r}"
    attn, ffn = torch.device(device), torch.device(ffn_device)
    on_cpu = attn.type != "cuda" or ffn.type != "cuda"
    if transport == "cuda-ipc" and on_cpu:
        raise ValueError(f"ffn_transport: 'cuda-ipc' shares CUDA memory between processes and "
                         f"needs CUDA devices on both sides ({where}); on CPU use 'shm'")
    if transport == "cuda-ipc" and (attn.index or 0) != (ffn.index or 0):
        # NOTE: retired across GPUs: torch's IPC reopens a buffer on the exporter's device
        # index, and the server on GPU 1 crashed (SIGSEGV) on 2xH200. 'p2p' is that path.
        raise ValueError(f"ffn_transport: 'cuda-ipc' works only with the FFN servers on the "
                         f"attention GPU ({where}); across GPUs use 'p2p'")
    if transport == "p2p" and attn.type != ffn.type:
        raise ValueError(f"ffn_transport: 'p2p' needs both sides on CUDA or both on CPU ({where})")
    if transport == "p2p" and attn.type == "cuda" and (attn.index or 0) == (ffn.index or 0):
        raise ValueError(f"ffn_transport: 'p2p' spins on device flags, which needs the FFN "
                         f"servers on another GPU than attention ({where}); put them on "
                         f"ffn_device='cuda:1' or use 'local' on one GPU")
    if transport in ("dist", "nccl") and backend == "nccl":
        if on_cpu:
            raise ValueError(f"ffn_transport: NCCL needs CUDA devices on both sides ({where}); "
                             f"on CPU use ffn_transport='dist' (gloo)")
        if (attn.index or 0) == (ffn.index or 0):
            raise ValueError(f"ffn_transport: NCCL cannot join two processes on one GPU "
                             f"({where}); put the FFN servers on another GPU "
                             f"(ffn_device='cuda:1') or use 'cuda-ipc'")
    return backend


def _attention_backend(name: str, device: str, dtype: str, entries: list[ModelEntry]) -> str:
    """`auto` resolved for the device, dtype and head sizes: the config holds what runs."""
    from sglang_crosspool.engine.attention import resolve_attention_backend

    return resolve_attention_backend(name, device, DTYPES[dtype],
                                     [entry.spec.head_dim for entry in entries])


def _graph_sizes(sizes) -> tuple[int, ...] | None:
    if sizes is None:
        return None
    sizes = tuple(sorted({int(b) for b in sizes}))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"cuda_graph_bs: batch sizes must be >= 1, got {sizes}")
    return sizes


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _reserve_pages(pages: int | None, device: str, entries: list[ModelEntry]) -> int:
    """The KV page reserve. Default: none off CUDA (a simulated page costs nothing to create);
    on CUDA, RESERVE_BLOCKS blocks of the served model with the most layers (a block is 2
    pages a layer), so that a few new blocks map without cuMemCreate. The pool caps it at the
    budget, which it is part of."""
    if pages is not None:
        if pages < 0:
            raise ValueError(f"kv_reserve_pages: must be >= 0, got {pages}")
        return pages
    if torch.device(device).type != "cuda":
        return 0
    return RESERVE_BLOCKS * max(2 * entry.spec.num_layers for entry in entries)


def _served_names(paths: list, names) -> list[str]:
    if names is None:
        names = [Path(p).name for p in paths]
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    if len(names) != len(paths):
        raise ValueError(f"served_model_name: {len(names)} names for {len(paths)} models")
    if len(set(names)) != len(names):
        raise ValueError(f"served_model_name: names must be unique, got {names}")
    return names


def _floors(floors: dict[str, int] | None, names: list[str]) -> tuple:
    """Checks the prefix cache's per-model floors (pages) against the served models."""
    for name, pages in (floors or {}).items():
        if name not in names:
            raise ValueError(f"radix_cache_floor_pages: {name!r} is not a served model")
        if not isinstance(pages, int) or pages < 0:
            raise ValueError(f"radix_cache_floor_pages: {name!r} needs pages >= 0, got {pages}")
    return tuple(sorted((floors or {}).items()))


def _placement(placement, names: list[str], servers: int) -> tuple | None:
    """Checks a given expert placement (e.g. from a plan) against the served models."""
    if placement is None:
        return None
    table = dict(placement)
    for name in names:
        if name not in table:
            raise ValueError(f"ffn_placement: no placement for model {name!r}")
        if len(table[name]) != servers:
            raise ValueError(f"ffn_placement: model {name!r} is placed on {len(table[name])} "
                             f"servers, ffn_servers is {servers}")
    return tuple((name, tuple(tuple(s) for s in table[name])) for name in names)
