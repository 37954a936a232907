"""One command: the same trace on each pool mode in turn, a fresh server each, then plots.

In: a JSONL trace (`benchmark.trace`), the models it names (`--model NAME=PATH`, or `--tiny` to
make a tiny random checkpoint per model name, architectures taken in turn), the pool modes, and
launch flags shared by all modes (`--server-args`) or for one mode (`--mode-args MODE=FLAGS`).
Out, under `--out`: `results.json` (the command, and per mode the runner's result: records, KV
timeline, summaries, server exit code and log), `server-MODE.log`, and the PNG plots of
`benchmark.plots`. A mode whose server does not start is recorded with its error; the others
still run.

    python -m benchmark.experiment --trace trace.jsonl --tiny --time-scale 0.2 \
        --server-args "--max-total-tokens 4096" --out benchmark/results/cpu-demo
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchmark import plots, runner, server_proc
from benchmark.trace import read_trace

MODES = ("static", "monolithic", "crosspool")
TINY_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def tiny_models(names: list[str], folder: Path) -> dict[str, str]:
    from sglang_crosspool.testing.checkpoints import make_model
    return {n: str(make_model(folder / n, TINY_ARCHS[i % len(TINY_ARCHS)], seed=i))
            for i, n in enumerate(names)}


def parse_models(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        name, _, path = s.partition("=")
        if not path:
            raise SystemExit(f"--model wants NAME=PATH, got {s!r}")
        out[name] = path
    return out


def run_mode(mode: str, models: dict[str, str], extra: list[str], a: argparse.Namespace) -> dict:
    log = a.out / f"server-{mode}.log"
    t = time.monotonic()
    try:
        server = server_proc.start(models, mode, extra, log, timeout=a.start_timeout)
    except RuntimeError as e:
        return {"error": str(e)[-4000:], "log": str(log), "server_args": extra}
    started = time.monotonic() - t
    try:
        result = runner.run(server.url, a.trace, a.time_scale, a.vocab_size, a.slo_ttft,
                            a.slo_tbt, a.poll_interval, a.request_timeout)
    finally:
        code = server.stop()
    result.update({"server_start_s": started, "server_exit_code": code, "log": str(log),
                   "server_args": extra})
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--model", action="append", default=[], help="NAME=PATH; repeatable")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoints (CPU runs)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--server-args", default="", help="launch flags for every mode")
    p.add_argument("--mode-args", action="append", default=[], help="MODE=FLAGS; repeatable")
    p.add_argument("--time-scale", type=float, default=1.0)
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
    for mode in a.modes.split(","):
        extra = shlex.split(a.server_args) + per_mode.get(mode, [])
        r = run_mode(mode, models, extra, a)
        results["runs"][mode] = r
        line = runner.headline(r["overall"]) if "overall" in r else "FAILED: " + r["error"][-300:]
        print(f"[{mode}] {line}", file=sys.stderr, flush=True)
    results["plots"] = [str(p) for p in plots.write_all(results, a.out)]
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
