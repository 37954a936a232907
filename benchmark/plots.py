"""PNG plots of an experiment: TBT CDF per mode, KV pages over time, P99 TBT per mode and vs load.

In: the experiment's results dict ({"runs": {mode: runner result}, "load_sweep": {mode: [{load,
overall}]}}) and an output folder. Out: `tbt_cdf.png`, `kv_pages.png`, `p99_tbt.png` and, when
more than one load was run, `p99_tbt_vs_load.png` there; returns their paths.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmark.stats import cdf


def tbt_cdf(runs: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, r in runs.items():
        gaps = [g * 1000 for rec in r["records"] for g in rec["gaps"]]
        if gaps:
            xs, ys = cdf(gaps)
            ax.plot(xs, ys, label=mode)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("time between tokens (ms)")
    ax.set_ylabel("CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kv_pages(runs: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, r in runs.items():
        tl = r["kv_timeline"]
        ax.plot([s["t"] for s in tl], [sum(s["pool_used"].values()) for s in tl], label=mode)
    ax.set_xlabel("time since replay start (s)")
    ax.set_ylabel("KV pages in use (all pools)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def p99_tbt(runs: dict, path: Path) -> Path:
    modes = list(runs)
    vals = [(runs[m]["overall"]["tbt_p99"] or 0.0) * 1000 for m in modes]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(modes, vals, color="tab:blue")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("P99 time between tokens (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def p99_tbt_vs_load(sweep: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, points in sweep.items():
        pts = [(p["load"], p["overall"]["tbt_p99"]) for p in points
               if p["overall"]["tbt_p99"] is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y * 1000 for _, y in pts], marker="o", label=mode)
    ax.set_xlabel("load (multiple of the trace's arrival rate)")
    ax.set_ylabel("P99 time between tokens (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    runs = {m: r for m, r in results["runs"].items() if "records" in r}
    out = [tbt_cdf(runs, folder / "tbt_cdf.png"), kv_pages(runs, folder / "kv_pages.png"),
           p99_tbt(runs, folder / "p99_tbt.png")]
    sweep = {m: pts for m, pts in results.get("load_sweep", {}).items() if pts}
    if any(len(pts) > 1 for pts in sweep.values()):
        out.append(p99_tbt_vs_load(sweep, folder / "p99_tbt_vs_load.png"))
    return out
