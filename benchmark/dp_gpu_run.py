"""Layouts of one server over two GPUs (or CPU stand-ins), same models, same burst: data-
parallel attention sharing one weights pool (issue 11), tensor / expert parallelism (issue 21).

    python benchmark/dp_gpu_run.py --out dp.json                       # 2 GPUs
    python benchmark/dp_gpu_run.py --device cpu --out /tmp/dp.json     # CPU: tiny models

Per layout, a server is started on the same models and answers one burst of concurrent
greedy streams spread over them:
- `crosspool-dp1`: one attention worker (device 0) and its FFN server (device 1);
- `crosspool-dp2`: attention workers on devices 0 and 1 (`--dp-size 2`), both linked to one FFN
  server on device 1 (shm): the experts are held once;
- `monolithic-dp2`: each device holds every model whole (`--dp-size 2`), for comparison;
- `crosspool-ipc-dp1` / `-dp2`: one GPU, one or two attention workers on device 0 and one FFN
  server there, over cuda-ipc;
- `monolithic-tp1` / `-tp2` / `-ep2`: one worker, every model on device 0, or over both devices
  at `--tp-size 2` (`--ep-size 2`: experts divided instead of split; `-tp2-symm`: the
  all-reduces through symmetric memory, `--tp-all-reduce symm-mem`).
Each layout also answers 4 greedy prompts of 32 tokens; the report gives, per layout, how many
leading tokens match the first layout's (bf16 sums in another order may flip a near tie).
Recorded: statuses, tokens per second over the burst, time between stream chunks (p50/p99;
a chunk carries one token or, when the client lags, more), per
worker its models, KV pages, attention bytes, the FFN bytes it sees per server and the device
memory it measures, the FFN server processes' count, and (GPUs) nvidia-smi's used bytes per
GPU before the server stops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmark.server_proc import start  # noqa: E402
from sglang_crosspool.testing.checkpoints import make_config_only, make_model  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "model-configs"


def layouts(devices: list[str]) -> dict[str, tuple[str, list[str]]]:
    d0, d1 = devices
    shm = ["--ffn-transport", "shm", "--ffn-device", d1]
    return {
        "crosspool-dp1": ("crosspool", ["--device", d0, *shm]),
        "crosspool-dp2": ("crosspool", ["--devices", f"{d0},{d1}", "--dp-size", "2", *shm]),
        "monolithic-dp2": ("monolithic", ["--devices", f"{d0},{d1}", "--dp-size", "2"]),
        # one GPU: both replicas and the FFN server on device 0, linked by cuda-ipc
        "crosspool-ipc-dp1": ("crosspool", ["--device", d0, "--ffn-transport", "cuda-ipc",
                                            "--ffn-device", d0]),
        "crosspool-ipc-dp2": ("crosspool", ["--devices", f"{d0},{d0}", "--dp-size", "2",
                                            "--ffn-transport", "cuda-ipc", "--ffn-device", d0]),
        "monolithic-tp1": ("monolithic", ["--device", d0]),
        "monolithic-tp2": ("monolithic", ["--device", d0, "--tp-size", "2"]),
        "monolithic-ep2": ("monolithic", ["--device", d0, "--tp-size", "2", "--ep-size", "2"]),
        "monolithic-tp2-symm": ("monolithic", ["--device", d0, "--tp-size", "2",
                                               "--tp-all-reduce", "symm-mem"]),
    }


def greedy(url: str, models: list[str]) -> dict:
    out = {}
    for m in models:
        r = httpx.post(url + "/generate", timeout=600, json={
            "model": m, "input_ids": [[5, 6, 7, 8], list(range(40, 90)), [3] * 20, [9, 1000]],
            "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}})
        out[m] = [o["output_ids"] for o in r.json()] if r.status_code == 200 else r.text
    return out


def matching(a: dict, b: dict) -> dict:
    """Per model, the matching leading tokens of each prompt's output."""
    def prefix(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n
    return {m: [prefix(x, y) for x, y in zip(a[m], b.get(m, []))]
            if isinstance(a.get(m), list) and isinstance(b.get(m), list) else None for m in a}


def burst(url: str, models: list[str], requests: int, max_tokens: int) -> dict:
    def one(i: int) -> dict:
        body = {"model": models[i % len(models)], "input_ids": list(range(100, 164)),
                "stream": True, "sampling_params": {"max_new_tokens": max_tokens,
                                                    "temperature": 0, "ignore_eos": True}}
        t0, arrivals, status, n = time.monotonic(), [], None, 0
        with httpx.stream("POST", url + "/generate", json=body, timeout=600) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data:") and "output_ids" in line:
                    arrivals.append(time.monotonic())  # a chunk: one token or more
                    n = len(json.loads(line[5:])["output_ids"])
        return {"status": status, "start": t0, "arrivals": arrivals, "tokens": n}

    t0 = time.monotonic()
    with ThreadPoolExecutor(requests) as pool:
        runs = list(pool.map(one, range(requests)))
    wall = time.monotonic() - t0
    gaps = sorted(b - a for r in runs for a, b in zip(r["arrivals"], r["arrivals"][1:]))
    tokens = sum(r["tokens"] for r in runs)
    pick = lambda q: round(1e3 * gaps[min(len(gaps) - 1, int(q * len(gaps)))], 2)  # noqa: E731
    return {"statuses": sorted({r["status"] for r in runs}), "ok": sum(
        r["status"] == 200 and r["tokens"] == max_tokens for r in runs),
        "requests": requests, "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "tbt_ms": {"p50": pick(0.5), "p99": pick(0.99),
                   "mean": round(1e3 * statistics.mean(gaps), 2)} if gaps else None,
        "ttft_ms_p50": round(1e3 * statistics.median(
            r["arrivals"][0] - r["start"] for r in runs if r["arrivals"]), 1)}


def gpu_used() -> list[int] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, timeout=30).stdout
        return [int(x) << 20 for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def ffn_server_count() -> int:
    """FFN server processes running on this machine (one server runs at a time here)."""
    out = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines()
               if "sglang_crosspool.ffn.server" in line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shapes", default="OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B",
                   help="GPU: real configs from tests/data/model-configs, random weights")
    p.add_argument("--layers", type=int, default=None, help="GPU: keep this many layers")
    p.add_argument("--layouts", default="crosspool-dp1,crosspool-dp2,monolithic-dp2")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--start-timeout", type=float, default=400)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dp-run-"))
    if a.device == "cuda":
        models = {name.lower(): str(make_config_only(root / name, CONFIGS / name,
                                                     num_hidden_layers=a.layers))
                  for name in a.shapes.split(",")}
        # KV budget: 0.8 of a GPU less every model's weights (so the FFN server's experts on
        # device 1 fit beside worker 1's KV there)
        devices = ["cuda:0", "cuda:1"]
        extra = ["--load-format", "dummy", "--mem-fraction-static", "0.8"]
    else:
        models = {arch: str(make_model(root / arch, arch, seed=i))
                  for i, arch in enumerate(("qwen3_moe", "olmoe"))}
        devices, extra = ["cpu", "cpu"], []
    report = {"models": list(models), "device": a.device, "args": vars(a), "layouts": {}}
    for name in a.layouts.split(","):
        mode, flags = layouts(devices)[name]
        print(f"=== {name}", flush=True)
        entry = report["layouts"][name] = {"flags": flags}
        t0 = time.monotonic()
        try:
            server = start(models, mode, flags + extra, root / f"{name}.log",
                           timeout=a.start_timeout)
        except Exception as e:  # keep the other layouts' figures
            entry["error"] = str(e)[-3000:]
            print(entry["error"], flush=True)
            continue
        entry["start_s"] = round(time.monotonic() - t0, 1)
        try:
            for m in models:  # warm: first-use compilation out of the burst
                httpx.post(server.url + "/generate", timeout=600, json={
                    "model": m, "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}})
            entry["greedy"] = greedy(server.url, list(models))
            first = next(iter(report["layouts"].values()))
            if first is not entry and "greedy" in first:
                entry["greedy_matching_prefix_vs_first"] = matching(first["greedy"],
                                                                    entry["greedy"])
            entry["burst"] = burst(server.url, list(models), a.requests, a.max_tokens)
            state = httpx.get(server.url + "/server_info", timeout=60).json()
            state = state["internal_states"][0]
            entry["workers"] = [{k: w.get(k) for k in (
                "index", "device", "models", "kv", "attention_bytes", "ffn_bytes_here",
                "ffn_device", "ffn_bytes_per_server", "device_memory")}
                for w in state.get("workers", [])] or [{
                    k: state.get(k) for k in ("attention_bytes", "ffn_bytes_here",
                                              "ffn_bytes_per_server", "device_memory")}]
            entry["ffn_server_processes"] = ffn_server_count()
            entry["gpu_used_bytes"] = gpu_used()
        except Exception as e:  # noqa: BLE001 - record, stop the server, go on
            entry["error"] = repr(e)
        finally:
            entry["exit_code"] = server.stop()
            entry["log_tail"] = (root / f"{name}.log").read_text()[-2000:]
        print(json.dumps({k: v for k, v in entry.items() if k != "log_tail"})[:1500], flush=True)
        Path(a.out).write_text(json.dumps(report, indent=1))
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
