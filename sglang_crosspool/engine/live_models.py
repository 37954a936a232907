"""Models loaded and unloaded while the engine serves (`POST /load_model`, `/unload_model`).

    load:   checks (400 bad request, 501 not on this server, 507 no room; nothing touched)
            -> parts load off the step: attention half in a thread of the scheduler process,
               FFN in the executor (a thread here, or the FFN servers, which serve meanwhile)
            -> polled between steps -> attach (KV ranges, runner, graphs, queue) -> serving
    unload: draining (new requests refused at once; with `force` those in flight end with an
            error) -> the last request finishes -> detach (queue and prefix cache, KV ranges,
            graphs, runner, attention half, FFN) -> what was freed
    rebalance (crosspool): new expert shares load beside the ones serving, on the FFN servers
            whose share changes -> polled between steps -> swapped in between two steps, on
            every server and in the routing table at once -> the old shares are freed

The scheduler loop calls `poll()` between steps, so other models keep serving through a load;
only the attach (KV ranges, and CUDA graphs where the engine captures them) runs in the loop.

Room: the model's weight bytes (from its config.json, as the planner counts them; the
checkpoint's file sizes for architectures the planner does not model) must fit the free memory
of each device they go to (CUDA: free device memory, less the KV pages the pool may still
create; CPU: the host's available memory), one KV block of it must fit the KV budget, and over
a remote weights pool its hidden size and top-k must fit the transport buffers sized at
start-up. Experts go to the FFN servers holding the fewest bytes first, dealt round-robin.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sglang_crosspool.config import DTYPES, ModelEntry, model_entry
from sglang_crosspool.ffn.executor import FFNLoad, in_thread

log = logging.getLogger("sglang_crosspool.engine")
LOAD, UNLOAD, REBALANCE = "load_model", "unload_model", "rebalance"


class ModelOpError(Exception):
    """A load or unload refused (nothing was changed); `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Load:
    entry: ModelEntry
    shares: list[list[int]]
    parts: object  # Future of (attention half, tokenizer)
    ffn: FFNLoad
    estimate: dict
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Rebalance:
    moves: dict[str, tuple[list[list[int]], FFNLoad]]  # model -> (new shares, their load)
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Unload:
    name: str
    force: bool
    started: float = field(default_factory=time.monotonic)
    ended: int = 0  # requests ended by force


class LiveModels:
    def __init__(self, core):
        self.core = core
        self.loading: dict[str, _Load] = {}
        self.draining: dict[str, _Unload] = {}
        self.rebalancing: _Rebalance | None = None
        self.load_formats: dict[str, str] = {}  # of models loaded while serving
        self.rebalances = 0
        self.loads = 0
        self.unloads = 0
        self.last: dict = {}  # the last load, unload or rebalance done ({} before any)

    @property
    def busy(self) -> bool:
        return bool(self.loading or self.draining or self.rebalancing)

    # -- load ---------------------------------------------------------------------------------

    def begin_load(self, args: dict) -> str:
        """Checks and starts a load; returns the model's name. Raises ModelOpError."""
        core = self.core
        cfg = core.config
        entry = self._entry(args)
        name = entry.name
        if name in core.attention or name in self.loading:
            raise ModelOpError(400, f"served_model_name: {name!r} is already served or loading")
        if cfg.pool_mode == "static":
            raise ModelOpError(501, "load_model is not supported in the static pool mode: its "
                                    "KV budget is sliced between the models at start-up")
        refused = core.ffn.live_models_refused()
        if refused:
            raise ModelOpError(501, f"load_model over ffn_transport {cfg.ffn_transport!r}: "
                                    f"{refused}")
        self._check_layout(entry)
        shares = self._place(entry)
        estimate = self._check_room(entry, shares)
        load_format = args.get("load_format") or cfg.load_format
        device, dtype = core.device, cfg.torch_dtype

        def load_parts():
            from sglang_crosspool.engine.core import load_attention
            from sglang_crosspool.tokenizer import load_tokenizer

            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # per thread: the scheduler's own GPU
            return load_attention(entry, load_format, device, dtype), load_tokenizer(entry.path)

        parts = in_thread(load_parts, f"load-attention-{name}")
        ffn = core.ffn.begin_load(name, entry.path, shares, cfg.dtype, load_format)
        self.loading[name] = _Load(entry, shares, parts, ffn, estimate)
        self.load_formats[name] = load_format
        return name

    def _entry(self, args: dict) -> ModelEntry:
        path = args.get("model_path")
        if not isinstance(path, str) or not path:
            raise ModelOpError(400, "model_path: expected the checkpoint directory")
        name = args.get("served_model_name") or Path(path).name
        if not isinstance(name, str):
            raise ModelOpError(400, "served_model_name: expected a string")
        ctx = args.get("context_length")
        if ctx is not None and (not isinstance(ctx, int) or ctx < 2):
            raise ModelOpError(400, "context_length: expected an integer >= 2")
        try:
            return model_entry(path, name, ctx)
        except (OSError, ValueError, KeyError) as e:
            raise ModelOpError(400, f"model_path: cannot serve {path!r}: {e}") from None

    def _check_layout(self, entry: ModelEntry) -> None:
        """What start-up fixed for every model: the attention backend, the KV page size."""
        from sglang_crosspool.engine.attention import FLASHINFER_HEAD_DIMS

        cfg, s = self.core.config, entry.spec
        if cfg.attention_backend == "flashinfer" and s.head_dim not in FLASHINFER_HEAD_DIMS:
            raise ModelOpError(501, f"the server's attention backend (flashinfer) takes head_dim "
                                    f"in {sorted(FLASHINFER_HEAD_DIMS)}; this model has "
                                    f"{s.head_dim}")
        slot = s.num_kv_heads * s.head_dim * DTYPES[cfg.dtype].itemsize
        if self.core.kv_pool.page_bytes % slot:
            raise ModelOpError(400, f"one token's KV of one layer is {slot} bytes, which does "
                                    f"not divide the server's {self.core.kv_pool.page_bytes}-byte "
                                    f"KV page")

    def _place(self, entry: ModelEntry) -> list[list[int]]:
        """Experts per FFN server: dealt round-robin, the servers holding fewest bytes first."""
        cfg = self.core.config
        if cfg.pool_mode != "crosspool":
            return [list(range(entry.spec.num_experts))]
        held = self.core.ffn.server_bytes()
        servers = cfg.ffn_servers
        held = list(held) + [0] * (servers - len(held))
        order = sorted(range(servers), key=lambda i: (held[i], i))
        shares: list[list[int]] = [[] for _ in range(servers)]
        for expert in range(entry.spec.num_experts):
            shares[order[expert % servers]].append(expert)
        return shares

    def _check_room(self, entry: ModelEntry, shares) -> dict:
        core, cfg, s = self.core, self.core.config, entry.spec
        pool = core.kv_pool
        block_pages = s.num_layers * (1 if s.kv_latent else 2)
        if block_pages > pool.total_pages:
            raise ModelOpError(507, f"model {entry.name!r} does not fit the KV budget: one KV "
                                    f"block of its {s.num_layers} layers takes {block_pages} "
                                    f"pages, the pool has {pool.total_pages}")
        spec = getattr(getattr(core.ffn, "pool", None), "spec", None)
        if spec is not None and (s.hidden_size > spec.hidden or s.top_k > spec.max_top_k):
            raise ModelOpError(507, f"model {entry.name!r} does not fit the weights pool's "
                                    f"transport buffers, sized at start-up for hidden size <= "
                                    f"{spec.hidden} and top-k <= {spec.max_top_k} (it has "
                                    f"{s.hidden_size} and {s.top_k}); start the server with it")
        attention, ffn = weight_bytes(entry, cfg.dtype)
        need = {cfg.device: attention}
        need[cfg.ffn_device] = need.get(cfg.ffn_device, 0) + ffn
        for device, nbytes in need.items():
            free = free_bytes(device, pool if device == cfg.device else None)
            if free is not None and nbytes > free:
                raise ModelOpError(507, f"model {entry.name!r} does not fit: its weights take "
                                        f"{nbytes} bytes on {device}, which has {free} bytes "
                                        f"free")
        return {"attention_bytes": attention, "ffn_bytes": ffn,
                "ffn_experts_per_server": [len(x) for x in shares]}

    # -- unload -------------------------------------------------------------------------------

    def begin_unload(self, args: dict) -> tuple[str, list]:
        """Stops new requests for a model; with `force` ends those in flight (returned, for
        their updates). Raises ModelOpError."""
        core = self.core
        name = args.get("served_model_name") or args.get("model")
        if not isinstance(name, str) or name not in core.attention:
            raise ModelOpError(404, f"model {name!r} is not served")
        if name in self.draining:
            raise ModelOpError(400, f"model {name!r} is already being unloaded")
        if self.rebalancing is not None and name in self.rebalancing.moves:
            raise ModelOpError(400, f"model {name!r} is being rebalanced; unload it after")
        if core.config.pool_mode == "static":
            raise ModelOpError(501, "unload_model is not supported in the static pool mode")
        refused = core.ffn.live_models_refused()
        if refused:
            raise ModelOpError(501, f"unload_model over ffn_transport "
                                    f"{core.config.ffn_transport!r}: {refused}")
        force = bool(args.get("force"))
        job = self.draining[name] = _Unload(name, force)
        ended = []
        if force:
            for rid in [r for r, st in core.states.items() if st.req.model == name]:
                ended.append(core.abort(rid, f"model {name!r} was unloaded (force)", 503))
            job.ended = len(ended)
        return name, ended

    # -- rebalance ----------------------------------------------------------------------------

    def begin_rebalance(self, args: dict) -> str | None:
        """Starts moving experts between FFN servers: `placement` ({model: shares}) as given,
        else every model's experts spread evenly (each server within one expert of the others,
        moving as few as possible). Returns "*" (one rebalance at a time), or None when every
        expert already sits where it should. Raises ModelOpError."""
        core, cfg = self.core, self.core.config
        if cfg.pool_mode != "crosspool":
            raise ModelOpError(501, f"rebalance moves experts between FFN servers, which only "
                                    f"the crosspool pool mode has (this is {cfg.pool_mode})")
        refused = core.ffn.live_models_refused()
        if refused:
            raise ModelOpError(501, f"rebalance over ffn_transport {cfg.ffn_transport!r}: "
                                    f"{refused}")
        if self.rebalancing is not None:
            raise ModelOpError(400, "a rebalance is already under way")
        placement = args.get("placement")
        if placement is None:
            targets = {m: even_shares(core.ffn.shares(m)) for m in self._settled()}
        else:
            targets = self._given(placement)
        moves = {m: s for m, s in targets.items()
                 if [sorted(x) for x in s] != [sorted(x) for x in core.ffn.shares(m)]}
        if not moves:
            return None
        self.rebalancing = _Rebalance({
            m: (s, core.ffn.begin_reshard(m, cfg.model(m).path, s, cfg.dtype,
                                          self.load_formats.get(m, cfg.load_format)))
            for m, s in moves.items()})
        return "*"

    def _settled(self) -> list[str]:
        """Models served and neither loading nor draining."""
        return [m for m in self.core.config.model_names if m not in self.draining]

    def _given(self, placement) -> dict[str, list[list[int]]]:
        if not isinstance(placement, dict) or not placement:
            raise ModelOpError(400, "placement: expected {model: [[expert ids of server 0], "
                                    "...]}")
        servers = self.core.config.ffn_servers
        out = {}
        for model, shares in placement.items():
            if model not in self._settled():
                raise ModelOpError(404, f"placement: model {model!r} is not served")
            experts = self.core.config.model(model).spec.num_experts
            if (not isinstance(shares, list) or len(shares) != servers
                    or not all(isinstance(s, list) for s in shares)
                    or sorted(e for s in shares for e in s) != list(range(experts))):
                raise ModelOpError(400, f"placement: model {model!r} needs {servers} lists "
                                        f"holding each of its {experts} expert ids once")
            out[model] = [sorted(s) for s in shares]
        return out

    def _poll_rebalance(self) -> dict | None:
        job = self.rebalancing
        try:
            if not all(load.poll() for _, load in job.moves.values()):
                return None
        except Exception as e:  # noqa: BLE001 - a share failed to load: drop them all
            for _, load in job.moves.values():
                load.cancel()
            self.rebalancing = None
            return {"error": f"rebalance failed, nothing moved: {type(e).__name__}: {e}",
                    "status": 500}
        moved = {}
        for model, (shares, load) in job.moves.items():
            before = self.core.ffn.shares(model)
            load.commit()
            self.core.recapture_graphs(model)  # graphs over in-process FFN weights hold them
            moved[model] = {"shares": shares, "moved_experts": sum(
                len(set(new) - set(old)) for new, old in zip(shares, before))}
        self.rebalancing = None
        self.rebalances += 1
        result = {"seconds": time.monotonic() - job.started, "models": moved,
                  "ffn_bytes_per_server": self.core.ffn.server_bytes()}
        self.last = {"op": REBALANCE, **result}
        return result

    # -- between steps ------------------------------------------------------------------------

    def poll(self) -> list[tuple[str, str, dict]]:
        """Finishes what is ready: (op, model, result) for each load or unload done; a result
        with "error" and "status" for one that failed (then nothing of it stays)."""
        done = []
        for name, job in list(self.loading.items()):
            result = self._poll_load(job)
            if result is not None:
                del self.loading[name]
                done.append((LOAD, name, result))
        if self.rebalancing is not None:
            result = self._poll_rebalance()
            if result is not None:
                done.append((REBALANCE, "*", result))
        for name, job in list(self.draining.items()):
            if any(st.req.model == name for st in self.core.states.values()):
                continue
            del self.draining[name]
            self.load_formats.pop(name, None)
            freed = self.core.detach_model(name)
            self.unloads += 1
            result = {"served_model_name": name, "seconds": time.monotonic() - job.started,
                      "ended_by_force": job.ended, **freed}
            self.last = {"op": UNLOAD, **result}
            done.append((UNLOAD, name, result))
        return done

    def _poll_load(self, job: _Load) -> dict | None:
        name = job.entry.name
        try:
            if not job.parts.done() or not job.ffn.poll():
                return None
            attention, tokenizer = job.parts.result()
        except Exception as e:  # noqa: BLE001 - a part failed: undo the others, report
            job.ffn.cancel()
            return {"error": f"loading model {name!r} failed: {type(e).__name__}: {e}",
                    "status": 500}
        attach_start = time.monotonic()
        ffn_bytes = job.ffn.commit()
        try:
            self.core.attach_model(job.entry, attention, tokenizer, job.shares)
        except Exception as e:  # noqa: BLE001
            self._undo_attach(name)
            return {"error": f"adding model {name!r} failed: {type(e).__name__}: {e}",
                    "status": 500}
        self.loads += 1
        result = {"served_model_name": name, "model_path": job.entry.path,
                  "context_length": job.entry.context_length, "entry": job.entry,
                  "shares": job.shares, "seconds": time.monotonic() - job.started,
                  # the part that ran in the scheduler loop (no step meanwhile)
                  "attach_seconds": time.monotonic() - attach_start,
                  "attention_bytes": attention.nbytes(), "ffn_bytes": ffn_bytes,
                  "estimate": job.estimate,
                  "kv_virtual_blocks": self.core.kv_pool.models[name].num_blocks}
        self.last = {"op": LOAD, **{k: v for k, v in result.items() if k != "entry"}}
        return result

    def _undo_attach(self, name: str) -> None:
        """Takes out whatever part of a failed attach got in."""
        core = self.core
        if name in core.scheduler.queues:
            core.scheduler.remove_model(name)
        core.graphs.pop(name, None)
        core.runners.pop(name, None)
        core.attention.pop(name, None)
        core.tokenizers.pop(name, None)
        core.eos_ids.pop(name, None)
        if name in core.kv_pool.models:
            core.kv_pool.remove_model(name)
        if name in core.config.model_names:
            core.config = core.config.without_model(name)
        try:
            core.ffn.unload_model(name)
        except Exception:  # best effort: the load already failed
            log.exception("freeing the FFN of model %s after a failed load", name)

    def stats(self) -> dict:
        return {"loading": sorted(self.loading), "draining": sorted(self.draining),
                "rebalancing": sorted(self.rebalancing.moves) if self.rebalancing else [],
                "loads": self.loads, "unloads": self.unloads, "rebalances": self.rebalances,
                "last": self.last}


def even_shares(shares: list[list[int]]) -> list[list[int]]:
    """The same experts spread so that no server holds more than one more than another, each
    expert staying where it is unless its server holds too many."""
    total, servers = sum(len(s) for s in shares), len(shares)
    # The servers holding most keep one extra each, so that the fewest experts move.
    order = sorted(range(servers), key=lambda i: (-len(shares[i]), i))
    quota = [total // servers] * servers
    for i in order[: total % servers]:
        quota[i] += 1
    kept = [sorted(s)[: quota[i]] for i, s in enumerate(shares)]
    spare = sorted(e for i, s in enumerate(shares) for e in sorted(s)[quota[i]:])
    for i in range(servers):
        while len(kept[i]) < quota[i]:
            kept[i].append(spare.pop(0))
    return [sorted(s) for s in kept]


def weight_bytes(entry: ModelEntry, dtype: str) -> tuple[int, int]:
    """(attention side, FFN side) bytes of a model's weights in `dtype`."""
    try:
        from sglang_crosspool.planner.weights import model_weights

        w = model_weights(entry.spec, dtype, entry.name)
        return int(w.attention_side.value), int(w.ffn_side.value)
    except Exception:  # noqa: BLE001 - an architecture the planner does not model
        files = sum(f.stat().st_size for f in Path(entry.path).glob("*.safetensors"))
        return files, files  # an upper bound on each side


def free_bytes(device: str, kv_pool=None) -> int | None:
    """Memory a model's weights may still take on `device`; None where it cannot be read.
    With the device's KV pool: less the pages the pool may still create (VMM), which its
    budget has promised to KV."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if kv_pool is not None and type(kv_pool.backend).__name__ == "CudaVMMPageBackend":
            free -= (kv_pool.total_pages - kv_pool.backend.live_pages) * kv_pool.page_bytes
        return max(0, free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
