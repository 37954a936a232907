"""The headline report: a table per trace and load, the monolithic / crosspool P99 TBT ratio,
and plots, from `benchmark/fleet_gpu_run.py` results (one folder per pool mode, possibly from
several calls).

In: `--run LABEL=FOLDER` (repeat): FOLDER holds one server's `<trace>-load<L>.results.json`
files (fleet_gpu_run's `<out>/<mode>/`); LABEL names it in the report (`monolithic`,
`crosspool`, `crosspool --pipeline-models`, ...). `--baseline` and `--candidate` name the two
labels of the headline ratio. Out (`--out`): `report.md` and, per trace, `p99_tbt_vs_load-<trace>.png`,
`tbt_cdf-<trace>.png` (at the knee: the lowest load where the baseline preempted, else the
highest load) and `kv_pages-<trace>.png` (KV pages in use per GPU over time at that load).

    python -m benchmark.headline_report --run monolithic=out/fleet/monolithic \\
        --run crosspool=out/fleet/crosspool --out benchmark/results/headline-2xh200-x
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmark import plots  # noqa: E402

NAME = re.compile(r"^(?P<trace>.+)-load(?P<load>[0-9.]+)\.results\.json$")


def load_runs(specs: list[str]) -> dict[str, dict[str, dict[float, dict]]]:
    """label -> trace -> load -> runner result."""
    runs: dict[str, dict[str, dict[float, dict]]] = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"--run: expected LABEL=FOLDER, got {spec!r}")
        for path in sorted(Path(folder).glob("*-load*.results.json")):
            m = NAME.match(path.name)
            if m:
                runs.setdefault(label, {}).setdefault(m["trace"], {})[float(m["load"])] = \
                    json.loads(path.read_text())
    return runs


def hot_model_peak_pages(result: dict) -> tuple[str | None, float]:
    """The trace's most requested model and the most KV pages it held at once."""
    counts: dict[str, int] = {}
    for rec in result["records"]:
        counts[rec["model"]] = counts.get(rec["model"], 0) + 1
    if not counts:
        return None, 0.0
    hot = max(counts, key=counts.get)
    peak = max((s["model_pages"].get(hot, 0.0) for s in result["kv_timeline"]), default=0.0)
    return hot, peak


def knee(runs: dict, trace: str, baseline: str) -> float | None:
    points = runs.get(baseline, {}).get(trace, {})
    if not points:
        return None
    preempting = [load for load, r in sorted(points.items())
                  if r["overall"].get("preempted")]
    return preempting[0] if preempting else max(points)


def table(runs: dict, trace: str) -> list[str]:
    out = [f"### {trace}", "",
           "| load | mode | done | errors | TTFT p50 / p99 s | TBT p50 / p99 ms | goodput | "
           "out tok/s | preempted | hot model | its peak KV pages |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    loads = sorted({load for per in runs.values() for load in per.get(trace, {})})
    for load in loads:
        for label, per in runs.items():
            r = per.get(trace, {}).get(load)
            if r is None:
                continue
            o = r["overall"]
            hot, peak = hot_model_peak_pages(r)
            out.append(
                f"| {load:g} | {label} | {o['completed']}/{o['sent']} | {o['errors']} | "
                f"{_f(o['ttft_p50'])} / {_f(o['ttft_p99'])} | {_ms(o['tbt_p50'])} / "
                f"{_ms(o['tbt_p99'])} | {o['goodput_fraction']:.2f} | "
                f"{o['output_tokens_per_s']:.0f} | {o.get('preempted', 0):g} | {hot} | "
                f"{peak:,.0f} |")
    return out + [""]


def ratios(runs: dict, trace: str, baseline: str, candidate: str) -> list[str]:
    base, cand = runs.get(baseline, {}).get(trace, {}), runs.get(candidate, {}).get(trace, {})
    out = [f"Headline ratio on {trace}: {baseline} P99 TBT / {candidate} P99 TBT "
           "(above 1: the candidate is better), and the hot model's peak KV pages "
           f"({candidate} / {baseline}: concurrent tokens it held, same block layout)", "",
           "| load | ratio | preempted (baseline / candidate) | peak KV pages ratio |",
           "| ---: | ---: | ---: | ---: |"]
    for load in sorted(set(base) & set(cand)):
        b, c = base[load]["overall"], cand[load]["overall"]
        ratio = b["tbt_p99"] / c["tbt_p99"] if b["tbt_p99"] and c["tbt_p99"] else None
        _, pb = hot_model_peak_pages(base[load])
        _, pc = hot_model_peak_pages(cand[load])
        out.append(f"| {load:g} | {_f(ratio, 2)} | {b.get('preempted', 0):g} / "
                   f"{c.get('preempted', 0):g} | {_f(pc / pb if pb else None, 2)} |")
    return out + [""]


def plot_sweep(runs: dict, trace: str, path: Path) -> Path:
    return plots.p99_tbt_vs_load(
        {label: [{"load": load, "overall": r["overall"]} for load, r in
                 sorted(per.get(trace, {}).items())] for label, per in runs.items()}, path)


def plot_cdf(runs: dict, trace: str, load: float, path: Path) -> Path:
    return plots.tbt_cdf({label: per[trace][load] for label, per in runs.items()
                          if load in per.get(trace, {})}, path)


def plot_kv(runs: dict, trace: str, load: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per in runs.items():
        r = per.get(trace, {}).get(load)
        timeline = (r or {}).get("kv_timeline", [])
        gpus = sorted({gpu for s in timeline for gpu in s.get("gpu_used", {})})
        for gpu in gpus:
            ax.plot([s["t"] for s in timeline], [s.get("gpu_used", {}).get(gpu, 0)
                                                 for s in timeline], label=f"{label} {gpu}")
        if timeline and not gpus:  # results from before the per-GPU gauge: the pool's sum
            ax.plot([s["t"] for s in timeline], [sum(s["pool_used"].values())
                                                 for s in timeline], label=f"{label} (all)")
    ax.set_xlabel("time since replay start (s)")
    ax.set_ylabel("KV pages in use")
    ax.set_title(f"{trace}, load {load:g}, per GPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(x) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER")
    p.add_argument("--baseline", default="monolithic")
    p.add_argument("--candidate", default="crosspool")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    runs = load_runs(a.run)
    a.out.mkdir(parents=True, exist_ok=True)
    traces = sorted({trace for per in runs.values() for trace in per})
    lines = ["# Headline report", ""]
    for trace in traces:
        lines += table(runs, trace)
        lines += ratios(runs, trace, a.baseline, a.candidate)
        plot_sweep(runs, trace, a.out / f"p99_tbt_vs_load-{trace}.png")
        at = knee(runs, trace, a.baseline)
        if at is not None:
            plot_cdf(runs, trace, at, a.out / f"tbt_cdf-{trace}.png")
            plot_kv(runs, trace, at, a.out / f"kv_pages-{trace}.png")
            lines += [f"Plots at load {at:g} (the baseline's first preempting load, else the "
                      "highest): "
                      f"`tbt_cdf-{trace}.png`, `kv_pages-{trace}.png`; "
                      f"`p99_tbt_vs_load-{trace}.png` over every load.", ""]
    report = a.out / "report.md"
    report.write_text("\n".join(lines))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
