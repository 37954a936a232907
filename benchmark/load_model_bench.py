"""Loading a model into a running server: how long it takes, and what the other models' streams
feel meanwhile (time between tokens, TBT).

    .venv/bin/python benchmark/load_model_bench.py --out benchmark/results/load-model-cpu.json
    python benchmark/load_model_bench.py --device cuda --shapes OLMoE-1B-7B-0924 \\
        --load-shape Qwen1.5-MoE-A2.7B --modes monolithic --out ...

A server starts with the background models; `--streams` greedy streams per background model run
back to back through the whole run. After a quiet baseline window, the model is loaded
(`POST /load_model`), answers one request, and is unloaded (`POST /unload_model`); this repeats
`--repeats` times. Per pool mode: load and unload times seen by the client (and the scheduler's
own figure), the loaded model's first-request latency, and the background streams' TBT (p50,
p99, max) in the baseline, during loads and during unloads, from the arrival times of their
stream chunks (one per token). The weight bytes and KV pages before the first load and after
the last unload are recorded too: they must be equal.

On CPU the models are random checkpoints of `--size`; with `--shapes` / `--load-shape` (on a
GPU) they are real configs from tests/data/model-configs served with random weights
(`--load-format dummy`), `--layers` of their layers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmark.server_proc import start
from sglang_crosspool.testing.checkpoints import make_config_only, make_model

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "model-configs"
PROMPT = list(range(100, 132))


class Streams:
    """Greedy streams to the background models, back to back, until stopped; every token's
    arrival time per stream."""

    def __init__(self, url: str, models: list[str], per_model: int, max_tokens: int):
        self.url = url
        self.gaps: list[tuple[float, float]] = []  # (arrival time, gap since the previous)
        self.failures: list[str] = []
        self.requests = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(m, max_tokens), daemon=True)
                         for m in models for _ in range(per_model)]
        for t in self._threads:
            t.start()

    def _run(self, model: str, max_tokens: int) -> None:
        body = {"model": model, "input_ids": PROMPT, "stream": True,
                "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0,
                                    "ignore_eos": True}}
        with httpx.Client(timeout=600) as client:
            while not self._stop.is_set():
                last = None
                with client.stream("POST", self.url + "/generate", json=body) as r:
                    if r.status_code != 200:
                        self.failures.append(f"{model}: {r.status_code} {r.read()[:200]!r}")
                        continue
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.monotonic()
                        if '"type": "abort"' in line:
                            self.failures.append(f"{model}: {line[:200]}")
                        if last is not None:
                            with self._lock:
                                self.gaps.append((now, now - last))
                        last = now
                self.requests += 1

    def window(self, start: float, end: float) -> list[float]:
        with self._lock:
            return [g for t, g in self.gaps if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(600)


def tbt(gaps: list[float]) -> dict:
    if not gaps:
        return {"tokens": 0}
    gaps = sorted(gaps)
    return {"tokens": len(gaps), "p50_ms": round(1e3 * gaps[len(gaps) // 2], 2),
            "p99_ms": round(1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 2),
            "max_ms": round(1e3 * gaps[-1], 2), "mean_ms": round(1e3 * statistics.mean(gaps), 2)}


def footprint(client: httpx.Client, url: str) -> dict:
    state = client.get(url + "/server_info").json()["internal_states"][0]
    worker = state["workers"][0]
    return {"attention_bytes": worker["attention_bytes"], "ffn_bytes_here":
            worker["ffn_bytes_here"], "ffn_bytes_per_server": worker["ffn_bytes_per_server"],
            "kv_used_pages": state["kv"]["used_pages"], "kv_models": sorted(state["kv"]["models"])}


def run_mode(mode: str, flags: list[str], background: dict[str, str], load_path: str,
             a, log: Path) -> dict:
    server = start(background, "crosspool" if mode.startswith("crosspool") else mode, flags,
                   log, timeout=a.start_timeout)
    url = server.url
    try:
        with httpx.Client(timeout=1800) as client:
            before = footprint(client, url)
            streams = Streams(url, list(background), a.streams, a.max_tokens)
            time.sleep(a.warmup)
            base_start = time.monotonic()
            time.sleep(a.baseline)
            baseline = streams.window(base_start, time.monotonic())
            loads, unloads, during_load, during_unload = [], [], [], []
            for _ in range(a.repeats):
                t0 = time.monotonic()
                r = client.post(url + "/load_model", json={
                    "model_path": load_path, "served_model_name": "loaded",
                    **({"load_format": "dummy"} if a.load_shape else {})})
                t1 = time.monotonic()
                if r.status_code != 200:
                    raise RuntimeError(f"load_model: {r.status_code} {r.text}")
                during_load += streams.window(t0, t1)
                first = client.post(url + "/generate", json={
                    "model": "loaded", "input_ids": PROMPT,
                    "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
                t2 = time.monotonic()
                time.sleep(a.gap)
                t3 = time.monotonic()
                u = client.post(url + "/unload_model", json={"served_model_name": "loaded"})
                t4 = time.monotonic()
                if u.status_code != 200:
                    raise RuntimeError(f"unload_model: {u.status_code} {u.text}")
                during_unload += streams.window(t3, t4)
                loaded = r.json()
                loads.append({"client_s": round(t1 - t0, 4),
                              "scheduler_s": round(loaded["seconds"], 4),
                              "in_loop_s": round(loaded["attach_seconds"], 5),
                              "first_request_s": round(t2 - t1, 4),
                              "first_request_status": first.status_code,
                              "attention_bytes": loaded["attention_bytes"],
                              "ffn_bytes": loaded["ffn_bytes"]})
                unloads.append({"client_s": round(t4 - t3, 4),
                                "scheduler_s": round(u.json()["seconds"], 4)})
                time.sleep(a.gap)
            streams.stop()
            client.post(url + "/flush_cache")
            after = footprint(client, url)
    finally:
        server.stop()
    return {"loads": loads, "unloads": unloads, "tbt_baseline": tbt(baseline),
            "tbt_during_load": tbt(during_load), "tbt_during_unload": tbt(during_unload),
            "background_requests": streams.requests, "background_failures": streams.failures,
            "footprint_before": before, "footprint_after": after,
            "footprint_restored": before == after}


def make_models(root: Path, a) -> tuple[dict[str, str], str]:
    if a.shapes:
        background = {name.lower(): str(make_config_only(root / name, CONFIGS / name,
                                                         num_hidden_layers=a.layers))
                      for name in a.shapes.split(",")}
        load = make_config_only(root / "load", CONFIGS / a.load_shape,
                                num_hidden_layers=a.layers)
        return background, str(load)
    background = {arch: str(make_model(root / arch, arch, size=a.size, seed=i))
                  for i, arch in enumerate(a.archs.split(","))}
    load = make_model(root / "load", a.load_arch, size=a.load_size or a.size, seed=99)
    return background, str(load)


MODE_FLAGS = {"monolithic": [],
              "crosspool": ["--ffn-servers", "2", "--ffn-transport", "shm"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="the server's --device (cpu, cuda)")
    p.add_argument("--modes", default="monolithic,crosspool",
                   help="pool modes; crosspool runs FFN server processes (shm unless "
                        "--crosspool-args says otherwise)")
    p.add_argument("--crosspool-args", help="launch flags for crosspool instead of "
                                            "'--ffn-servers 2 --ffn-transport shm'")
    p.add_argument("--archs", default="qwen3_moe,olmoe", help="CPU: background models")
    p.add_argument("--load-arch", default="mixtral", help="CPU: the model loaded")
    p.add_argument("--size", default="small", help="CPU: tiny or small (testing/checkpoints)")
    p.add_argument("--load-size", help="CPU: the loaded model's size (default --size)")
    p.add_argument("--shapes", help="GPU: background models, real configs from "
                                    "tests/data/model-configs (served --load-format dummy)")
    p.add_argument("--load-shape", help="GPU: the model loaded (a config name)")
    p.add_argument("--layers", type=int, help="with --shapes: keep only this many layers")
    p.add_argument("--streams", type=int, default=2, help="streams per background model")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per background request")
    p.add_argument("--repeats", type=int, default=3, help="load + unload cycles")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the baseline")
    p.add_argument("--baseline", type=float, default=3.0, help="seconds of baseline TBT")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between operations")
    p.add_argument("--server-args", default="", help="more launch flags")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args(argv)
    if bool(a.shapes) != bool(a.load_shape):
        p.error("--shapes and --load-shape go together")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        background, load_path = make_models(root, a)
        flags = ["--device", a.device, *a.server_args.split()]
        if a.shapes:
            flags += ["--load-format", "dummy"]
        for mode in a.modes.split(","):
            extra = (a.crosspool_args.split() if a.crosspool_args is not None
                     else MODE_FLAGS["crosspool"]) if mode == "crosspool" else []
            r = results[mode] = run_mode(mode, flags + extra, background, load_path, a,
                                         root / f"{mode}.log")
            load_s = [x["client_s"] for x in r["loads"]]
            print(f"{mode:10s} load {statistics.median(load_s) * 1e3:8.1f} ms (median of "
                  f"{len(load_s)}), unload "
                  f"{statistics.median(x['client_s'] for x in r['unloads']) * 1e3:7.1f} ms; "
                  f"background TBT p50/p99/max (ms): baseline "
                  f"{_fmt(r['tbt_baseline'])}, during loads {_fmt(r['tbt_during_load'])}, "
                  f"during unloads {_fmt(r['tbt_during_unload'])}; failures "
                  f"{len(r['background_failures'])}; footprint restored "
                  f"{r['footprint_restored']}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "command": "benchmark/load_model_bench.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "background": list(background), "loaded": a.load_shape or a.load_arch,
            "results": results}, indent=1) + "\n")
    return results


def _fmt(t: dict) -> str:
    if not t.get("tokens"):
        return "-"
    return f"{t['p50_ms']}/{t['p99_ms']}/{t['max_ms']}"


if __name__ == "__main__":
    main()
