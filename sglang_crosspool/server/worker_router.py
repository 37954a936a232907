"""One server, many devices: an attention worker per device, and the router in front of them.

    HTTP process ── EngineClient ──► WorkerRouterClient ──► worker 0 (device 0): scheduler loop
                                                      ├──► worker 1 (device 1): scheduler loop
                                                      └──► ...

Each attention worker is the ordinary scheduler process (`scheduler_process.py`) over an
`EngineConfig` cut down to the models placed on its device: their attention halves, its own KV
page pool and CUDA graphs, and in `crosspool` mode its own FFN servers for those models'
experts. The router is an `EngineClient` like the single-scheduler ones, so the HTTP side does
not change: it sends each request to the worker that serves its model (the least loaded one
where a model has replicas), answers control requests from all workers together, and merges
their stats, keeping each worker's under `workers` (device, models, KV pages, weight bytes)
for the per-device metrics.

Placement is made once at start-up: by the plan where there is one (`--plan`, or the plan a
launch over several GPUs makes), its models and KV pages per worker; otherwise (CPU stand-ins)
by `place_models`, from the model configs: largest models first, each onto the device with
the fewest bytes so far. Models loaded later go to the lightest worker (`/load_model`).

A worker that dies ends the requests it held with an error naming it; its models are then
refused with 503, and the other workers serve on. The server stops only when every worker
is gone.

Models loaded while serving (`load_model`) go to the live worker holding the fewest weight
bytes (then the fewest requests in flight), or, where that one has no room (507), to the next;
`unload_model` goes to the worker serving the model.

Data-parallel attention (`--dp-size N`, one worker per device of `--devices`): every worker
serves every model, and each request goes to the least loaded live worker (fewest requests in
flight); a dead replica leaves its models served by the others. In crosspool the replicas share
one set of FFN servers (started by worker 0; ffn/remote.py), so the experts exist once.
Without it, FFN servers are per worker: a model's experts live with the worker that serves it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sglang_crosspool.server.engine_client import (
    EngineClient,
    InProcessEngineClient,
    MultiprocessEngineClient,
)
from sglang_crosspool.server.messages import (
    AbortRequest,
    AddRequests,
    AddResults,
    BatchOutput,
    ControlRequest,
    ControlResult,
    Ready,
    RequestUpdate,
)

logger = logging.getLogger(__name__)


def place_models(config, devices: list[str]) -> list[list[str]]:
    """Per device, the served model names placed on it (every model on exactly one device)."""
    from sglang_crosspool.planner.weights import model_weights

    def weight(entry) -> int:
        try:
            return int(model_weights(entry.spec, config.dtype, entry.name).total.value)
        except Exception:  # noqa: BLE001 - an architecture the planner does not know
            s = entry.spec
            return s.num_layers * s.hidden_size * (s.num_experts + 4) * s.hidden_size

    load = [0] * len(devices)
    out: list[list[str]] = [[] for _ in devices]
    for entry in sorted(config.models, key=weight, reverse=True):
        d = min(range(len(devices)), key=lambda i: (load[i], len(out[i]), i))
        out[d].append(entry.name)
        load[d] += weight(entry)
    return out


def worker_config(config, device: str, names: list[str], kv_pages: int | None = None,
                  dp_rank: int = 0):
    """`config` cut down to one attention worker: its device, its models and (from a plan)
    its KV pages; under data-parallel attention, its replica index. FFN servers follow the
    worker's device unless the config puts them on a device of their own."""
    models = tuple(m for m in config.models if m.name in names)
    placement = config.ffn_placement
    if placement is not None:
        placement = tuple((name, shares) for name, shares in placement if name in names)
    ffn_device = config.ffn_device if config.ffn_device != config.device else device
    floors = tuple((name, pages) for name, pages in config.radix_cache_floor_pages
                   if name in names)
    return dataclasses.replace(config, models=models, device=device, ffn_device=ffn_device,
                               ffn_placement=placement, radix_cache_floor_pages=floors,
                               kv_pages=kv_pages if kv_pages is not None else config.kv_pages,
                               dp_rank=dp_rank)


@dataclass
class _Worker:
    index: int
    device: str
    models: list[str]
    client: EngineClient
    stats: dict = field(default_factory=dict)
    rids: set[str] = field(default_factory=set)
    dead: str | None = None


@dataclass
class _PendingAdd:
    rids: list[str]
    waiting: int
    error: tuple[str, int] | None = None
    added: list[tuple[int, list[str]]] = field(default_factory=list)


class _WorkerArgs:
    """A worker's view of the server args: its own IPC paths inside the server's folder."""

    def __init__(self, args, index: int):
        self._args, self._index = args, index
        self.ipc_dir = args.ipc_dir
        self.skip_server_warmup = args.skip_server_warmup
        self.log_level = args.log_level

    def ipc_path(self, name: str) -> str:
        return self._args.ipc_path(f"{name}-w{self._index}")


class WorkerRouterClient(EngineClient):
    """The router: one `EngineClient` (process or in-process) per attention worker."""

    def __init__(self, args, config, devices: list[str], in_process: bool = False,
                 placement: list[list[str]] | None = None,
                 kv_pages: list[int] | None = None):
        self.config = config
        if config.dp_size > 1:  # data-parallel attention: every model on every worker
            placement = [list(config.model_names) for _ in devices]
        placement = placement or place_models(config, devices)
        kv_pages = list(kv_pages or [None] * len(devices))
        self.workers: list[_Worker] = []
        cls = InProcessEngineClient if in_process else MultiprocessEngineClient
        try:
            for i, (device, names, pages) in enumerate(zip(devices, placement, kv_pages)):
                if not names:
                    continue
                cfg = worker_config(config, device, names, pages,
                                    i if config.dp_size > 1 else 0)
                self.workers.append(_Worker(i, device, list(names), cls(_WorkerArgs(args, i),
                                                                        cfg)))
        except BaseException:
            self.close()
            raise
        self.owners: dict[str, list[_Worker]] = {}  # model -> the workers serving it
        for w in self.workers:
            for name in w.models:
                self.owners.setdefault(name, []).append(w)
        self._adds: dict[str, _PendingAdd] = {}  # first rid of a batch -> its pending answer
        self._controls: dict[int, list] = {}  # cid -> results so far
        # cid -> (the request, model, the worker asked, the workers left to ask after it)
        self._model_ops: dict[int, tuple[ControlRequest, str, _Worker, list[_Worker]]] = {}
        self._on_message: Callable | None = None
        self._on_dead: Callable | None = None
        self._cids = itertools.count(1 << 40)
        if in_process:
            self.ready = self._merged_ready()

    # -- start-up -------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 600.0) -> Ready:
        try:
            for w in self.workers:
                w.client.wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        self.ready = self._merged_ready()
        return self.ready

    def _merged_ready(self) -> Ready:
        for w in self.workers:
            w.stats = w.client.ready.stats
        return Ready(self.workers[0].client.ready.pid, list(self.config.model_names),
                     self.merged_stats())

    def start(self, loop, on_message, on_dead) -> None:
        self._on_message, self._on_dead = on_message, on_dead
        for w in self.workers:
            w.client.start(loop, lambda msg, w=w: self._from_worker(w, msg),
                           lambda why, w=w: self._worker_died(w, why))

    # -- to the workers -------------------------------------------------------------------------

    def send(self, msg) -> None:
        if isinstance(msg, AddRequests):
            self._add(msg)
        elif isinstance(msg, AbortRequest):
            self._abort(msg)
        elif isinstance(msg, ControlRequest) and msg.kind in ("load_model", "unload_model"):
            self._model_op(msg)
        elif isinstance(msg, ControlRequest):
            live = [w for w in self.workers if w.dead is None]
            self._controls[msg.cid] = [msg.kind, len(live), []]
            for w in live:
                w.client.send(msg)
            if not live:
                self._deliver(ControlResult(msg.cid, {"error": "no attention worker is up"}))
        else:
            raise TypeError(f"cannot route a {type(msg).__name__}")

    def _model_op(self, msg: ControlRequest) -> None:
        """A load goes to the least loaded live worker, an unload to the model's worker."""
        name = msg.args.get("served_model_name")
        live = [w for w in self.workers if w.dead is None]
        if msg.kind == "load_model":
            if name in self.owners or any(n == name for _, n, _, _ in self._model_ops.values()):
                self._deliver(ControlResult(msg.cid, {
                    "error": f"served_model_name: {name!r} is already served or loading",
                    "status": 400}))
                return
            order = sorted(live, key=lambda w: (_weight_bytes(w.stats), len(w.rids), w.index))
            worker, rest = (order[0], order[1:]) if order else (None, [])
        else:
            if len(self.owners.get(name, ())) > 1:
                self._deliver(ControlResult(msg.cid, {
                    "error": f"model {name!r} is served by {len(self.owners[name])} "
                             "data-parallel replicas; unloading it from all of them is not "
                             "supported yet", "status": 501}))
                return
            worker, rest = (self.owners.get(name) or [None])[0], []
        if worker is None or worker.dead is not None:
            if worker is not None:
                why, status = worker.dead, 503
            elif msg.kind == "load_model":
                why, status = "no attention worker is up", 503
            else:
                why, status = f"model {name!r} is not served", 404
            self._deliver(ControlResult(msg.cid, {"error": why, "status": status}))
            return
        self._model_ops[msg.cid] = (msg, name, worker, rest)
        worker.client.send(msg)

    def _add(self, msg: AddRequests) -> None:
        rids = [r.rid for r in msg.requests]
        if len(set(rids)) != len(rids):  # checked here: replicas would each see only a part
            self._deliver(AddResults(rids, "rid: the request ids of one batch must differ", 400))
            return
        groups: dict[int, list] = {}
        for req in msg.requests:
            # unknown model: the first worker's validation names it
            serving = self.owners.get(req.model) or [self.workers[0]]
            live = [w for w in serving if w.dead is None]
            # a replica that refuses everything (its weights pool failed) has nothing in
            # flight: it would win every choice; the others go first
            live = [w for w in live if not w.stats.get("unavailable")] or live
            if not live:
                for x in self.workers:
                    x.rids.difference_update(rids)
                self._deliver(AddResults(rids, f"the engine cannot take requests for model "
                                               f"{req.model!r}: {serving[0].dead}", 503))
                return
            w = min(live, key=lambda x: (len(x.rids), x.index))  # least loaded replica
            w.rids.add(req.rid)  # counted now, so a batch spreads over the replicas
            groups.setdefault(w.index, []).append(req)
        pending = self._adds[rids[0]] = _PendingAdd(rids, len(groups))
        for index, reqs in groups.items():
            w = self._worker(index)
            w.rids.update(r.rid for r in reqs)
            pending.added.append((index, [r.rid for r in reqs]))
            w.client.send(AddRequests(reqs))

    def _abort(self, msg: AbortRequest) -> None:
        for w in self.workers:
            if w.dead is None and (msg.abort_all or msg.rid in w.rids):
                w.client.send(msg)

    # -- from the workers -----------------------------------------------------------------------

    def _from_worker(self, w: _Worker, msg) -> None:
        if isinstance(msg, AddResults):
            self._add_result(w, msg)
        elif isinstance(msg, BatchOutput):
            if msg.stats is not None:
                w.stats = msg.stats
            for update in msg.updates:
                if update.finish_reason is not None:
                    w.rids.discard(update.rid)
            self._deliver(BatchOutput(msg.updates, self.merged_stats()))
        elif isinstance(msg, ControlResult) and msg.cid in self._model_ops:
            request, name, worker, rest = self._model_ops.pop(msg.cid)
            rest = [x for x in rest if x.dead is None]
            if msg.result.get("status") == 507 and rest:  # no room there: the next worker
                self._model_ops[msg.cid] = (request, name, rest[0], rest[1:])
                rest[0].client.send(request)
                return
            if "error" not in msg.result:
                if request.kind == "load_model":
                    self.owners[name] = [worker]
                    worker.models.append(name)
                else:
                    self.owners.pop(name, None)
                    worker.models.remove(name)
            self._deliver(msg)
        elif isinstance(msg, ControlResult):
            self._control_result(w, msg)
        else:
            self._deliver(msg)

    def _add_result(self, w: _Worker, msg: AddResults) -> None:
        key = next((k for k, p in self._adds.items() if msg.rids and msg.rids[0] in p.rids),
                   None)
        if key is None:
            return
        pending = self._adds[key]
        if msg.error is not None:
            w.rids.difference_update(msg.rids)
            pending.error = pending.error or (msg.error, msg.status)
        pending.waiting -= 1
        if pending.waiting:
            return
        del self._adds[key]
        if pending.error is not None:  # all or nothing: drop what other workers queued
            for index, rids in pending.added:
                worker = self._worker(index)
                for rid in rids:
                    if rid in worker.rids and worker.dead is None:
                        worker.client.send(AbortRequest(rid, "the batch failed"))
            self._deliver(AddResults(pending.rids, *pending.error))
        else:
            self._deliver(AddResults(pending.rids, None))

    def _control_result(self, w: _Worker, msg: ControlResult) -> None:
        entry = self._controls.get(msg.cid)
        if entry is None:
            return
        kind, expected, results = entry
        results.append((w.index, msg.result))
        if len(results) < expected:
            return
        del self._controls[msg.cid]
        self._deliver(ControlResult(msg.cid, self._merge_results(kind, results)))

    def _merge_results(self, kind: str, answers: list[tuple[int, dict]]) -> dict:
        """Merges the live workers' answers (worker index, result), in worker order."""
        answers = sorted(answers, key=lambda a: a[0])
        results = [r for _, r in answers]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            return {"error": "; ".join(errors)}
        if kind == "stats":
            merged = self.merged_stats(dict(answers))
            merged["in_flight"] = sum(r.get("in_flight", 0) for r in results)
            merged["pid"] = results[0].get("pid")
            return merged
        if kind == "health":
            down = self._down()
            down += [r["unavailable"] for r in results if r.get("unavailable")]
            return {"unavailable": "; ".join(down) or None}
        if kind == "flush_cache":
            ok = all(r.get("success") for r in results)
            return {"success": ok, "message": "; ".join(r.get("message", "") for r in results
                                                        if r.get("message"))}
        return results[0]

    def _down(self) -> list[str]:
        """Dead workers that leave a model with no live worker (a dead data-parallel replica
        whose models the others serve does not make the server unavailable)."""
        return [w.dead for w in self.workers if w.dead and (not w.models or any(
            all(o.dead for o in self.owners.get(name, [w])) for name in w.models))]

    def _worker_died(self, w: _Worker, why: str) -> None:
        if w.dead is not None:
            return
        w.dead = f"attention worker {w.index} ({w.device}) is gone: {why}"
        logger.error("%s; ending its %d requests", w.dead, len(w.rids))
        updates = [RequestUpdate(rid, [], 0, "", 0, {"type": "abort", "message": w.dead})
                   for rid in sorted(w.rids)]
        w.rids.clear()
        for key, pending in list(self._adds.items()):  # batches it never answered
            if any(index == w.index for index, _ in pending.added):
                self._add_result(w, AddResults(pending.rids[:1], w.dead, 503))
        for cid, (_, _, worker, _) in list(self._model_ops.items()):
            if worker is w:
                del self._model_ops[cid]
                self._deliver(ControlResult(cid, {"error": w.dead, "status": 503}))
        for cid, (kind, expected, results) in list(self._controls.items()):
            self._controls[cid][1] = expected - 1
            if len(results) >= expected - 1:
                del self._controls[cid]
                self._deliver(ControlResult(cid, self._merge_results(kind, results)
                                            if results else {"error": w.dead}))
        self._deliver(BatchOutput(updates, self.merged_stats()))
        if self.config.dp_size > 1 and self.config.pool_mode == "crosspool" and w.index == 0:
            # Replica 0 started the FFN servers the others share: they go with it.
            for x in self.workers:
                self._worker_died(x, f"replica 0, whose FFN servers it shares, is gone ({why})")
        if all(x.dead is not None for x in self.workers) and self._on_dead is not None:
            on_dead, self._on_dead = self._on_dead, None  # once
            on_dead("every attention worker is gone; the last: " + why)

    # -- stats ------------------------------------------------------------------------------

    def merged_stats(self, fresh: dict[int, dict] | None = None) -> dict:
        """The workers' stats as one engine's (sums, per-model tables side by side), with each
        worker's own under `workers`; `fresh`: newer stats of some workers, by index."""
        fresh = fresh or {}
        per_worker = [fresh.get(w.index, w.stats) for w in self.workers]
        merged: dict = {}
        for stats in per_worker:
            _merge_into(merged, stats)
        kv = merged.get("kv", {})
        if per_worker and "page_bytes" in kv:  # a page's size is not a sum
            kv["page_bytes"] = per_worker[0].get("kv", {}).get("page_bytes")
        pipe = merged.get("pipeline", {})
        if pipe.get("wall_s"):
            pipe["bubble_fraction"] = pipe.get("wait_s", 0.0) / pipe["wall_s"]
        merged["workers"] = [
            {"index": w.index, "device": w.device, "models": w.models, "dead": w.dead,
             "pid": getattr(getattr(w.client, "ready", None), "pid", None),
             "in_flight": len(w.rids),
             # per model: running, waiting, preemptions (the worker's scheduler)
             "scheduler": s.get("scheduler", {}),
             "kv": {k: s.get("kv", {}).get(k) for k in
                    ("used_pages", "total_pages", "page_bytes", "used_bytes", "total_bytes")},
             "attention_bytes": s.get("attention_bytes", 0),
             "ffn_bytes_here": s.get("ffn_bytes_here", 0),
             "ffn_device": s.get("ffn_device"),
             "ffn_bytes_per_server": s.get("ffn_bytes_per_server", []),
             "device_memory": s.get("device_memory", {})}
            for w, s in zip(self.workers, per_worker)]
        merged["unavailable"] = "; ".join(x for x in (
            self._down() +
            [s.get("unavailable") for s in per_worker if s.get("unavailable")])) or None
        return merged

    def _worker(self, index: int) -> _Worker:
        return next(w for w in self.workers if w.index == index)

    def _deliver(self, msg) -> None:
        if self._on_message is not None:
            self._on_message(msg)

    def close(self) -> None:
        for w in self.workers:
            try:
                w.client.close()
            except Exception:  # noqa: BLE001 - close the others regardless
                logger.exception("closing attention worker %d", w.index)


def _weight_bytes(stats: dict) -> int:
    """Weight bytes a worker holds: attention side, FFN in process, its FFN servers'."""
    ffn = max(stats.get("ffn_bytes_here", 0), sum(stats.get("ffn_bytes_per_server", [])))
    return stats.get("attention_bytes", 0) + ffn


def _merge_into(into: dict, stats: dict) -> None:
    for key, value in stats.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            into.setdefault(key, value)
        elif isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            _merge_into(into.setdefault(key, {}), value)
        elif isinstance(value, list):
            into[key] = list(into.get(key, [])) + list(value)
        else:
            into.setdefault(key, value)


def make_engine_client(args, config) -> EngineClient:
    """The scheduler link a server starts with: one scheduler process, or a router over one
    attention worker per device of `--devices`."""
    devices = list(getattr(args, "devices", None) or [])
    if len(devices) > 1:
        return WorkerRouterClient(args, config, devices,
                                  placement=[list(m) for m in args.device_models] or None,
                                  kv_pages=list(args.device_kv_pages) or None)
    return MultiprocessEngineClient(args, config)
