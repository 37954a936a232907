"""One command: the same trace on each pool mode in turn, a fresh server each, then plots.

In: a JSONL trace (`benchmark.trace`), the models it names (`--model NAME=PATH`; `--checkpoints
DIR` to hand the checkpoint folders under DIR to the names in turn; or `--tiny` to make a tiny
random checkpoint per model name, architectures taken in turn), the pool modes, and
launch flags shared by all modes (`--server-args`) or for one mode (`--mode-args MODE=FLAGS`).
Out, under `--out`: `results.json` (the command, and per mode the runner's result: records, KV
timeline, summaries, server exit code and log), `server-MODE.log`, and the PNG plots of
`benchmark.plots`. A mode whose server does not start is recorded with its error; the others
still run. `--loads 0.5,1,2` replays the trace again at those arrival-rate multipliers on the
same server (waiting for its KV pool to drain between them) for the P99-TBT-vs-load plot.

    python -m benchmark.experiment --trace trace.jsonl --tiny --time-scale 0.2 \
        --server-args "--max-total-tokens 4096" --out benchmark/results/cpu-demo
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.request
from pathlib import Path

from benchmark import plots, prom, runner, server_proc
from benchmark.trace import read_trace

MODES = ("static", "monolithic", "crosspool")
TINY_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def tiny_models(names: list[str], folder: Path) -> dict[str, str]:
    from sglang_crosspool.testing.checkpoints import make_model
    return {n: str(make_model(folder / n, TINY_ARCHS[i % len(TINY_ARCHS)], seed=i))
            for i, n in enumerate(names)}


def from_folder(names: list[str], folder: Path) -> dict[str, str]:
    """Trace model names (sorted) onto the checkpoint folders under `folder` (sorted), taken in
    turn: 32 served models can share 4 checkpoints, each name still a model of its own."""
    dirs = sorted(str(d) for d in folder.iterdir() if (d / "config.json").exists())
    if not dirs:
        raise SystemExit(f"no checkpoint (config.json) under {folder}")
    return {n: dirs[i % len(dirs)] for i, n in enumerate(sorted(names))}


def parse_models(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        name, _, path = s.partition("=")
        if not path:
            raise SystemExit(f"--model wants NAME=PATH, got {s!r}")
        out[name] = path
    return out


def wait_idle(url: str, timeout: float = 60.0) -> bool:
    """True once the server holds no KV page (between two loads on one server); then flushes
    its prefix cache so that the next replay does not reuse the previous one's prompts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            samples = prom.parse(r.read().decode())
        if not any(prom.by_label(samples, prom.POOL_USED, "pool").values()):
            urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", method="POST"),
                                   timeout=30).close()
            return True
        time.sleep(0.2)
    return False


def run_mode(mode: str, models: dict[str, str], extra: list[str], a: argparse.Namespace,
             loads: list[float]) -> tuple[dict, list[dict]]:
    """The replay at loads[0] (full result) and a summary per load, on one fresh server."""
    log = a.out / f"server-{mode}.log"
    t = time.monotonic()
    try:
        server = server_proc.start(models, mode, extra, log, timeout=a.start_timeout)
    except RuntimeError as e:
        return {"error": str(e)[-4000:], "log": str(log), "server_args": extra}, []
    started = time.monotonic() - t
    sweep = []
    try:
        for i, load in enumerate(loads):
            if i and not wait_idle(server.url):
                print(f"[{mode}] KV pages still in use before load {load}", file=sys.stderr)
            r = runner.run(server.url, a.trace, a.time_scale / load, a.vocab_size, a.slo_ttft,
                           a.slo_tbt, a.poll_interval, a.request_timeout)
            sweep.append({"load": load, "time_scale": a.time_scale / load,
                          "overall": r["overall"]})
            if i == 0:
                result = r
    finally:
        code = server.stop()
    result.update({"load": loads[0], "server_start_s": started, "server_exit_code": code,
                   "log": str(log), "server_args": extra})
    return result, sweep


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--model", action="append", default=[], help="NAME=PATH; repeatable")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoints (CPU runs)")
    p.add_argument("--checkpoints", type=Path,
                   help="folder of checkpoints handed out to the trace's models in turn")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--server-args", default="", help="launch flags for every mode")
    p.add_argument("--mode-args", action="append", default=[], help="MODE=FLAGS; repeatable")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--loads", default="1",
                   help="arrival-rate multipliers, comma-separated; the first one's full "
                        "records are kept, the others are summarised (same server)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--slo-ttft", type=float)
    p.add_argument("--slo-tbt", type=float)
    p.add_argument("--poll-interval", type=float, default=0.25)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    names = sorted({r["model"] for r in read_trace(a.trace)})
    models = parse_models(a.model)
    if a.checkpoints:
        models = {**from_folder([n for n in names if n not in models], a.checkpoints), **models}
    if a.tiny:
        models = {**tiny_models([n for n in names if n not in models], a.out / "models"),
                  **models}
    missing = [n for n in names if n not in models]
    if missing:
        raise SystemExit(f"the trace names models with no checkpoint: {missing}")
    per_mode = {}
    for spec in a.mode_args:
        mode, _, flags = spec.partition("=")
        per_mode[mode] = shlex.split(flags)
    results = {"command": "python -m benchmark.experiment " + shlex.join(argv),
               "trace": str(a.trace), "models": models, "runs": {}}
    loads = [float(x) for x in a.loads.split(",")]
    results["load_sweep"] = {}
    for mode in a.modes.split(","):
        extra = shlex.split(a.server_args) + per_mode.get(mode, [])
        r, sweep = run_mode(mode, models, extra, a, loads)
        results["runs"][mode] = r
        results["load_sweep"][mode] = sweep
        line = runner.headline(r["overall"]) if "overall" in r else "FAILED: " + r["error"][-300:]
        print(f"[{mode}] {line}", file=sys.stderr, flush=True)
    results["plots"] = [str(p) for p in plots.write_all(results, a.out)]
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
