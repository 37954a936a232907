"""A discrete-event simulator of the serving engine: a trace replayed against a plan, per pool mode,
with step costs measured on the GPU (`benchmark/sim_costs.py`) and the scheduler's own code.

In: a plan (`python -m sglang_crosspool.plan ... --out plan.json`), a trace (benchmark/trace.py's
JSONL), the engine's limits (max running requests, chunked prefill size, the CUDA graphs'
largest batch) and an SLO. Out: per pool mode the runner's summary (`benchmark.stats`: TTFT
and time-between-tokens percentiles, goodput under the SLO, rejections), preemptions
(retractions), KV pages in use over time and at peak, and each attention worker's busy time.

How the engine is mirrored:
- Attention workers come from the plan: devices that a model's attention spans are joined
  (union-find), so `monolithic` (packed) is one worker per GPU, `static` one per group of GPUs
  that its models share, `crosspool` one over the KV-pool GPUs. Each worker owns one
  `crosspool_scheduler.GlobalScheduler` (admission, chunked prefill, round-robin over its
  models, retraction of the newest request when pages run out: the real policy, not a copy)
  over a `SimKV` that keeps the plan's page budget per GPU and block layout per model
  (`static`: each model's slice as a quota).
- A worker runs one step at a time: `schedule()` -> the step's cost -> `advance()`, sample one
  token per completed sequence, finish requests (as `EngineCore._run_batches` with one
  micro-batch). Workers run in parallel with each other.
- A model with data-parallel replicas is one scheduler entry per replica (`name#r`); a request
  goes to the replica with the fewest requests, as the worker router does.
- Requests whose prompt reaches the model's context are refused (400), the output is cut to
  the context (as the engine does); requests the plan does not serve, or whose KV could never
  fit (`RequestTooLarge`), are refused too.

NOTE: what is not modelled: the HTTP/tokenizer path (requests reach the scheduler at their
trace time), the layer-wise pipeline with two micro-batches (steps are mb1, the default),
contention between crosspool workers for the weights pool, CUDA-graph capture, and the prefix
cache (trace prompts share nothing).

    python -m benchmark.simulate run --plan plan.json --trace trace.jsonl --out sim.json
    python -m benchmark.simulate fit    # refits sim_costs.STEP_OVERHEAD_S, PREFILL_FLOPS_PER_S
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "scheduler"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from crosspool_scheduler import (
    GlobalScheduler,
    RequestTooLarge,
    SchedReq,
    SchedulerLimits,
)

from benchmark import sim_costs, stats
from benchmark.sim_costs import CostModel, Placement, Shape, StepBatch
from benchmark.trace import clamp, read_trace

MODES = ("static", "monolithic", "crosspool")


# -- KV accounting ------------------------------------------------------------------------------


@dataclass
class _Key:
    devices: tuple[int, ...]
    block_tokens: int
    pages_per_block: int  # on each of its devices
    virtual_blocks: int
    quota_pages: int | None = None  # static: the model's slice on each device
    blocks: int = 0


class SimKV:
    """The scheduler's `KVAllocator` over page budgets per GPU, without memory behind it.

    A block of a key maps `pages_per_block` pages on every GPU of the key's replica (TP ranks
    each hold their heads' share). Counts pages mapped and unmapped, for the VMM cost."""

    def __init__(self, budgets: dict[int, int]):
        self.budget = dict(budgets)
        self.used = {d: 0 for d in budgets}
        self.keys: dict[str, _Key] = {}
        self.mapped = 0  # pages mapped since the last `take_counts`
        self.unmapped = 0
        self._next = 0

    def add(self, key: str, devices: tuple[int, ...], block_tokens: int, pages_per_block: int,
            virtual_blocks: int, quota_pages: int | None = None) -> None:
        self.keys[key] = _Key(devices, block_tokens, pages_per_block, virtual_blocks,
                              quota_pages)

    def block_tokens(self, model: str) -> int:
        return self.keys[model].block_tokens

    def pages_per_block(self, model: str) -> int:
        return self.keys[model].pages_per_block

    def max_blocks(self, model: str) -> int:
        k = self.keys[model]
        pages = min(self.budget[d] for d in k.devices)
        if k.quota_pages is not None:
            pages = min(pages, k.quota_pages)
        return min(k.virtual_blocks, pages // k.pages_per_block)

    def can_alloc(self, model: str, n: int) -> bool:
        k = self.keys[model]
        pages = n * k.pages_per_block
        if k.quota_pages is not None and (k.blocks * k.pages_per_block + pages) > k.quota_pages:
            return False
        if k.blocks + n > k.virtual_blocks:
            return False
        return all(self.used[d] + pages <= self.budget[d] for d in k.devices)

    def alloc_blocks(self, model: str, n: int) -> list[int] | None:
        if not self.can_alloc(model, n):
            return None
        k = self.keys[model]
        k.blocks += n
        for d in k.devices:
            self.used[d] += n * k.pages_per_block
        self.mapped += n * k.pages_per_block * len(k.devices)
        self._next += n
        return list(range(self._next - n, self._next))

    def free_blocks(self, model: str, blocks: list[int]) -> None:
        k = self.keys[model]
        k.blocks -= len(blocks)
        for d in k.devices:
            self.used[d] -= len(blocks) * k.pages_per_block
        self.unmapped += len(blocks) * k.pages_per_block * len(k.devices)

    def retain(self, model: str, blocks: list[int]) -> None:  # no prefix cache here
        raise NotImplementedError("the simulator runs without a prefix cache")

    @property
    def free_pages(self) -> int:
        return sum(self.budget.values()) - sum(self.used.values())

    @property
    def used_pages(self) -> int:
        return sum(self.used.values())

    def take_counts(self) -> tuple[int, int]:
        """Pages mapped and unmapped since the last call (per GPU: the busiest one's share)."""
        n = max(1, len(self.budget))
        out = (self.mapped // n, self.unmapped // n)
        self.mapped = self.unmapped = 0
        return out


# -- workers and the layout a plan gives each mode ----------------------------------------------


@dataclass
class Worker:
    """One attention worker: its GPUs, scheduler and the models (keys) it runs."""

    name: str
    devices: tuple[int, ...]
    kv: SimKV
    sched: GlobalScheduler | None = None
    keys: dict[str, tuple[Shape, Placement]] = field(default_factory=dict)
    busy: bool = False
    busy_s: float = 0.0
    steps: int = 0


@dataclass
class Layout:
    mode: str
    workers: list[Worker]
    replicas: dict[str, list[tuple[Worker, str]]]  # served model -> (worker, key) per replica
    context: dict[str, int]  # served model -> context length


def build_layout(plan, mode: str, limits: SchedulerLimits, gpus_per_node: int | None = None
                 ) -> Layout:
    mp = plan.mode(mode)
    per_node = gpus_per_node or plan.inputs.devices
    node = {d: d // per_node for d in range(plan.inputs.devices)}
    pages = {d.index: int(d.kv_pages) for d in mp.devices}
    keys = []  # (key, model, devices, tp, row)
    for row in mp.models:
        if not row.fits:
            continue
        devs = list(row.devices)
        reps = row.parallel.replica_devices()
        for r, span in enumerate(reps):
            key = row.name if len(reps) == 1 else f"{row.name}#{r}"
            keys.append((key, row.name, tuple(devs[i] for i in span), row.parallel.replicas[r],
                         row))
    parent = {d: d for d in pages}

    def find(d):
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    for _, _, devs, _, _ in keys:
        for d in devs[1:]:
            parent[find(d)] = find(devs[0])
    groups: dict[int, list[int]] = {}
    for _, _, devs, _, _ in keys:
        for d in devs:
            groups.setdefault(find(d), [])
            if d not in groups[find(d)]:
                groups[find(d)].append(d)
    workers = {root: Worker(f"{mode}-gpu{'+'.join(map(str, sorted(ds)))}", tuple(sorted(ds)),
                            SimKV({d: pages[d] for d in ds})) for root, ds in groups.items()}
    info = {m.name: m for m in plan.models}
    replicas: dict[str, list[tuple[Worker, str]]] = {}
    for key, name, devs, tp, row in keys:
        w = workers[find(devs[0])]
        virtual = -(-info[name].max_position_embeddings * limits.max_running_requests
                    // int(row.block_tokens))
        quota = int(row.kv_pages) if mode == "static" else None
        w.kv.add(key, devs, int(row.block_tokens), int(row.pages_per_block), virtual, quota)
        w.keys[key] = (Shape.from_info(info[name]), _placement(mp, name, devs, tp, node))
        replicas.setdefault(name, []).append((w, key))
    for w in workers.values():
        w.sched = GlobalScheduler(w.kv, list(w.keys), limits)
    context = {name: info[name].max_position_embeddings for name in replicas}
    return Layout(mode, list(workers.values()), replicas, context)


def _placement(mp, name: str, devs: tuple[int, ...], tp: int, node: dict[int, int]) -> Placement:
    if mp.mode != "crosspool" or mp.placement is None:
        return Placement(tp=tp)
    m = mp.placement.model(name)
    servers = {s for s, ids in enumerate(m.experts) if ids}
    servers |= {s for s in (m.shared_server, m.dense_server) if s is not None}
    ffn_devs = {mp.placement.servers[s].device for s in servers}
    inter = any(node[f] != node[d] for f in ffn_devs for d in devs)
    return Placement(tp=tp, crosspool=True, ffn_servers=max(1, len(servers)), inter_node=inter)


# -- the replay ---------------------------------------------------------------------------------


@dataclass
class _Req:
    rec: dict
    sched: SchedReq | None = None
    worker: Worker | None = None
    arrival: float = 0.0
    tokens: list[float] = field(default_factory=list)
    done: bool = False
    status: int = 200


def simulate(plan, mode: str, trace: list[dict], cost: CostModel, limits: SchedulerLimits,
             gpus_per_node: int | None = None, clamp_context: bool = False,
             kv_samples: int = 400) -> dict:
    return replay(build_layout(plan, mode, limits, gpus_per_node), trace, cost, clamp_context,
                  kv_samples)


def replay(layout: Layout, trace: list[dict], cost, clamp_context: bool = False,
           kv_samples: int = 400) -> dict:
    """Runs the trace through the layout's workers. `cost` needs `step(shape, StepBatch,
    Placement)` and `vmm(mapped_pages, unmapped_pages)`, in seconds."""
    reqs = [_Req(r, arrival=float(r["t"])) for r in sorted(trace, key=lambda r: (r["t"], r["id"]))]
    events: list[tuple[float, int, int]] = []  # (time, order, worker index) of step ends
    order = 0
    now = 0.0
    timeline: list[tuple[float, int]] = []
    by_sched: dict[int, _Req] = {}
    running: dict[int, tuple[float, object]] = {}  # worker -> (end, batch)
    ai = 0

    def start(wi: int) -> None:
        nonlocal order
        w = layout.workers[wi]
        batch = w.sched.schedule()
        if batch is None:
            w.busy = False
            return
        shape, place = w.keys[batch.model]
        b = StepBatch(tuple(s.length for s in batch.seqs),
                      tuple(s.start + s.length for s in batch.seqs))
        mapped, unmapped = w.kv.take_counts()
        dur = cost.step(shape, b, place) + cost.vmm(mapped, unmapped)
        w.busy, w.busy_s, w.steps = True, w.busy_s + dur, w.steps + 1
        running[wi] = (now + dur, batch)
        heapq.heappush(events, (now + dur, order, wi))
        order += 1
        timeline.append((now, sum(x.kv.used_pages for x in layout.workers)))

    def arrive(r: _Req) -> None:
        rec = r.rec
        reps = layout.replicas.get(rec["model"])
        if not reps:
            r.done, r.status = True, 400  # unknown model: InvalidRequest
            return
        ctx = layout.context[rec["model"]]
        prompt, output = rec["prompt_len"], rec["output_len"]
        if clamp_context:
            prompt, output = clamp(prompt, output, ctx - 1, None)
        if prompt >= ctx:
            r.done, r.status = True, 400
            return
        output = max(1, min(output, ctx - prompt))
        w, key = min(reps, key=lambda wk: sum(1 for q in wk[0].sched.requests.values()
                                               if q.model == wk[1]))
        sr = SchedReq(str(rec["id"]), key, [0] * prompt, output)
        try:
            w.sched.add(sr)
        except RequestTooLarge:
            r.done, r.status = True, 413
            return
        r.sched, r.worker = sr, w
        by_sched[id(sr)] = r

    while ai < len(reqs) or events:
        if ai < len(reqs) and (not events or reqs[ai].arrival <= events[0][0]):
            # Every request of this instant reaches the scheduler before an idle worker
            # schedules (the engine drains its inbox before each step).
            now = reqs[ai].arrival
            while ai < len(reqs) and reqs[ai].arrival == now:
                arrive(reqs[ai])
                ai += 1
            for wi, w in enumerate(layout.workers):
                if not w.busy:
                    start(wi)
            continue
        now, _, wi = heapq.heappop(events)
        w = layout.workers[wi]
        _, batch = running.pop(wi)
        w.sched.advance(batch)
        for seq in batch.seqs:
            sr = seq.req
            if not seq.completes or not sr.wants_more_tokens:
                continue
            sr.output_ids.append(0)
            r = by_sched[id(sr)]
            r.tokens.append(now)
            if not sr.wants_more_tokens:
                w.sched.finish(sr)
                r.done = True
        start(wi)
    return _result(layout, reqs, timeline, kv_samples)


def _result(layout: Layout, reqs: list[_Req], timeline, kv_samples: int) -> dict:
    records = []
    for r in reqs:
        ok = bool(r.tokens) and r.status == 200 and r.sched is not None and \
            len(r.sched.output_ids) >= r.sched.max_new_tokens
        records.append({
            "id": r.rec["id"], "model": r.rec["model"], "ok": ok,
            "status": r.status if r.status != 200 or ok else 500,
            "ttft": (r.tokens[0] - r.arrival) if r.tokens else None,
            "gaps": [b - a for a, b in zip(r.tokens, r.tokens[1:])],
            "prompt_tokens": r.rec["prompt_len"] if r.sched is None else len(r.sched.prompt_ids),
            "completion_tokens": len(r.tokens),
            "retractions": r.sched.retractions if r.sched else 0,
        })
    start = min((r.arrival for r in reqs), default=0.0)
    end = max((r.tokens[-1] for r in reqs if r.tokens), default=start)
    return {"records": records, "duration": end - start, "timeline": _thin(timeline, kv_samples),
            "workers": [{"name": w.name, "devices": list(w.devices), "models": list(w.keys),
                         "kv_pages": w.kv.budget, "steps": w.steps, "busy_s": w.busy_s,
                         "retractions": w.sched.num_retractions} for w in layout.workers],
            "kv_pages_total": sum(sum(w.kv.budget.values()) for w in layout.workers),
            "kv_pages_peak": max((u for _, u in timeline), default=0)}


def _thin(timeline: list[tuple[float, int]], n: int) -> list[list[float]]:
    if len(timeline) <= n:
        return [[round(t, 4), u] for t, u in timeline]
    step = len(timeline) / n
    return [[round(timeline[int(i * step)][0], 4), timeline[int(i * step)][1]] for i in range(n)]


def summarize(result: dict, slo_ttft: float | None, slo_tbt: float | None) -> dict:
    s = stats.summarize(result["records"], result["duration"], slo_ttft, slo_tbt)
    s["preempted"] = sum(w["retractions"] for w in result["workers"])
    s["kv_pages_peak"] = result["kv_pages_peak"]
    s["kv_pages_total"] = result["kv_pages_total"]
    s["duration_s"] = result["duration"]
    return s


# -- command line -------------------------------------------------------------------------------


def run_modes(plan, trace, cost, limits, modes, slo_ttft, slo_tbt, gpus_per_node=None,
              clamp_context=False, keep_records=False) -> dict:
    out = {}
    for mode in modes:
        if not plan.mode(mode).served:
            out[mode] = {"error": "the plan serves no model in this mode"}
            continue
        res = simulate(plan, mode, trace, cost, limits, gpus_per_node, clamp_context)
        entry = {"summary": summarize(res, slo_ttft, slo_tbt), "workers": res["workers"],
                 "kv_pages_timeline": res["timeline"]}
        if keep_records:
            entry["records"] = res["records"]
        out[mode] = entry
    return out


def _cost(args) -> CostModel:
    kw = {"graph_max_bs": args.graph_max_bs, "crosspool_eager_factor": args.crosspool_eager_factor}
    if args.prefill_flops is not None:
        kw["prefill_flops_per_s"] = args.prefill_flops
    return CostModel(**kw)


def map_models(trace: list[dict], names: list[str]) -> list[dict]:
    """The trace's models onto `names` by popularity, as `fleet_gpu_run.mapped_trace` does:
    the most requested becomes names[0], and so on, round robin past len(names)."""
    counts: dict[str, int] = {}
    for rec in trace:
        counts[rec["model"]] = counts.get(rec["model"], 0) + 1
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    target = {m: names[i % len(names)] for i, m in enumerate(ranked)}
    return [dict(rec, model=target[rec["model"]]) for rec in trace]


def cmd_run(args) -> int:
    from sglang_crosspool.planner import load_plan

    plan = load_plan(args.plan)
    trace = read_trace(args.trace)
    if args.map_models:
        trace = map_models(trace, [m.name for m in plan.models])
    if args.time_scale != 1.0:
        trace = [dict(r, t=r["t"] * args.time_scale) for r in trace]
    limits = SchedulerLimits(args.max_running_requests, args.chunked_prefill_size)
    cost = _cost(args)
    modes = args.modes.split(",")
    result = {"command": " ".join(sys.argv), "plan": str(args.plan), "trace": str(args.trace),
              "limits": vars(limits), "slo": {"ttft_s": args.slo_ttft, "tbt_s": args.slo_tbt},
              "gpus_per_node": args.gpus_per_node, "clamp_context": args.clamp,
              "time_scale": args.time_scale, "map_models": args.map_models,
              "coefficients": cost.coefficients(),
              "modes": run_modes(plan, trace, cost, limits, modes, args.slo_ttft, args.slo_tbt,
                                 args.gpus_per_node, args.clamp, args.records)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for mode, entry in result["modes"].items():
        s = entry.get("summary")
        if s is None:
            print(f"{mode:10s} {entry['error']}")
            continue
        print(f"{mode:10s} done {s['completed']}/{s['sent']} rejected {s['rejected']} "
              f"TTFT p50/p99 {_f(s['ttft_p50'])}/{_f(s['ttft_p99'])} s  "
              f"TBT p50/p99 {_f(s['tbt_p50'], 1e3)}/{_f(s['tbt_p99'], 1e3)} ms  "
              f"preempted {s['preempted']} goodput {_f(s['goodput_fraction'])} "
              f"KV peak {s['kv_pages_peak']}/{s['kv_pages_total']} pages")
    return 0


def _f(x, scale=1.0) -> str:
    return "-" if x is None else f"{x * scale:.3f}"


def cmd_fit(args) -> int:
    """Grid searches of the two fitted constants on the fleet-2xh200 burst: the server's time
    per step (both modes' TBT p50), then the prefill FLOP rate (monolithic's TTFT p50)."""
    from sglang_crosspool.planner import load_plan

    fleet = sim_costs.RESULTS / "fleet-2xh200"
    plan = load_plan(fleet / "plan.json")
    limits = SchedulerLimits(32, 2048)
    modes = ("monolithic", "crosspool")
    traces = {m: read_trace(fleet / m / "burst.jsonl") for m in modes}
    measured = {m: json.loads((fleet / m / "result.json").read_text())["burst"]["summary"]
                for m in modes}

    def run(mode: str, **kw) -> dict:
        cost = CostModel(graph_max_bs=16, **kw)
        return summarize(simulate(plan, mode, traces[mode], cost, limits), None, None)

    best = None
    for us in range(0, 3001, 100):
        err = sum(abs(run(m, step_overhead_s=us * 1e-6)["tbt_p50"] / measured[m]["tbt_p50"] - 1)
                  for m in modes)
        if best is None or err < best[0]:
            best = (err, us)
    overhead = best[1] * 1e-6
    print(f"step overhead: {best[1]} us (sum of |TBT p50 errors| {best[0]:.3f})")
    target = measured["monolithic"]["ttft_p50"]
    best = None
    for tflops in range(40, 1001, 10):
        p50 = run("monolithic", step_overhead_s=overhead,
                  prefill_flops_per_s=tflops * 1e12)["ttft_p50"]
        err = abs(p50 / target - 1)
        if best is None or err < best[0]:
            best = (err, tflops, p50)
    print(f"prefill: target TTFT p50 {target:.4f} s; best {best[1]} TFLOP/s -> {best[2]:.4f} s "
          f"({best[0]:+.1%})")
    return 0


def cmd_table(args) -> int:
    """Markdown tables of a folder's validate-fleet-*.json and predict-*.json files."""
    folder = Path(args.folder)
    fleet = sim_costs.RESULTS / "fleet-2xh200"
    print("| run | figure | measured | predicted | error |\n| --- | --- | ---: | ---: | ---: |")
    for path in sorted(folder.glob("validate-fleet-*.json")):
        d = json.loads(path.read_text())
        for mode, entry in d["modes"].items():
            meas = json.loads((fleet / mode / "result.json").read_text())["burst"]["summary"]
            s = entry["summary"]
            for key, scale, unit in (("ttft_p50", 1, "s"), ("ttft_p99", 1, "s"),
                                     ("tbt_p50", 1e3, "ms"), ("tbt_p99", 1e3, "ms"),
                                     ("kv_pages_used_max", 1, "pages")):
                got = s["kv_pages_peak" if key == "kv_pages_used_max" else key] * scale
                want = meas[key] * scale
                print(f"| {path.stem.removeprefix('validate-')} | {key} ({unit}) | {want:.4g} | "
                      f"{got:.4g} | {got / want - 1:+.0%} |")
    headline = sim_costs.RESULTS / "headline-2xh200-partial" / "summary.json"
    runs = sorted(folder.glob("validate-headline-*.json"))
    if runs and headline.exists():
        measured = json.loads(headline.read_text())
        print("\n| trace @ load | mode | TTFT p50 s | TTFT p99 s | TBT p50 ms | TBT p99 ms |\n"
              "| --- | --- | ---: | ---: | ---: | ---: |")
        for path in runs:
            trace, load = path.stem.removeprefix("validate-headline-").rsplit("-load", 1)
            d = json.loads(path.read_text())
            for mode, entry in d["modes"].items():
                want = measured[mode]["traces"][f"{trace}@{load}"]["summary"]
                got = entry["summary"]
                cells = []
                for key, scale in (("ttft_p50", 1), ("ttft_p99", 1), ("tbt_p50", 1e3),
                                   ("tbt_p99", 1e3)):
                    cells.append(f"{want[key] * scale:.3g} / {got[key] * scale:.3g} "
                                 f"({got[key] / want[key] - 1:+.0%})")
                print(f"| {trace} @ {load} | {mode} | " + " | ".join(cells) + " |")
    print("\n| setting | trace | req/s | mode | done/sent | rejected | TTFT p50 / p99 s | "
          "TBT p50 / p99 ms | preempted | goodput | KV pages peak / total |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    runs = []
    for path in folder.glob("predict-*.json"):
        d = json.loads(path.read_text())
        name = path.stem.removeprefix("predict-")
        setting, variant, scale = name.rsplit("-", 2)
        rate = 4 / float(scale.removeprefix("x"))
        runs.append((setting, variant, -rate, d))
    for setting, variant, rate, d in sorted(runs, key=lambda r: r[:3]):
        for mode, entry in d["modes"].items():
            s = entry.get("summary")
            if s is None:
                continue
            print(f"| {setting} | {variant} | {-rate:g} | {mode} | {s['completed']}/{s['sent']} "
                  f"| {s['rejected']} | {s['ttft_p50']:.3f} / {s['ttft_p99']:.2f} | "
                  f"{s['tbt_p50'] * 1e3:.1f} / {s['tbt_p99'] * 1e3:.0f} | {s['preempted']} | "
                  f"{s['goodput_fraction']:.2f} | {s['kv_pages_peak']:,} / "
                  f"{s['kv_pages_total']:,} |")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="replay a trace against a plan, every pool mode")
    r.add_argument("--plan", required=True)
    r.add_argument("--trace", required=True)
    r.add_argument("--modes", default=",".join(MODES))
    r.add_argument("--out")
    r.add_argument("--max-running-requests", type=int, default=32, help="per attention worker")
    r.add_argument("--chunked-prefill-size", type=int, default=2048)
    r.add_argument("--graph-max-bs", type=int, default=64,
                   help="decode batches up to this run as CUDA graphs; larger ones eagerly")
    r.add_argument("--prefill-flops", type=float, help="override the fitted prefill FLOP/s")
    r.add_argument("--crosspool-eager-factor", type=float, default=1.0,
                   help="multiply crosspool's eager (prefill, mixed) steps (sensitivity)")
    r.add_argument("--gpus-per-node", type=int, help="crossings between nodes cost more")
    r.add_argument("--clamp", action="store_true",
                   help="clamp each request's lengths to its model's context (trace.clamp)")
    r.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times")
    r.add_argument("--map-models", action="store_true",
                   help="map the trace's models onto the plan's by popularity (fleet_gpu_run)")
    r.add_argument("--slo-ttft", type=float, default=2.0)
    r.add_argument("--slo-tbt", type=float, default=0.1)
    r.add_argument("--records", action="store_true", help="keep per-request records")
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("fit", help="refit the step overhead and prefill rate on the fleet burst")
    f.set_defaults(func=cmd_fit)
    t = sub.add_parser("table", help="markdown tables of a results folder")
    t.add_argument("folder")
    t.set_defaults(func=cmd_table)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
