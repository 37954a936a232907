"""The simulator's fits and tables: `python -m benchmark.simulate fit` and `... table FOLDER`.

In: the committed GPU results (benchmark/results/fleet-2xh200, headline-2xh200-partial) and a
folder of simulator outputs. Out: `fit` prints the grid searches of the three fitted
constants of `sim_costs` (paste them there); `table` prints the markdown tables of the
validation (measured / predicted and the error) and of the predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

from crosspool_scheduler import SchedulerLimits

from benchmark import sim_costs
from benchmark.sim_costs import CostModel
from benchmark.simulate import MODES, simulate, summarize
from benchmark.trace import read_trace


def cmd_fit(args) -> int:
    """Grid searches of the three fitted constants, each on a burst of 20 requests to the
    fleet of fleet-2xh200: the server's time per step (monolithic's and crosspool's TBT p50),
    the prefill FLOP rate (monolithic's TTFT p50), then the attention side's share of the
    per-layer fixed time (TBT p50 of the burst served with --pipeline-models)."""
    from sglang_crosspool.planner import load_plan

    fleet = sim_costs.RESULTS / "fleet-2xh200"
    plan = load_plan(fleet / "plan.json")
    limits = SchedulerLimits(32, 2048)
    modes = ("monolithic", "crosspool")
    traces = {m: read_trace(fleet / m / "burst.jsonl") for m in modes}
    measured = {m: json.loads((fleet / m / "result.json").read_text())["burst"]["summary"]
                for m in modes}

    def run(mode: str, pipeline: bool = False, **kw) -> dict:
        cost = CostModel(graph_max_bs=16, **kw)
        res = simulate(plan, mode, traces[mode], cost, limits, pipeline_models=pipeline)
        return summarize(res, None, None)

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
    rate = best[1] * 1e12
    pipelined = sim_costs.RESULTS / "headline-2xh200-partial" / "crosspool-pipeline-models"
    target = json.loads((pipelined / "result.json").read_text())["burst"]["summary"]["tbt_p50"]
    best = None
    for pct in range(0, 101, 5):
        p50 = run("crosspool", True, step_overhead_s=overhead, prefill_flops_per_s=rate,
                  attention_share=pct / 100)["tbt_p50"]
        err = abs(p50 / target - 1)
        if best is None or err < best[0]:
            best = (err, pct, p50)
    print(f"attention share: target pipelined TBT p50 {target * 1e3:.2f} ms; best {best[1]}% "
          f"-> {best[2] * 1e3:.2f} ms ({best[0]:+.1%})")
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
    path = folder / "validate-headline.json"
    if path.exists() and headline.exists():
        measured = json.loads(headline.read_text())
        print("\n| trace @ load | mode | TTFT p50 s | TTFT p99 s | TBT p50 ms | TBT p99 ms | "
              "KV pages peak |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        rows = []
        pipelined = headline.parent / "crosspool-pipeline-models" / "summary.json"
        if pipelined.exists():
            measured["crosspool-pipelined"] = json.loads(pipelined.read_text())["crosspool"]
        order = [*MODES, "crosspool-pipelined"]
        for mode, entry in json.loads(path.read_text())["modes"].items():
            for label, e in entry["replays"].items():
                rows.append((label, order.index(mode), mode, e["summary"],
                             measured[mode]["traces"][label]["summary"]))
        for label, _, mode, got, want in sorted(rows):
            cells = []
            for key, scale in (("ttft_p50", 1), ("ttft_p99", 1), ("tbt_p50", 1e3),
                               ("tbt_p99", 1e3), ("kv_pages_used_max", 1)):
                g = got["kv_pages_peak" if key == "kv_pages_used_max" else key] * scale
                w = want[key] * scale
                fmt = ",.0f" if key == "kv_pages_used_max" else ".3g"
                cells.append(f"{w:{fmt}} / {g:{fmt}} ({g / w - 1:+.0%})")
            print(f"| {label.replace('@', ' @ ')} | {mode} | " + " | ".join(cells) + " |")
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
