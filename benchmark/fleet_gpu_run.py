"""A real-shaped fleet served over several GPUs from a plan, in each pool mode (issue 11's GPU
check, and the fleet of the 2-GPU headline).

In: the fleet (`--fleet`, NAME=CONFIG pairs: config.json folders under tests/data/model-configs;
each name gets its own random weights, `--load-format dummy`), the GPUs of this machine, the
plan's memory fraction, the pool modes to run, the burst's size and, optionally, traces to
replay against each mode. Out (`--out` folder): plan.json and plan.txt (the planner's report),
and per mode `<mode>/server.log` and `<mode>/result.json`: start-up seconds, the burst's
results (every model's requests, TTFT and time between tokens), `GET /plan` (per GPU the
planned weight bytes and KV pages beside what the workers and FFN servers report), the
device's used bytes from nvidia-smi before and after start-up, `/metrics` per-GPU gauges,
and each trace replay's summary (the prefix cache is flushed before each replay, so that
every load computes its prompts afresh); `summary.json` gathers the per-GPU comparisons.

    python benchmark/fleet_gpu_run.py --out /tmp/fleet --modes monolithic,crosspool

Each mode runs in a fresh server, one after the other, on the same GPUs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark import runner, server_proc  # noqa: E402
from benchmark.trace import clamp  # noqa: E402
from sglang_crosspool.testing.checkpoints import make_config_only  # noqa: E402

CONFIGS = REPO / "tests" / "data" / "model-configs"  # a fleet's CONFIG may also be a path
FLEET = ("qwen3-30b=Qwen3-30B-A3B,qwen15-a=Qwen1.5-MoE-A2.7B,qwen15-b=Qwen1.5-MoE-A2.7B,"
         "olmoe-a=OLMoE-1B-7B-0924,olmoe-b=OLMoE-1B-7B-0924")


CPU_DEVICES: list[int] = []  # --cpu N: N stand-in devices of --cpu-memory bytes, no nvidia-smi


def gpu_memory() -> tuple[list[int], list[int]]:
    """Per GPU: (bytes used, bytes in all), as nvidia-smi reports them (MiB)."""
    if CPU_DEVICES:
        return [0] * len(CPU_DEVICES), list(CPU_DEVICES)
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True).stdout
    rows = [[int(x) << 20 for x in line.split(",")] for line in out.strip().splitlines()]
    return [used for used, _ in rows], [total for _, total in rows]


def get_json(url: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def get_text(url: str, timeout: float = 60) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def flush_cache(url: str, timeout: float = 120.0) -> bool:
    """Empties the server's prefix cache before a replay, so that a replay of the same trace
    at another load computes its prompts again (the server refuses while requests run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(url + "/flush_cache", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                if r.status == 200:
                    return True
        except OSError:  # 400 while requests run: wait for them
            pass
        time.sleep(0.5)
    return False


def make_fleet(root: Path, fleet: str) -> dict[str, Path]:
    paths = {}
    for item in fleet.split(","):
        name, _, config = item.partition("=")
        paths[name] = make_config_only(root / name, CONFIGS / config)
    return paths


def make_plan(out: Path, paths: dict[str, Path], devices: int, memory: int,
              fraction: float, traffic: Path | None, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "sglang_crosspool.plan", "--devices", str(devices),
           "--device-memory", str(memory), "--mem-fraction-static", str(fraction),
           "--out", str(out / "plan.json"), *extra]
    for name, path in paths.items():
        cmd += ["--model-path", str(path), "--served-model-name", name]
    if traffic is not None:
        cmd += ["--traffic", str(traffic)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    (out / "plan.txt").write_text(" ".join(cmd) + "\n\n" + text)
    return out / "plan.json"


def burst_trace(path: Path, names: list[str], per_model: int, prompt: int, output: int) -> Path:
    """Every model's requests at once (t = 0), so that all of them run concurrently."""
    with path.open("w") as f:
        i = 0
        for name in names:
            for _ in range(per_model):
                f.write(json.dumps({"id": i, "t": 0.0, "model": name, "prompt_len": prompt,
                                    "output_len": output, "long": False,
                                    "prompt_seed": 1000 + i}) + "\n")
                i += 1
    return path


def mapped_trace(src: Path, dst: Path, paths: dict[str, Path]) -> Path:
    """A trace's models mapped onto the fleet by popularity (the trace's most requested model
    becomes the fleet's first name, and so on, round robin past the fleet's size; a trace
    that names only fleet models keeps them), each request's lengths clamped to its model's
    context (`trace.clamp`)."""
    recs = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = {}
    for rec in recs:
        counts[rec["model"]] = counts.get(rec["model"], 0) + 1
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    names = list(paths)
    target = {m: names[i % len(names)] for i, m in enumerate(ranked)}
    if all(m in paths for m in counts):  # a trace written for this fleet keeps its names
        target = {m: m for m in counts}
    limit = {name: int(json.loads((path / "config.json").read_text())
                       ["max_position_embeddings"]) for name, path in paths.items()}
    lines = []
    for rec in recs:
        rec["model"] = target[rec["model"]]
        rec["prompt_len"], rec["output_len"] = clamp(rec["prompt_len"], rec["output_len"],
                                                     limit[rec["model"]] - 1, None)
        lines.append(json.dumps(rec))
    dst.write_text("\n".join(lines) + "\n")
    return dst


def compare(report: dict, used: list[int], idle: list[int]) -> list[dict]:
    """Per GPU: planned weights, reported weights (tensors), and what nvidia-smi saw the
    server add to the device (used after start-up - used before), less its KV pages mapped."""
    rows = []
    for d in report["devices"]:
        got = d["reported"] or {}
        memory = got.get("device_memory") or {}
        kv = memory.get("kv_mapped_bytes") or 0
        added = used[d["index"]] - idle[d["index"]]
        planned = d["planned"]["weights_bytes"]
        rows.append({
            "gpu": d["index"], "role": d["planned"]["role"], "models": d["planned"]["models"],
            "planned_weights_bytes": planned, "reported_weights_bytes": got.get("weights_bytes"),
            "weights_ratio": d["weights_ratio"], "planned_kv_pages": d["planned"]["kv_pages"],
            "reported_kv_pages": got.get("kv_pages"), "kv_mapped_bytes": kv,
            "device_added_bytes": added,
            "device_added_less_kv_ratio": (added - kv) / planned if planned else None,
            "allocator": memory})
    return rows


def run_mode(mode: str, args, plan: Path, out: Path, paths: dict[str, Path],
             traces: list[str]) -> dict:
    names = list(paths)
    folder = out / mode
    folder.mkdir(parents=True, exist_ok=True)
    idle = gpu_memory()[0]
    device = ["--device", "cuda"] if not CPU_DEVICES else [
        "--devices", ",".join(["cpu"] * len(CPU_DEVICES)), "--dtype", "bfloat16"]
    extra = ["--plan", str(plan), *device, "--load-format", "dummy", *args.server_args.split()]
    t0 = time.monotonic()
    result: dict = {"mode": mode, "gpu_used_before": idle}
    try:
        server = server_proc.start({}, mode, extra, folder / "server.log",
                                   timeout=args.start_timeout)
    except RuntimeError as e:
        result["error"] = str(e)[-4000:]
        return result
    result["start_s"] = round(time.monotonic() - t0, 1)
    try:
        if args.per_model > 0:
            burst = burst_trace(folder / "burst.jsonl", names, args.per_model, args.prompt,
                                args.output)
            summary = runner.run(server.url, burst, timeout=args.request_timeout)
            result["burst"] = {"summary": summary["overall"], "by_model": summary["per_model"],
                               "server_counters": summary["server_counters"],
                               "errors": [r["error"] for r in summary.get("records", [])
                                          if r.get("error")][:20]}
        used = gpu_memory()[0]
        report = get_json(server.url + "/plan")
        result["plan_report"] = report
        result["gpus"] = compare(report, used, idle)
        result["gpu_used_after_burst"] = used
        result["metrics_per_gpu"] = [line for line in get_text(server.url + "/metrics")
                                     .splitlines() if line.startswith("sglang_crosspool:gpu_")]
        info = get_json(server.url + "/server_info")
        result["workers"] = info["internal_states"][0].get("workers")
        for spec in traces:
            trace, _, loads = str(spec).partition(":")
            trace = Path(trace)
            mapped = mapped_trace(trace, folder / trace.name, paths)
            for load in (float(x) for x in (loads or args.loads).split(",")):
                if not flush_cache(server.url):
                    raise RuntimeError("the prefix cache could not be flushed before a replay")
                replay = runner.run(server.url, mapped, time_scale=1.0 / load,
                                    slo_ttft=args.slo_ttft, slo_tbt=args.slo_tbt,
                                    timeout=args.request_timeout)
                replay["load"] = load
                (folder / f"{trace.stem}-load{load:g}.results.json").write_text(
                    json.dumps(replay))
                result.setdefault("traces", {})[f"{trace.stem}@{load:g}"] = {
                    "summary": replay["overall"], "server_counters": replay["server_counters"],
                    "duration_s": replay["duration"]}
                print(f"  {mode} {trace.stem} load {load:g}: " + json.dumps(
                    {k: replay["overall"].get(k) for k in (
                        "completed", "errors", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99",
                        "preempted", "kv_pages_used_max", "longest_context")}), flush=True)
    except Exception as e:  # noqa: BLE001 - record it; the next mode still runs
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["exit_code"] = server.stop()
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fleet", default=FLEET, help="NAME=CONFIG,... (tests/data/model-configs)")
    p.add_argument("--modes", default="monolithic,crosspool")
    p.add_argument("--mem-fraction", type=float, default=0.93,
                   help="the plan's mem_fraction_static (0.93 lets the weights pool hold the "
                   "default fleet's experts)")
    p.add_argument("--traffic", type=Path, help="the planner's traffic file")
    p.add_argument("--plan-args", default="", help="more flags for the planner")
    p.add_argument("--server-args", default="--cuda-graph-max-bs-decode 16 "
                   "--max-running-requests 32 --chunked-prefill-size 2048")
    p.add_argument("--per-model", type=int, default=4,
                   help="burst: requests per model (0: no burst)")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--trace", action="append", default=[], metavar="PATH[:LOADS]",
                   help="replay this trace against each mode after the burst (repeat); at "
                   "--loads, or at its own LOADS (e.g. capacity.jsonl:1)")
    p.add_argument("--loads", default="1",
                   help="trace loads: each replay runs the trace at LOAD x its rate")
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tbt", type=float, default=0.1)
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--cpu", type=int, default=0, metavar="N",
                   help="a dry run on CPU: N stand-in devices of --cpu-memory bytes (use a "
                   "fleet of small configs)")
    p.add_argument("--cpu-memory", type=int, default=64 << 20)
    p.add_argument("--request-timeout", type=float, default=300)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    CPU_DEVICES[:] = [args.cpu_memory] * args.cpu
    paths = make_fleet(Path("/tmp/fleet-configs"), args.fleet)
    totals = gpu_memory()[1]
    plan = make_plan(args.out, paths, len(totals), min(totals), args.mem_fraction, args.traffic,
                     args.plan_args.split())
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(mode, args, plan, args.out, paths, args.trace)
        (args.out / mode / "result.json").write_text(json.dumps(results[mode], indent=1))
        brief = {k: results[mode].get(k) for k in ("start_s", "error", "exit_code")}
        print(mode, json.dumps(brief), flush=True)
        for row in results[mode].get("gpus", []):
            print("  gpu", row["gpu"], row["role"], "planned", row["planned_weights_bytes"],
                  "reported", row["reported_weights_bytes"], "ratio",
                  round(row["weights_ratio"] or 0, 4), "added-less-kv ratio",
                  round(row["device_added_less_kv_ratio"] or 0, 4), flush=True)
        burst = (results[mode].get("burst") or {}).get("summary")
        if burst:
            print("  burst", json.dumps(burst)[:600], flush=True)
    summary = {mode: {"start_s": r.get("start_s"), "error": r.get("error"),
                      "gpus": r.get("gpus"), "burst": (r.get("burst") or {}).get("summary"),
                      "traces": r.get("traces")} for mode, r in results.items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
