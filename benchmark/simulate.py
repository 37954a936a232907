"""A discrete-event simulator of the serving engine: a trace replayed against a plan, per pool mode,
with step costs measured on the GPU (`benchmark/sim_costs.py`) and the scheduler's own code.

In: a plan (`python -m sglang_crosspool.plan ... --out plan.json`), traces (benchmark/trace.py's
JSONL), the engine's limits (max running requests, chunked prefill size, the CUDA graphs'
largest batch) and an SLO. Out: per pool mode the runner's summary (`benchmark.stats`: TTFT
and time-between-tokens percentiles, goodput under the SLO, rejections), preemptions
(retractions), KV pages in use over time and at peak, and each attention worker's busy time.

How the engine is mirrored:
- Attention workers come from the plan (`benchmark/sim_layout.py`); each owns one
  `crosspool_scheduler.GlobalScheduler` (admission, chunked prefill, round robin over its
  models, retraction of the newest request when pages run out: the real policy, not a copy)
  over `SimKV`, the plan's page budgets; optionally its `PrefixCache` too.
- A worker runs one step at a time: `schedule()` -> the step's cost -> `advance()`, sample one
  token per completed sequence, finish requests (as `EngineCore._run_batches` with one
  micro-batch). Workers run in parallel with each other. Requests of one instant all reach
  the scheduler before an idle worker schedules.
- A model with data-parallel replicas is one scheduler entry per replica (`name#r`); a request
  goes to the replica with the fewest requests, as the worker router does.
- Requests whose prompt reaches the model's context are refused (400) and the output is cut to
  the context (as the engine does); requests the plan does not serve, or whose KV could never
  fit (`RequestTooLarge`), are refused too.
- Several traces or loads replay one after another on one server per mode
  (`simulate_sequence`), as `fleet_gpu_run.py` does: KV and prefix caches carry over.

NOTE: not modelled: the HTTP/tokenizer path (requests reach the scheduler at their trace
time), the layer-wise pipeline with two micro-batches and `--pipeline-models` (steps are one
model's batch), contention between crosspool workers for the weights pool, CUDA-graph capture
and warm-up.

    python -m benchmark.simulate run --plan plan.json --trace trace.jsonl --out sim.json
    python -m benchmark.simulate fit     # the three fitted constants of sim_costs
    python -m benchmark.simulate table benchmark/results/simulate
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

from crosspool_scheduler import (  # noqa: E402
    PrefixCache,
    RequestTooLarge,
    SchedReq,
    SchedulerLimits,
)

from benchmark import stats  # noqa: E402
from benchmark.sim_costs import CostModel, StepBatch  # noqa: E402
from benchmark.sim_layout import Layout, SimKV, Worker, build_layout  # noqa: E402
from benchmark.trace import clamp, prompt_ids, read_trace  # noqa: E402

__all__ = ["Layout", "PrefixCache", "SimKV", "Worker", "build_layout", "replay", "simulate",
           "simulate_sequence", "summarize"]

MODES = ("static", "monolithic", "crosspool")


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


VOCAB = 32_000  # prompt ids (benchmark.trace.prompt_ids) only need to match across replays


def simulate(plan, mode: str, trace: list[dict], cost: CostModel, limits: SchedulerLimits,
             gpus_per_node: int | None = None, clamp_context: bool = False,
             kv_samples: int = 400, pipeline_models: bool = False) -> dict:
    layout = build_layout(plan, mode, limits, gpus_per_node, pipeline_models=pipeline_models)
    return replay(layout, trace, cost, clamp_context, kv_samples)


def simulate_sequence(plan, mode: str, replays: list[tuple[str, list[dict]]], cost: CostModel,
                      limits: SchedulerLimits, gpus_per_node: int | None = None,
                      clamp_context: bool = False, prefix_cache: bool = False,
                      gap_s: float = 5.0, pipeline_models: bool = False) -> dict[str, dict]:
    """Several replays one after another on one server (as fleet_gpu_run replays its traces
    and loads on one server per mode): KV and the prefix cache carry over between them."""
    layout = build_layout(plan, mode, limits, gpus_per_node, prefix_cache, pipeline_models)
    out, offset = {}, 0.0
    for label, trace in replays:
        shifted = [dict(r, t=r["t"] + offset) for r in trace]
        res = replay(layout, shifted, cost, clamp_context, tag=f"{label}/")
        out[label] = res
        offset = res["end"] + gap_s
    return out


def replay(layout: Layout, trace: list[dict], cost, clamp_context: bool = False,
           kv_samples: int = 400, tag: str = "") -> dict:
    """Runs the trace through the layout's workers. `cost` needs `step(shape, StepBatch,
    Placement)` and `vmm(mapped_pages, unmapped_pages)`, in seconds. With prefix caches in the
    layout, prompts are real token ids (`benchmark.trace.prompt_ids`), so a replayed prompt
    hits the cache."""
    reqs = [_Req(r, arrival=float(r["t"])) for r in sorted(trace, key=lambda r: (r["t"], r["id"]))]
    cached = any(w.sched.cache is not None for w in layout.workers)
    base = {w.name: (w.busy_s, w.steps, w.sched.num_retractions) for w in layout.workers}
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
        batches = w.sched.schedule_many(2 if w.pipeline_models else 1)
        if not batches:
            w.busy = False
            return
        work = [(*w.keys[batch.model], StepBatch(tuple(s.length for s in batch.seqs),
                                                 tuple(s.start + s.length for s in batch.seqs)))
                for batch in batches]
        if len(work) == 2 and hasattr(cost, "pair_step") and cost.pair_fits(work[0][2],
                                                                           work[1][2]):
            (sa, pa, ba), (sb, pb, bb) = work  # one pair graph (engine/pair_graphs.py)
            dur = cost.pair_step(sa, ba, pa, sb, bb, pb)
        else:  # graphs one after another, or (eager) micro-batches costed as their sum
            dur = sum(cost.step(shape, b, place) for shape, place, b in work)
        mapped, unmapped = w.kv.take_counts()
        dur += cost.vmm(mapped, unmapped)
        w.busy, w.busy_s, w.steps = True, w.busy_s + dur, w.steps + 1
        running[wi] = (now + dur, batches)
        heapq.heappush(events, (now + dur, order, wi))
        order += 1
        timeline.append((now, _pages_in_use(layout)))

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
        ids = prompt_ids(dict(rec, prompt_len=prompt), VOCAB) if cached else [0] * prompt
        sr = SchedReq(f"{tag}{rec['id']}", key, ids, output)
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
        _, batches = running.pop(wi)
        for batch in batches:
            w.sched.advance(batch)
        for seq in (seq for batch in batches for seq in batch.seqs):
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
    return _result(layout, reqs, timeline, kv_samples, base)


def _pages_in_use(layout: Layout) -> int:
    """Pages requests hold; cached pages nobody uses count as free, as the server counts."""
    used = 0
    for w in layout.workers:
        used += w.kv.used_pages
        if w.sched.cache is not None:
            used -= sum(t.evictable_blocks * w.kv.pages_per_block(m) * len(w.kv.keys[m].devices)
                        for m, t in w.sched.cache.trees.items())
    return used


def _result(layout: Layout, reqs: list[_Req], timeline, kv_samples: int, base: dict) -> dict:
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
            "cached_tokens": r.sched.cached_tokens if r.sched else 0,
        })
    start = min((r.arrival for r in reqs), default=0.0)
    end = max((r.tokens[-1] for r in reqs if r.tokens), default=start)
    return {"records": records, "duration": end - start, "end": end,
            "timeline": _thin(timeline, kv_samples),
            "workers": [{"name": w.name, "devices": list(w.devices), "models": list(w.keys),
                         "kv_pages": w.kv.budget, "steps": w.steps - base[w.name][1],
                         "busy_s": w.busy_s - base[w.name][0],
                         "retractions": w.sched.num_retractions - base[w.name][2]}
                        for w in layout.workers],
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


def _entry(res: dict, slo_ttft, slo_tbt, keep_records: bool) -> dict:
    entry = {"summary": summarize(res, slo_ttft, slo_tbt), "workers": res["workers"],
             "kv_pages_timeline": res["timeline"]}
    if keep_records:
        entry["records"] = res["records"]
    return entry


def run_modes(plan, trace, cost, limits, modes, slo_ttft, slo_tbt, gpus_per_node=None,
              clamp_context=False, keep_records=False) -> dict:
    out = {}
    for mode in modes:
        if not plan.mode(mode).served:
            out[mode] = {"error": "the plan serves no model in this mode"}
            continue
        res = simulate(plan, mode, trace, cost, limits, gpus_per_node, clamp_context)
        out[mode] = _entry(res, slo_ttft, slo_tbt, keep_records)
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


def _traces(args, plan) -> list[tuple[str, list[dict]]]:
    """(label, trace) per replay: each --trace at each of --loads (arrivals / load), or each
    --trace once at --time-scale."""
    out = []
    for path in args.trace:
        trace = read_trace(path)
        if args.map_models:
            trace = map_models(trace, [m.name for m in plan.models])
        if args.loads:
            for load in (float(x) for x in args.loads.split(",")):
                out.append((f"{Path(path).stem}@{load:g}",
                            [dict(r, t=r["t"] / load) for r in trace]))
        else:
            out.append((Path(path).stem, [dict(r, t=r["t"] * args.time_scale) for r in trace]))
    return out


def cmd_run(args) -> int:
    from sglang_crosspool.planner import load_plan

    plan = load_plan(args.plan)
    replays = _traces(args, plan)
    limits = SchedulerLimits(args.max_running_requests, args.chunked_prefill_size)
    cost = _cost(args)
    slo = (args.slo_ttft, args.slo_tbt)
    modes: dict[str, dict] = {}
    for name in args.modes.split(","):
        # `crosspool-pipelined`: crosspool with --pipeline-models, beside the plain modes
        mode = name.removesuffix("-pipelined")
        pipelined = args.pipeline_models or mode != name
        if not plan.mode(mode).served:
            modes[name] = {"error": "the plan serves no model in this mode"}
        elif len(replays) == 1 and not args.prefix_cache:
            res = simulate(plan, mode, replays[0][1], cost, limits, args.gpus_per_node,
                           args.clamp, pipeline_models=pipelined)
            modes[name] = _entry(res, *slo, args.records)
        else:  # one server per mode, the replays one after another
            runs = simulate_sequence(plan, mode, replays, cost, limits, args.gpus_per_node,
                                     args.clamp, args.prefix_cache, pipeline_models=pipelined)
            modes[name] = {"replays": {label: _entry(res, *slo, args.records)
                                       for label, res in runs.items()}}
    result = {"command": " ".join(sys.argv), "plan": str(args.plan), "trace": args.trace,
              "limits": vars(limits), "slo": {"ttft_s": args.slo_ttft, "tbt_s": args.slo_tbt},
              "gpus_per_node": args.gpus_per_node, "clamp_context": args.clamp,
              "time_scale": args.time_scale, "loads": args.loads, "map_models": args.map_models,
              "prefix_cache": args.prefix_cache, "pipeline_models": args.pipeline_models,
              "coefficients": cost.coefficients(),
              "modes": modes}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for mode, entry in modes.items():
        if "error" in entry:
            print(f"{mode:10s} {entry['error']}")
            continue
        for label, e in (entry["replays"].items() if "replays" in entry else [("", entry)]):
            s = e["summary"]
            print(f"{mode:10s} {label + ' ' if label else ''}done {s['completed']}/{s['sent']} "
                  f"rejected {s['rejected']} "
                  f"TTFT p50/p99 {_f(s['ttft_p50'])}/{_f(s['ttft_p99'])} s  "
                  f"TBT p50/p99 {_f(s['tbt_p50'], 1e3)}/{_f(s['tbt_p99'], 1e3)} ms  "
                  f"preempted {s['preempted']} goodput {_f(s['goodput_fraction'])} "
                  f"KV peak {s['kv_pages_peak']}/{s['kv_pages_total']} pages")
    return 0


def _f(x, scale=1.0) -> str:
    return "-" if x is None else f"{x * scale:.3f}"


def _report(name: str):
    """A subcommand of `benchmark/sim_report.py` (imported when it runs)."""
    def run(args) -> int:
        from benchmark import sim_report
        return getattr(sim_report, name)(args)
    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="replay a trace against a plan, every pool mode")
    r.add_argument("--plan", required=True)
    r.add_argument("--trace", required=True, action="append",
                   help="JSONL trace; repeat to replay several one after another")
    r.add_argument("--modes", default=",".join(MODES),
                   help="pool modes; crosspool-pipelined is crosspool with --pipeline-models")
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
    r.add_argument("--loads", help="replay each trace at these loads (arrival-rate "
                   "multipliers, e.g. 1,3), one after another on one server per mode")
    r.add_argument("--pipeline-models", action="store_true",
                   help="crosspool: two models' decode batches a step in one pair graph")
    r.add_argument("--prefix-cache", action="store_true",
                   help="per worker the scheduler's PrefixCache, prompts as real token ids")
    r.add_argument("--map-models", action="store_true",
                   help="map the trace's models onto the plan's by popularity (fleet_gpu_run)")
    r.add_argument("--slo-ttft", type=float, default=2.0)
    r.add_argument("--slo-tbt", type=float, default=0.1)
    r.add_argument("--records", action="store_true", help="keep per-request records")
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("fit", help="refit the step overhead and prefill rate on the fleet burst")
    f.set_defaults(func=_report("cmd_fit"))
    t = sub.add_parser("table", help="markdown tables of a results folder")
    t.add_argument("folder")
    t.set_defaults(func=_report("cmd_table"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
