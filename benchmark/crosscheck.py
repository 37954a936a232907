"""Cross-check of our benchmark runner against the ecosystem's tool, `sglang.bench_serving`.

Both clients send the same load to one model of the same server, one after the other: N
requests at once (bench_serving: `--request-rate inf --max-concurrency N`, `random-ids`
prompts; ours: a trace of N requests at t = 0), each of `--input-len` prompt tokens and
`--output-len` output tokens (ignore_eos, greedy), streamed, for `--rounds` rounds that
alternate which client goes first. Each reports TTFT and the time between tokens; the ratios
(ours / bench_serving) of the medians and means, per round and their median over rounds, say
whether our figures can be read beside the ecosystem's. The server is given (`--url`), or launched here
on the model of `--model-path` (`--launch`, with `--server-args`).

    python benchmark/crosscheck.py --launch --model-path /ckpt/qwen --out crosscheck.json

Out: JSON with both sides' summaries, the ratios and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark import runner, server_proc  # noqa: E402


def bench_serving(url: str, model: str, model_path: str, n: int, input_len: int,
                  output_len: int, seed: int, workdir: Path) -> tuple[dict, list[str]]:
    out = workdir / "bench_serving.jsonl"
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
           "--base-url", f"{url}/models/{model}", "--model", model_path,
           "--dataset-name", "random-ids", "--num-prompts", str(n),
           "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-range-ratio", "1", "--request-rate", "inf", "--max-concurrency", str(n),
           "--warmup-requests", "1", "--seed", str(seed), "--output-file", str(out),
           "--disable-tqdm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir,
                          check=False, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_serving failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(out.read_text().splitlines()[-1])
    return result, cmd


def ours(url: str, model: str, n: int, input_len: int, output_len: int, seed: int,
         workdir: Path) -> dict:
    trace = workdir / "trace.jsonl"
    with trace.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "t": 0.0, "model": model, "prompt_len": input_len,
                                "output_len": output_len, "long": False,
                                "prompt_seed": seed * 100_000 + i}) + "\n")
    return runner.run(url, trace, timeout=1800)


def compare(bs: dict, mine: dict) -> dict:
    records = [r for r in mine["records"] if r["ok"]]
    gaps = [g for r in records for g in r["gaps"]]
    ttfts = [r["ttft"] for r in records if r["ttft"] is not None]
    ours_ms = {"median_ttft_ms": 1000 * statistics.median(ttfts),
               "mean_ttft_ms": 1000 * statistics.fmean(ttfts),
               "median_tbt_ms": 1000 * statistics.median(gaps),
               "mean_tbt_ms": 1000 * statistics.fmean(gaps)}
    theirs = {"median_ttft_ms": bs["median_ttft_ms"], "mean_ttft_ms": bs["mean_ttft_ms"],
              "median_tbt_ms": bs["median_itl_ms"], "mean_tbt_ms": bs["mean_itl_ms"]}
    ratios = {k: ours_ms[k] / theirs[k] if theirs[k] else None for k in ours_ms}
    return {"ours": ours_ms, "bench_serving": theirs, "ratio_ours_over_bench_serving": ratios,
            "within_10_percent": {k: v is not None and abs(v - 1) <= 0.10
                                  for k, v in ratios.items()},
            "completed": {"ours": len(records), "bench_serving": bs["completed"]}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (else --launch)")
    p.add_argument("--launch", action="store_true", help="launch a server on --model-path")
    p.add_argument("--model", default="m", help="served model name")
    p.add_argument("--model-path", required=True, help="checkpoint folder (its tokenizer too)")
    p.add_argument("--server-args", default="", help="more launch flags with --launch")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of both clients, alternating which goes first")
    p.add_argument("--out", type=Path)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if not args.url and not args.launch:
        raise SystemExit("give --url of a running server, or --launch")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = None
        url = args.url
        rounds: list[dict] = []
        if args.launch:
            server = server_proc.start({args.model: args.model_path}, "monolithic",
                                       args.server_args.split(), work / "server.log",
                                       timeout=600)
            url = server.url
        try:
            for first in range(args.rounds):  # alternate who goes first: a busy machine
                seed = args.seed + first       # slows them alike; new prompts each round,
                if first % 2:                  # so that no prefix is cached from the last
                    mine = ours(url, args.model, args.num_prompts, args.input_len,
                                args.output_len, seed, work)
                bs, cmd = bench_serving(url, args.model, args.model_path, args.num_prompts,
                                        args.input_len, args.output_len, seed, work)
                if not first % 2:
                    mine = ours(url, args.model, args.num_prompts, args.input_len,
                                args.output_len, seed, work)
                rounds.append(compare(bs, mine))
        finally:
            if server is not None:
                server.stop()
    result = {"rounds": rounds, "median_ratios": {
        k: statistics.median(r["ratio_ours_over_bench_serving"][k] for r in rounds)
        for k in rounds[0]["ratio_ours_over_bench_serving"]}}
    result["load"] = {"num_prompts": args.num_prompts, "input_len": args.input_len,
                      "output_len": args.output_len, "all_at_once": True}
    result["bench_serving_command"] = " ".join(cmd[1:])
    result["server_args"] = args.server_args
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
