"""Command-line and YAML options of `python -m sglang_crosspool.launch`, with SGLang's flag names.

In: argv (and an optional `--config FILE` YAML whose keys are the flags' names, which the
command line overrides). Out: one frozen `ServerArgs`, with every derived value (the models to
serve, the KV page budget, IPC paths unique to this server) computed once in `from_cli`; and
`engine_config()`, the frozen `EngineConfig` the scheduler process builds its core from.

Models: `--model-path P` (repeatable; served under `--served-model-name`s or the folder names),
`--model NAME=PATH` (repeatable), a YAML `models:` list of `{name, path}` or paths, or nothing:
then the built-in demo models (tiny random-weight MoE checkpoints, made once into a cache folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sglang_crosspool.options import (
    ATTENTION_BACKENDS,
    ATTENTION_SPLITS,
    DEFAULT_PAGE_BYTES,
    FFN_TRANSPORTS,
    GRAMMAR_BACKENDS,
    KV_PAGE_BACKENDS,
    MOE_SMALL_BATCH,
    POOL_MODES,
)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16")
# models/checkpoint.LOAD_FORMATS, spelled out here so that parsing flags imports no torch.
LOAD_FORMATS = ("auto", "safetensors", "dummy")
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16"}


class ServerArgsError(ValueError):
    """Options that cannot work together; the message names the flag."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: str


@dataclass(frozen=True)
class ServerArgs:
    models: tuple[ModelSource, ...]
    demo_models: bool = False  # the models are the built-in demo models
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    log_level: str = "info"
    device: str = "cpu"
    dtype: str = "auto"
    context_length: int | None = None
    load_format: str = "auto"  # dummy: random weights from config.json (no weight files)
    max_running_requests: int = 64
    max_queued_requests: int | None = None
    max_total_tokens: int | None = None
    chunked_prefill_size: int = 512
    mem_fraction_static: float | None = None
    random_seed: int = 0
    attention_backend: str = "auto"  # resolved by EngineConfig.build
    moe_small_batch: str = "auto"  # the small-batch MoE path: auto (CUDA) | on | off
    grammar_backend: str = "xgrammar"  # none: constrained requests get 400
    constrained_json_disable_any_whitespace: bool = False
    grammar_jump_forward: bool = False
    disable_cuda_graph: bool = False
    disable_radix_cache: bool = False  # no prefix cache: every prompt is computed whole
    # ((model, pages), ...): cached pages other models cannot evict (--radix-cache-floor, or
    # the plan's cached_prefix)
    radix_cache_floor_pages: tuple[tuple[str, int], ...] = ()
    cuda_graph_max_bs_decode: int | None = None
    pool_mode: str = "monolithic"
    ffn_servers: int = 1
    ffn_transport: str = "auto"
    ffn_device: str | None = None  # crosspool: where FFN servers run (default: --device)
    devices: tuple[str, ...] = ()  # one attention worker per device (--devices); () = --device
    dp_size: int = 1  # data-parallel attention: every model on each of the dp_size devices
    ffn_placement: tuple | None = None  # from --plan: ((model, ((expert ids), ...)), ...)
    plan_path: str | None = None  # --plan
    # From --plan's device layout, per entry of `devices`: the models placed there, its KV
    # pages and its index among the plan's devices; () when the router places the models.
    device_models: tuple[tuple[str, ...], ...] = ()
    device_kv_pages: tuple[int, ...] = ()
    plan_device_index: tuple[int, ...] = ()
    pipeline_microbatches: int = 1
    pipeline_models: bool = False
    attention_split: str = "none"  # none | seq | head over attention_split_size ranks
    attention_split_size: int = 1
    tp_size: int = 1  # tensor parallelism: every model over --device and the next tp_size-1
    ep_size: int = 1  # expert groups among the tp_size ranks (expert parallelism)
    tp_all_reduce: str = "nccl"  # nccl | symm-mem (--tp-all-reduce)
    kv_pages: int | None = None
    kv_page_bytes: int | None = None
    kv_budget_bytes: int = 256 << 20
    kv_page_backend: str = "auto"
    kv_reserve_pages: int | None = None  # None: the engine config's default
    skip_server_warmup: bool = False
    max_n: int = 128  # samples per prompt (`n`); OpenAI's own bound
    max_request_bytes: int = 32 << 20  # larger bodies get 413
    shutdown_timeout: float = 5.0  # seconds in-flight requests get on SIGTERM/SIGINT
    stream_interval: int = 1  # output tokens per stream chunk, after the first
    default_model: str | None = None
    ipc_dir: str = ""  # a fresh folder per server: the ZeroMQ socket files live here
    launch_argv: tuple[str, ...] = field(default_factory=tuple)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ipc_path(self, role: str) -> str:
        return f"ipc://{os.path.join(self.ipc_dir, role)}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["models"] = [{"name": m.name, "path": m.path} for m in self.models]
        if d["api_key"]:
            d["api_key"] = "***"
        return d

    # -- the engine's config -------------------------------------------------------------

    def engine_config(self):
        """The frozen engine config (reads each checkpoint's config.json, not its weights)."""
        from sglang_crosspool.config import EngineConfig

        config = EngineConfig.build(
            [m.path for m in self.models],
            served_model_name=[m.name for m in self.models],
            device=self.devices[0] if self.devices else self.device, dtype=self.dtype,
            context_length=self.context_length, max_running_requests=self.max_running_requests,
            chunked_prefill_size=self.chunked_prefill_size,
            kv_page_bytes=self.kv_page_bytes, kv_pages=self.kv_pages,
            kv_budget_bytes=self.kv_budget_bytes, attention_backend=self.attention_backend,
            random_seed=self.random_seed, pool_mode=self.pool_mode,
            ffn_servers=self.ffn_servers, ffn_transport=self.ffn_transport,
            ffn_device=self.ffn_device,
            ffn_placement=self.ffn_placement, pipeline_microbatches=self.pipeline_microbatches,
            pipeline_models=self.pipeline_models,
            disable_cuda_graph=self.disable_cuda_graph,
            disable_radix_cache=self.disable_radix_cache,
            radix_cache_floor_pages=dict(self.radix_cache_floor_pages),
            cuda_graph_max_bs=self.cuda_graph_max_bs_decode or 32,
            kv_page_backend=self.kv_page_backend, kv_reserve_pages=self.kv_reserve_pages,
            load_format=self.load_format, grammar_backend=self.grammar_backend,
            constrained_json_disable_any_whitespace=self.constrained_json_disable_any_whitespace,
            grammar_jump_forward=self.grammar_jump_forward,
            moe_small_batch=self.moe_small_batch,
            attention_split=self.attention_split,
            attention_split_size=self.attention_split_size,
            tp_size=self.tp_size, ep_size=self.ep_size)
        if self.max_total_tokens is not None and self.kv_pages is None:
            pages = kv_pages_for_tokens(config, self.max_total_tokens)
            config = dataclasses.replace(config, kv_pages=pages)
        if self.dp_size > 1:
            config = dataclasses.replace(config, dp_size=self.dp_size, ffn_link_dir=self.ipc_dir)
        if self.tp_all_reduce != config.tp_all_reduce:
            config = dataclasses.replace(config, tp_all_reduce=self.tp_all_reduce)
        return config

    # -- parsing ---------------------------------------------------------------------------

    @classmethod
    def from_cli(cls, argv: list[str] | None = None, *, make_demo: bool = True) -> ServerArgs:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.config:
            defaults = _read_yaml(args.config, parser)
            parser.set_defaults(**defaults)
            args = parser.parse_args(argv)
        try:
            return cls.from_namespace(args, make_demo=make_demo, argv=argv)
        except ServerArgsError as e:
            parser.error(str(e))

    @classmethod
    def from_namespace(cls, a: argparse.Namespace, *, make_demo: bool = True,
                       argv: list[str] | None = None) -> ServerArgs:
        _check_dp(a)
        if not a.plan and a.dp_size == 1 and len(_devices(a.devices)) > 1 and \
                all(d.startswith("cuda") for d in _devices(a.devices)):
            a.pool_mode = a.pool_mode or "monolithic"
            a.plan = _startup_plan(a, make_demo)
        plan, layout = _apply_plan(a) if a.plan else (None, PlanLayout())
        a.pool_mode = a.pool_mode or "monolithic"
        models, demo = _resolve_models(a, make_demo)
        placed = {name for names in layout.models for name in names}
        unplaced = [m.name for m in models if layout.models and m.name not in placed]
        if unplaced:
            raise ServerArgsError(f"--plan: its {a.pool_mode} mode does not place model(s) "
                                  f"{', '.join(unplaced)}; plan them, or serve fewer models")
        floors = _floor_flags(a.radix_cache_floor)
        strangers = [name for name, _ in floors if name not in {m.name for m in models}]
        if strangers:
            raise ServerArgsError(f"--radix-cache-floor: no served model named "
                                  f"{', '.join(strangers)}")
        dtype = _DTYPE_ALIASES.get(a.dtype, a.dtype)
        for flag, value, low in (("--port", a.port, 0), ("--max-running-requests",
                                 a.max_running_requests, 1), ("--chunked-prefill-size",
                                 a.chunked_prefill_size, 1)):
            if value < low:
                raise ServerArgsError(f"{flag}: must be >= {low}, got {value}")
        for flag, value in (("--max-total-tokens", a.max_total_tokens), ("--kv-pages", a.kv_pages),
                            ("--kv-page-bytes", a.kv_page_bytes),
                            ("--context-length", a.context_length),
                            ("--max-queued-requests", a.max_queued_requests),
                            ("--ffn-servers", a.ffn_servers),
                            ("--pipeline-microbatches", a.pipeline_microbatches),
                            ("--max-n", a.max_n), ("--max-request-bytes", a.max_request_bytes),
                            ("--stream-interval", a.stream_interval)):
            if value is not None and value < 1:
                raise ServerArgsError(f"{flag}: must be >= 1, got {value}")
        if not a.shutdown_timeout >= 0:
            raise ServerArgsError(f"--shutdown-timeout: must be >= 0, got {a.shutdown_timeout}")
        if a.kv_reserve_pages is not None and a.kv_reserve_pages < 0:
            raise ServerArgsError(f"--kv-reserve-pages: must be >= 0, got {a.kv_reserve_pages}")
        if a.kv_pages is not None and a.max_total_tokens is not None:
            raise ServerArgsError("--kv-pages and --max-total-tokens both set the KV budget; "
                                  "give one")
        if a.mem_fraction_static is not None and not 0 < a.mem_fraction_static < 1:
            raise ServerArgsError(f"--mem-fraction-static: must be in (0, 1), got "
                                  f"{a.mem_fraction_static}")
        default = a.default_model
        if default is not None and default not in [m.name for m in models]:
            raise ServerArgsError(f"--default-model: {default!r} is not one of the served "
                                  f"models ({', '.join(m.name for m in models)})")
        cuda_graph_bs = a.cuda_graph_max_bs_decode or a.cuda_graph_max_bs
        # Over several devices (--devices), the first one's memory sets every worker's budget.
        budget = _kv_budget_bytes((_devices(a.devices) or (a.device,))[0], a.mem_fraction_static,
                                  models, a.load_format, dtype)
        # Created by the launcher; the port, pid and a random tag keep two servers apart.
        ipc_dir = os.path.join(tempfile.gettempdir(), f"sglang_crosspool-{a.port}-{os.getpid()}-"
                               f"{uuid.uuid4().hex[:8]}")
        return cls(
            models=tuple(models), demo_models=demo, host=a.host, port=a.port, api_key=a.api_key,
            log_level=a.log_level, device=a.device, dtype=dtype,
            context_length=a.context_length, load_format=a.load_format,
            max_running_requests=a.max_running_requests,
            max_queued_requests=a.max_queued_requests, max_total_tokens=a.max_total_tokens,
            chunked_prefill_size=a.chunked_prefill_size,
            mem_fraction_static=a.mem_fraction_static, random_seed=a.random_seed,
            attention_backend=a.attention_backend, grammar_backend=a.grammar_backend,
            moe_small_batch=a.moe_small_batch,
            constrained_json_disable_any_whitespace=a.constrained_json_disable_any_whitespace,
            grammar_jump_forward=a.grammar_jump_forward,
            disable_cuda_graph=a.disable_cuda_graph, disable_radix_cache=a.disable_radix_cache,
            radix_cache_floor_pages=floors,
            cuda_graph_max_bs_decode=cuda_graph_bs, pool_mode=a.pool_mode,
            ffn_servers=a.ffn_servers, ffn_transport=a.ffn_transport,
            ffn_device=a.ffn_device, devices=_devices(a.devices), dp_size=a.dp_size,
            ffn_placement=plan, plan_path=a.plan, device_models=layout.models,
            device_kv_pages=layout.kv_pages, plan_device_index=layout.plan_index,
            pipeline_microbatches=a.pipeline_microbatches, pipeline_models=a.pipeline_models,
            attention_split=a.attention_split, attention_split_size=a.attention_split_size,
            tp_size=_tp_flags(a, layout), ep_size=a.ep_size, tp_all_reduce=a.tp_all_reduce,
            kv_pages=a.kv_pages,
            kv_page_bytes=a.kv_page_bytes, kv_budget_bytes=budget,
            kv_page_backend=a.kv_page_backend, kv_reserve_pages=a.kv_reserve_pages,
            skip_server_warmup=a.skip_server_warmup, max_n=a.max_n,
            max_request_bytes=a.max_request_bytes, shutdown_timeout=a.shutdown_timeout,
            stream_interval=a.stream_interval, default_model=default, ipc_dir=ipc_dir,
            launch_argv=tuple(argv) if argv is not None else ())


def _check_dp(a: argparse.Namespace) -> None:
    """--dp-size N: N attention workers (one per device of --devices, cuda:0..N-1 by default
    on CUDA), each serving every model."""
    if a.dp_size < 1:
        raise ServerArgsError(f"--dp-size: must be >= 1, got {a.dp_size}")
    if a.dp_size == 1:
        return
    if a.plan:
        raise ServerArgsError("--dp-size with --plan is not supported yet: a plan places "
                              "each model on its devices itself")
    if a.tp_size > 1 or a.ep_size > 1 or a.attention_split != "none":
        raise ServerArgsError("--dp-size with --tp-size, --ep-size or --attention-split is not "
                              "supported yet: each replica would put its ranks on the GPUs "
                              "after its own")
    devices = _devices(a.devices)
    if not devices and a.device.startswith("cuda"):
        first = int(a.device.split(":")[1]) if ":" in a.device else 0
        devices = tuple(f"cuda:{first + i}" for i in range(a.dp_size))
        a.devices = ",".join(devices)
    if len(devices) != a.dp_size:
        raise ServerArgsError(f"--dp-size {a.dp_size}: needs --devices with {a.dp_size} "
                              f"entries (cpu,cpu,... on CPU), got {len(devices)}")
    if a.pool_mode == "crosspool" and a.ffn_transport not in ("shm", "cuda-ipc"):
        raise ServerArgsError(f"--dp-size {a.dp_size} with crosspool: the replicas share the "
                              "FFN servers over --ffn-transport shm (or cuda-ipc on one GPU), "
                              f"not {a.ffn_transport!r}")
    ffn_device = a.ffn_device or devices[0]
    if a.pool_mode == "crosspool" and a.ffn_transport == "cuda-ipc" and \
            any(d != ffn_device for d in devices):
        raise ServerArgsError(f"--dp-size {a.dp_size} with --ffn-transport cuda-ipc: it links "
                              f"processes on one GPU only, and the replicas run on "
                              f"{', '.join(devices)} with the FFN servers on {ffn_device}; use "
                              "--ffn-transport shm")


def _tp_flags(a: argparse.Namespace, layout) -> int:
    """--tp-size / --ep-size: the ranks of one attention worker (EngineConfig checks them
    against the models); one worker only, for now."""
    for flag, value in (("--tp-size", a.tp_size), ("--ep-size", a.ep_size)):
        if value < 1:
            raise ServerArgsError(f"{flag}: must be >= 1, got {value}")
    if (a.tp_size > 1 or a.ep_size > 1) and (len(_devices(a.devices)) > 1 or layout.models):
        raise ServerArgsError("--tp-size/--ep-size: one attention worker per server for now "
                              "(its ranks on --device and the next GPUs); not with several "
                              "--devices or a plan's device layout")
    return a.tp_size


def _devices(text: str | None) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in (text or "").split(",") if d.strip())
    for d in devices:
        if not (d == "cpu" or d == "cuda" or d.startswith("cuda:")):
            raise ServerArgsError(f"--devices: {d!r} is not cpu, cuda or cuda:N")
    return devices


@dataclass(frozen=True)
class PlanLayout:
    """Where a plan puts the attention workers: per worker (an entry of --devices), its
    models, KV pages and index among the plan's devices."""

    models: tuple[tuple[str, ...], ...] = ()
    kv_pages: tuple[int, ...] = ()
    plan_index: tuple[int, ...] = ()


def _apply_plan(a: argparse.Namespace) -> tuple[tuple | None, PlanLayout]:
    """Fills unset options from a plan.json; returns its expert placement (crosspool) and
    its device layout. The layout applies when --devices is given or --device is a GPU and
    the plan is for several devices; otherwise the whole plan runs on --device."""
    from sglang_crosspool.planner.errors import PlanError
    from sglang_crosspool.planner.schema import load_plan

    try:
        plan = load_plan(a.plan)
    except PlanError as e:
        raise ServerArgsError(f"--plan: {e}") from None
    a.pool_mode = a.pool_mode or "crosspool"
    mode = plan.mode(a.pool_mode)
    if not mode.served:
        raise ServerArgsError(f"--plan: its {a.pool_mode} mode serves no model ("
                              + "; ".join(f"{m.name}: {m.reason}" for m in mode.models) + ")")
    if not (a.model_path or a.model or a.models_from_config):
        a.model = [f"{name}={plan.model(name).path}" for name in mode.served]
    if a.kv_page_bytes is None:
        a.kv_page_bytes = plan.inputs.page_bytes
    kv_devices = [d for d in mode.devices if d.index in mode.kv_devices]
    if a.kv_pages is None and a.max_total_tokens is None and kv_devices:
        a.kv_pages = int(kv_devices[0].kv_pages)
    layout = _plan_layout(a, plan, mode)
    if not a.radix_cache_floor:  # the plan's floors, where its traffic gave a cached_prefix
        a.radix_cache_floor = [f"{row.name}={int(row.cache_floor_pages)}" for row in mode.models
                               if row.fits and row.cache_floor_pages is not None
                               and int(row.cache_floor_pages) > 0]
    if a.pool_mode != "crosspool" or mode.placement is None:
        return None, layout
    a.ffn_servers = len(mode.weights_devices)
    table = mode.placement.table()
    return tuple((name, tuple(tuple(e) for e in shares)) for name, shares in table.items()), \
        layout


def _tp_layout(a: argparse.Namespace, mode, devices: list[str]) -> PlanLayout:
    """A plan that spreads every model over all its devices (`--monolithic-layout tp`): one
    attention worker, tensor parallel over those devices (--tp-size = their number), each
    rank's KV pool the plan's per-device pages."""
    n = len(devices)
    spread = [row for row in mode.models if row.fits]
    if any(len(row.devices) != n for row in spread):
        raise ServerArgsError(f"--plan: {a.pool_mode} spreads some models over several devices "
                              f"and not others; the server runs one tensor-parallel group over "
                              f"all {n} (plan with `--monolithic-layout tp` or `packed`)")
    base = devices[0]
    expected = devices if set(devices) == {"cpu"} else _next_gpus(base, n)  # CPU stand-ins
    if devices != expected:
        raise ServerArgsError(f"--plan: tensor parallelism runs on {base} and the next GPUs "
                              f"({','.join(expected)}), not {','.join(devices)}")
    if a.tp_size not in (1, n):
        raise ServerArgsError(f"--tp-size {a.tp_size}: the plan spreads every model over {n} "
                              f"devices")
    a.tp_size, a.device, a.devices = n, base, None  # KV pages: the plan's (per device)
    return PlanLayout()


def _next_gpus(base: str, n: int) -> list[str]:
    index = int(base.split(":")[1]) if ":" in base else 0
    return [f"cuda:{index + i}" for i in range(n)]


def _floor_flags(specs: list[str] | None) -> tuple[tuple[str, int], ...]:
    floors = {}
    for spec in specs or []:
        name, sep, pages = spec.partition("=")
        if not sep or not name or not pages.isdigit():
            raise ServerArgsError(f"--radix-cache-floor: expected NAME=PAGES, got {spec!r}")
        floors[name] = int(pages)
    return tuple(sorted(floors.items()))


def _startup_plan(a: argparse.Namespace, make_demo: bool) -> str:
    """The plan a multi-GPU launch without --plan makes of its --model flags and the GPUs of
    --devices (their memory, --mem-fraction-static or the planner's default, the KV page
    size), written next to the server's other files; returns its path."""
    import torch

    from sglang_crosspool.planner import PlanError, build_plan, to_json
    from sglang_crosspool.planner.plan import DEFAULT_MEM_FRACTION
    from sglang_crosspool.planner.plan import DEFAULT_PAGE_BYTES as PLAN_PAGE_BYTES

    models, _ = _resolve_models(a, make_demo)
    devices = _devices(a.devices)
    memory = min(torch.cuda.get_device_properties(torch.device(d)).total_memory
                 for d in devices)
    dtype = _DTYPE_ALIASES.get(a.dtype, a.dtype)
    try:
        plan = build_plan([m.path for m in models], len(devices), memory,
                          dtype="bfloat16" if dtype == "auto" else dtype,
                          mem_fraction_static=a.mem_fraction_static or DEFAULT_MEM_FRACTION,
                          page_bytes=a.kv_page_bytes or PLAN_PAGE_BYTES,
                          served_names=[m.name for m in models])
    except PlanError as e:
        raise ServerArgsError(f"--devices: planning the models over {len(devices)} GPUs: "
                              f"{e}") from None
    path = Path(tempfile.gettempdir()) / f"sglang_crosspool-plan-{os.getpid()}-" \
        f"{uuid.uuid4().hex[:8]}.json"
    path.write_text(to_json(plan))
    return str(path)


def _plan_layout(a: argparse.Namespace, plan, mode) -> PlanLayout:
    n = plan.inputs.devices
    given = _devices(a.devices)
    if not given and (n < 2 or not a.device.startswith("cuda")):
        return PlanLayout()
    devices = list(given) or [f"cuda:{i}" for i in range(n)]
    if len(devices) != n:
        raise ServerArgsError(f"--devices: the plan is for {n} devices, got {len(devices)} "
                              f"({','.join(devices)})")
    if a.pool_mode == "crosspool":
        if len(mode.kv_devices) != 1:
            raise ServerArgsError(
                f"--plan: its crosspool mode puts attention on {len(mode.kv_devices)} KV-pool "
                "devices; attention replicas sharing one weights pool are not supported yet "
                "(plan for fewer devices, or use monolithic)")
        ffn = {devices[d] for d in mode.weights_devices}
        if len(ffn) != 1:
            raise ServerArgsError(
                f"--plan: its weights pool spans {len(ffn)} devices ({', '.join(sorted(ffn))}); "
                "FFN servers on several devices are not supported yet")
        a.ffn_device = a.ffn_device or ffn.pop()
        kv = mode.kv_devices[0]
        a.devices = devices[kv]
        return PlanLayout((tuple(mode.served),), (int(mode.devices[kv].kv_pages),), (kv,))
    if any(row.fits and len(row.devices) > 1 for row in mode.models):
        return _tp_layout(a, mode, devices)
    used = [d for d in mode.devices if d.holds]
    a.devices = ",".join(devices[d.index] for d in used)
    return PlanLayout(tuple(tuple(d.holds) for d in used),
                      tuple(int(d.kv_pages) for d in used), tuple(d.index for d in used))


def kv_pages_for_tokens(config, tokens: int) -> int:
    """Pages that let any one served model hold `tokens` tokens of KV (--max-total-tokens)."""
    import torch

    page_bytes = config.kv_page_bytes or DEFAULT_PAGE_BYTES.get(torch.device(config.device).type,
                                                                4096)
    elem = torch.empty((), dtype=config.torch_dtype).element_size()
    pages = 1
    for entry in config.models:
        s = entry.spec
        block_tokens = max(1, page_bytes // (s.num_kv_heads * s.head_dim * elem))
        ranges = 1 if s.kv_latent else 2  # MLA: one latent range per layer, no V
        pages = max(pages, math.ceil(tokens / block_tokens) * ranges * s.num_layers)
    return pages


def _kv_budget_bytes(device: str, fraction: float | None, models: list[ModelSource],
                     load_format: str = "auto", dtype: str = "auto") -> int:
    """--mem-fraction-static on CUDA: that share of the device, less the checkpoints' weights
    (with --load-format dummy, the weights config.json implies in the serving dtype)."""
    default = ServerArgs.__dataclass_fields__["kv_budget_bytes"].default
    if fraction is None or not device.startswith("cuda"):
        return default
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if load_format == "dummy":
        weights = _config_weight_bytes(models, "bfloat16" if dtype == "auto" else dtype)
    else:
        weights = sum(f.stat().st_size for m in models
                      for f in Path(m.path).glob("*.safetensors"))
    budget = int(total * fraction) - weights
    if budget <= 0:
        raise ServerArgsError(f"--mem-fraction-static {fraction}: the weights ({weights} bytes) "
                              f"leave no KV budget on {device}")
    return budget


def _config_weight_bytes(models: list[ModelSource], dtype: str) -> int:
    from sglang_crosspool.models.config import CheckpointError
    from sglang_crosspool.models.registry import resolve
    from sglang_crosspool.planner.errors import PlanError
    from sglang_crosspool.planner.weights import model_weights

    weights = 0
    for m in models:
        try:
            weights += model_weights(resolve(m.path)[0], dtype, m.name).total.value
        except (CheckpointError, PlanError) as e:
            raise ServerArgsError(f"--load-format dummy: model {m.name!r}: {e}") from None
    return weights


def _resolve_models(a: argparse.Namespace, make_demo: bool) -> tuple[list[ModelSource], bool]:
    models: list[ModelSource] = []
    paths = list(a.model_path or [])
    names = list(a.served_model_name or [])
    if names and len(names) != len(paths):
        raise ServerArgsError(f"--served-model-name: {len(names)} names for {len(paths)} "
                              "--model-path values")
    for i, path in enumerate(paths):
        models.append(ModelSource(names[i] if names else Path(path).name or path, str(path)))
    for spec in a.model or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ServerArgsError(f"--model: expected NAME=PATH, got {spec!r}")
        models.append(ModelSource(name, path))
    models.extend(a.models_from_config or [])
    demo = not models
    if demo:
        from sglang_crosspool.server.demo_models import DEMO_MODELS, ensure_demo_models

        if make_demo:
            paths_by_name = ensure_demo_models()
            models = [ModelSource(n, str(p)) for n, p in paths_by_name.items()]
        else:
            models = [ModelSource(n, "") for n in DEMO_MODELS]
    seen = set()
    for m in models:
        if m.name in seen:
            raise ServerArgsError(f"--model/--served-model-name: the name {m.name!r} is used twice")
        seen.add(m.name)
        if not demo and not Path(m.path).is_dir():
            raise ServerArgsError(f"model {m.name!r}: {m.path} is not a checkpoint folder")
    return models, demo


def _read_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--config {path}: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    dests = {a.dest: a for a in parser._actions}
    out: dict = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest == "models":
            out["models_from_config"] = _yaml_models(path, value, parser)
            continue
        if dest not in dests or dest in ("help", "config"):
            parser.error(f"--config {path}: unknown option {key!r}")
        action = dests[dest]
        if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
            value = [value]
        out[dest] = value
    return out


def _yaml_models(path: str, value, parser) -> list[ModelSource]:
    if not isinstance(value, list):
        parser.error(f"--config {path}: models: expected a list")
    base = Path(path).resolve().parent
    out = []
    for item in value:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item:
            parser.error(f"--config {path}: models: each entry needs a path, got {item!r}")
        p = Path(os.path.expanduser(str(item["path"])))
        p = p if p.is_absolute() else base / p
        out.append(ModelSource(str(item.get("name") or p.name), str(p)))
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sglang_crosspool.launch",
        description="Serve many MoE models behind SGLang's native and OpenAI HTTP APIs. "
                    "With no model given, serves the built-in demo models.",
        formatter_class=_HelpFormatter)
    p.set_defaults(models_from_config=None)

    g = p.add_argument_group("models")
    g.add_argument("--model-path", "--model_path", action="append", metavar="PATH",
                   help="a Hugging Face checkpoint folder; repeat for more models")
    g.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="the name of each --model-path, in order (default: the folder name)")
    g.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model served as NAME; repeatable")
    g.add_argument("--default-model", metavar="NAME",
                   help="the model that requests without a model field go to when several are "
                        "served")
    g.add_argument("--context-length", type=int, help="cap on each model's context length")
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto, safetensors: read the checkpoint's safetensors files; dummy: "
                        "read only config.json and the tokenizer, and initialise every weight "
                        "randomly on the device (benchmarks of real shapes without weights)")
    g.add_argument("--config", metavar="FILE",
                   help="YAML file of options (flag names as keys; `models:` a list of "
                        "{name, path}); the command line overrides it")

    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on")
    g.add_argument("--port", type=int, default=30000, help="port to listen on")
    g.add_argument("--api-key", help="require `Authorization: Bearer <key>` on every endpoint "
                                     "but /health and /metrics")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging level")
    g.add_argument("--skip-server-warmup", action="store_true",
                   help="do not run one token per model before reporting ready")
    g.add_argument("--max-n", type=int, default=128, metavar="N",
                   help="most samples (`n`) per prompt; more is a 400")
    g.add_argument("--max-request-bytes", type=int, default=32 << 20, metavar="BYTES",
                   help="largest request body; larger ones get 413")
    g.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM or SIGINT: how long requests in flight may finish before "
                        "they end with an error")
    g.add_argument("--stream-interval", type=int, default=1, metavar="TOKENS",
                   help="streams send the first token at once, then a chunk per TOKENS new "
                        "tokens (and the last one); larger values send fewer chunks")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--random-seed", type=int, default=0,
                   help="seed of the sampler for requests without their own seed")
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernels; auto: torch on CPU, on CUDA flashinfer where it "
                        "imports, else triton")
    g.add_argument("--attention-split", default="none", choices=ATTENTION_SPLITS,
                   help="one model's attention over --attention-split-size ranks (processes; "
                        "GPUs --device and the next ones): seq spreads each request's KV pages "
                        "over every rank's pool (partials merged by log-sum-exp; attention "
                        "weights on every rank, experts divided over the ranks); head divides "
                        "the KV heads (tensor parallelism, as "
                        "--tp-size, refused where a KV head would be replicated: MLA)")
    g.add_argument("--attention-split-size", type=int, default=1,
                   help="ranks of --attention-split")
    g.add_argument("--tp-size", "--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="tensor parallelism: each model over N ranks (processes on --device "
                        "and the next N-1 GPUs, gloo on CPU): attention heads split (KV heads "
                        "replicated where fewer than N), dense weights and every expert's "
                        "intermediate rows split, two all-reduces per layer; static and "
                        "monolithic pool modes")
    g.add_argument("--tp-all-reduce", default="nccl", choices=("nccl", "symm-mem"),
                   help="the TP ranks' all-reduce: nccl, or symm-mem (torch symmetric memory "
                        "over NVLink, two-shot, multicast off) for bf16 tensors up to 2 MiB "
                        "(decode steps), NCCL above; falls back to NCCL where it is missing. "
                        "Not yet run in the engine on GPUs (the op alone: "
                        "benchmark/results/tp-2xh200/)")
    g.add_argument("--ep-size", "--expert-parallel-size", type=int, default=1, metavar="N",
                   help="expert parallelism within the --tp-size ranks: N groups, each "
                        "holding a contiguous slice of the routed experts (N divides "
                        "--tp-size; N = --tp-size: every rank holds whole experts)")
    g.add_argument("--moe-small-batch", default="auto", choices=MOE_SMALL_BATCH,
                   help="MoE layers at few tokens as grouped GEMVs over the chosen experts "
                        "(shared expert in the same pass) instead of the fused-MoE GEMM; auto: "
                        "on CUDA at <= 2 tokens (where it measured faster on an H200); on: up "
                        "to 8 tokens, also on CPU where the Triton interpreter runs (tests); "
                        "FFN server processes always use auto")
    g.add_argument("--grammar-backend", default="xgrammar", choices=GRAMMAR_BACKENDS,
                   help="constrained decoding (regex, json_schema, ebnf, response_format); "
                        "none: such requests are refused with 400")
    g.add_argument("--constrained-json-disable-any-whitespace", action="store_true",
                   help="JSON schemas: compact separators only, instead of any whitespace "
                        "between tokens")
    g.add_argument("--grammar-jump-forward", action="store_true",
                   help="append the tokens a grammar forces without sampling them (they are "
                        "computed in the next step, like a prompt; no logprobs for them, so "
                        "requests with return_logprob do not jump)")

    g = p.add_argument_group("scheduling")
    g.add_argument("--max-running-requests", type=int, default=64,
                   help="running requests over all models")
    g.add_argument("--max-queued-requests", type=int,
                   help="queued requests past which new ones get 503 + Retry-After "
                        "(default: no limit)")
    g.add_argument("--chunked-prefill-size", type=int, default=512,
                   help="tokens per step (prefill chunks + decodes)")

    g = p.add_argument_group("memory")
    g.add_argument("--max-total-tokens", type=int,
                   help="KV budget in tokens: enough pages for any one model to hold this many")
    g.add_argument("--mem-fraction-static", type=float,
                   help="CUDA: the share of device memory for weights + KV (KV gets what the "
                        "weights leave); ignored on CPU")
    g.add_argument("--kv-pages", type=int, help="KV budget in physical pages (CrossPool)")
    g.add_argument("--kv-page-bytes", type=int,
                   help="page size (default: 4 KiB on CPU, 2 MiB on CUDA)")
    g.add_argument("--kv-page-backend", default="auto", choices=KV_PAGE_BACKENDS,
                   help="how KV pages are mapped: vmm (CUDA virtual memory: only mapped pages "
                        "use memory), simulated (each model's whole KV range allocated up "
                        "front), auto (vmm where the device and cuda-python allow it)")
    g.add_argument("--kv-reserve-pages", type=int,
                   help="KV pages created ahead and kept unmapped, so new blocks map without "
                        "creating memory; part of the KV budget (default: none on CPU, two "
                        "blocks of the model with the most layers on CUDA)")
    g.add_argument("--radix-cache-floor", action="append", metavar="NAME=PAGES",
                   help="KV pages of model NAME's prefix cache that other models' requests "
                        "cannot evict (repeat per model; default: the plan's, from its traffic "
                        "file's cached_prefix, else none)")
    g.add_argument("--disable-radix-cache", action="store_true",
                   help="no prefix cache (RadixAttention): every prompt is computed whole")

    g = p.add_argument_group("CrossPool")
    g.add_argument("--plan", metavar="FILE",
                   help="a plan.json of `python -m sglang_crosspool.plan`: its models (unless "
                        "given here), FFN servers, expert placement and KV pages for the pool "
                        "mode (crosspool unless --pool-mode says otherwise)")
    g.add_argument("--pipeline-microbatches", type=int, default=1,
                   help="micro-batches in flight per step in the layer-wise pipeline "
                        "(default: 1, no pipelining)")
    g.add_argument("--pipeline-models", action="store_true",
                   help="crosspool over p2p: each step pipelines two models' decode batches in "
                        "one CUDA graph, one model's attention running while the other's "
                        "experts run (a model's own batch is not split)")
    g.add_argument("--pool-mode", default=None, choices=POOL_MODES,
                   help="static: a fixed KV slice per model; monolithic: one elastic KV pool "
                        "shared by the models, FFNs next to attention; crosspool: FFN/expert "
                        "weights in a separate weights pool (see --ffn-servers)")
    g.add_argument("--ffn-servers", type=int, default=1,
                   help="crosspool: FFN servers in the weights pool, experts sharded over them")
    g.add_argument("--ffn-transport", default="auto", choices=FFN_TRANSPORTS,
                   help="crosspool: how hidden states reach the FFN servers (local: in this "
                        "process; p2p: peer stores and device flags, control once a step, "
                        "decode as CUDA graphs on both sides (GPUs of one host; shared "
                        "memory on CPU); shm, dist (gloo), cuda-ipc, nccl: a message per "
                        "layer; auto (default): p2p when --ffn-device is another GPU, else "
                        "local)")
    g.add_argument("--devices", default=None, metavar="DEV,DEV,...",
                   help="one attention worker process per device, each with its own KV pool "
                        "(e.g. cuda:0,cuda:1): GPUs are laid out by a plan made at start-up "
                        "from the models' config.json and the GPUs' memory, as --plan would "
                        "(crosspool: KV-pool and weights-pool GPUs); cpu,cpu,... stand in for "
                        "devices on CPU, models placed by size. Default: one worker on --device")
    g.add_argument("--dp-size", type=int, default=1, metavar="N",
                   help="data-parallel attention: N attention workers, one per device of "
                        "--devices (default cuda:0..N-1 on CUDA), each serving every model "
                        "with its own KV pool; requests go to the least loaded. In crosspool "
                        "they share one set of FFN servers (--ffn-transport shm), so every "
                        "expert is held once. On GPUs give the KV budget "
                        "(--mem-fraction-static): the default is 256 MiB")
    g.add_argument("--ffn-device", default=None, metavar="DEVICE",
                   help="crosspool: the device of the FFN servers, e.g. cuda:1 with attention "
                        "on cuda:0 (default: --device)")

    g = p.add_argument_group("CUDA graphs (on CUDA; FFN in process or over p2p)")
    g.add_argument("--disable-cuda-graph", action="store_true", help="run decode eagerly")
    g.add_argument("--cuda-graph-max-bs-decode", type=int, metavar="N",
                   help="largest decode batch captured in a graph (default: 32)")
    g.add_argument("--cuda-graph-max-bs", type=int, metavar="N",
                   help="older spelling of --cuda-graph-max-bs-decode")
    return p
