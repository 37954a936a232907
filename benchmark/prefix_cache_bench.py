"""Prefix caching on multi-turn chat: TTFT and prefill tokens with and without the cache.

    .venv/bin/python benchmark/prefix_cache_bench.py --out benchmark/results/prefix-cache-cpu.json
    python benchmark/prefix_cache_bench.py --device cuda --shapes OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B

Several models, each with its own long system prompt shared by all its conversations; every
conversation runs `--turns` turns (history + a new user message, OpenAI chat API, streamed),
conversations of all models at once. The same workload runs against two real servers, one
launched as is and one with `--disable-radix-cache`. Per server: TTFT seen by the client
(first content chunk) and the prompt tokens prefilled, which is prompt tokens minus the
`usage.prompt_tokens_details.cached_tokens` the server reports, per turn and in all.

On CPU the models are random checkpoints of `--size` (testing/checkpoints); with `--shapes`
(on a GPU) they are real configs from tests/data/model-configs served with random weights
(`--load-format dummy`), so the prompts and answers are random tokens either way: only the
sharing pattern matters here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmark.server_proc import start  # noqa: E402
from sglang_crosspool.testing.checkpoints import make_config_only, make_model  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "model-configs"
WORDS = ("system policy assistant answer question careful helpful brief detail context user "
         "data model token cache prefix shared memory page block expert layer route score "
         "value result reason format example").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversation(client: httpx.Client, url: str, model: str, system: str, users: list[str],
                 max_tokens: int, out: list) -> None:
    """Runs the turns one after another; appends one record per turn to `out`."""
    messages = [{"role": "system", "content": system}]
    for turn, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        ttft, answer, usage = None, [], None
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        ttft = ttft or time.perf_counter() - start
                        answer.append(piece)
        end = time.perf_counter() - start
        messages.append({"role": "assistant", "content": "".join(answer)})
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        out.append({"model": model, "turn": turn, "ttft_s": ttft if ttft is not None else end,
                    "latency_s": end, "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": cached, "prefill_tokens": usage["prompt_tokens"] - cached})


def workload(models: list[str], a) -> list[tuple[str, str, list[str]]]:
    """(model, system prompt, user turns) per conversation: the same for both servers."""
    rng = random.Random(a.seed)
    convs = []
    for model in models:
        system = text(rng, a.system_words)
        for _ in range(a.conversations):
            convs.append((model, system, [text(rng, a.user_words) for _ in range(a.turns)]))
    return convs


def run_server(models: dict[str, str], extra: list[str], convs, a, log: Path) -> dict:
    server = start(models, a.pool_mode, extra, log, timeout=a.start_timeout)
    try:
        records: list = []
        with httpx.Client(timeout=600) as client:
            start_t = time.perf_counter()
            threads = [threading.Thread(target=conversation, args=(
                client, server.url, m, system, users, a.max_tokens, records))
                for m, system, users in convs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start_t
            stats = client.get(server.url + "/server_info").json()["internal_states"][0]
    finally:
        server.stop()
    if len(records) != len(convs) * a.turns:
        raise RuntimeError(f"{len(records)} of {len(convs) * a.turns} turns finished; see {log}")
    return summarize(records, wall, stats)


def summarize(records: list[dict], wall: float, stats: dict) -> dict:
    def ms(values):
        values = sorted(values)
        return {"mean": round(1e3 * statistics.mean(values), 1),
                "p50": round(1e3 * values[len(values) // 2], 1),
                "p90": round(1e3 * values[min(len(values) - 1, int(0.9 * len(values)))], 1)}

    turns = sorted({r["turn"] for r in records})
    prompt = sum(r["prompt_tokens"] for r in records)
    prefill = sum(r["prefill_tokens"] for r in records)
    return {
        "requests": len(records), "wall_s": round(wall, 2),
        "prompt_tokens": prompt, "prefill_tokens": prefill,
        "cached_tokens": prompt - prefill, "cache_hit": round(1 - prefill / prompt, 3),
        "ttft_ms": ms([r["ttft_s"] for r in records]),
        "ttft_ms_after_turn_0": ms([r["ttft_s"] for r in records if r["turn"] > 0]),
        "per_turn": [{"turn": t,
                      "ttft_ms_mean": ms([r["ttft_s"] for r in records if r["turn"] == t])["mean"],
                      "prefill_tokens": sum(r["prefill_tokens"] for r in records
                                            if r["turn"] == t),
                      "prompt_tokens": sum(r["prompt_tokens"] for r in records
                                           if r["turn"] == t)} for t in turns],
        "retractions": stats["scheduler"].get("retractions", 0),
        "cached_pages_at_end": stats["kv"].get("cached_pages", 0),
    }


def make_models(root: Path, a) -> dict[str, str]:
    if a.shapes:
        return {name.lower(): str(make_config_only(root / name, CONFIGS / name,
                                                   num_hidden_layers=a.layers))
                for name in a.shapes.split(",")}
    return {arch: str(make_model(root / arch, arch, size=a.size, seed=i))
            for i, arch in enumerate(a.archs.split(","))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="the servers' --device (cpu, cuda)")
    p.add_argument("--archs", default="qwen3_moe,mixtral,olmoe",
                   help="CPU: random checkpoints of these architectures")
    p.add_argument("--size", default="small", help="CPU: tiny or small (testing/checkpoints)")
    p.add_argument("--shapes", help="GPU: real configs from tests/data/model-configs, "
                                    "comma-separated (served with --load-format dummy)")
    p.add_argument("--layers", type=int, help="with --shapes: keep only this many layers")
    p.add_argument("--conversations", type=int, default=3, help="per model")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-words", type=int, default=300)
    p.add_argument("--user-words", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16, help="answer tokens per turn")
    p.add_argument("--pool-mode", default="monolithic")
    p.add_argument("--server-args", default="", help="more launch flags for both servers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = make_models(root, a)
        convs = workload(list(models), a)
        flags = ["--device", a.device, *a.server_args.split()]
        if a.shapes:
            flags += ["--load-format", "dummy"]
        results = {}
        for name, extra in (("radix_cache", flags), ("no_cache", flags +
                                                     ["--disable-radix-cache"])):
            results[name] = run_server(models, extra, convs, a, root / f"{name}.log")
            r = results[name]
            print(f"{name:12s} TTFT mean {r['ttft_ms']['mean']:8.1f} ms  p50 "
                  f"{r['ttft_ms']['p50']:8.1f}  p90 {r['ttft_ms']['p90']:8.1f}  (turns 1+: mean "
                  f"{r['ttft_ms_after_turn_0']['mean']:8.1f})  prefill {r['prefill_tokens']:6d} "
                  f"of {r['prompt_tokens']:6d} prompt tokens  wall {r['wall_s']:.1f} s",
                  flush=True)
    cache, cold = results["radix_cache"], results["no_cache"]
    print(f"prefill tokens x{cold['prefill_tokens'] / cache['prefill_tokens']:.2f} fewer, "
          f"TTFT mean x{cold['ttft_ms']['mean'] / cache['ttft_ms']['mean']:.2f} lower with "
          f"the cache")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "command": "benchmark/prefix_cache_bench.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "models": list(models), "results": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
