"""Seeded trace generator: many models with long-tail popularity, bursty arrivals, real lengths.

In: the Azure LLM inference trace 2023 CSVs (TIMESTAMP, ContextTokens, GeneratedTokens), a seed
and the shape flags below. Out: JSONL, one request per line, sorted by time:
`{"id", "t", "model", "prompt_len", "output_len", "long", "prompt_seed"}`. The prompt is
deterministic: `prompt_ids(rec, vocab)` (numpy PCG64 seeded with `prompt_seed`, ids drawn from
[FIRST_ID, vocab)), so any client can rebuild the same token ids from the JSONL alone.

Variants: `bursty` (Zipf popularity, exponent 1.5: about 85% of 32 models get less than a
uniform share, gamma inter-arrivals with CV > 1 or Azure code-trace gaps,
a long-context class of 16k-128k tokens) and `balanced` (every model equally warm, Poisson
arrivals, no long-context class). Each default can be overridden by its flag.

    python -m benchmark.trace --variant bursty --models 32 --requests 1000 --rate 4 \
        --seed 0 --out trace.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_AZURE = REPO / "benchmark" / "data" / "azure2023"  # CC BY 4.0: see its README
AZURE_FILES = {"code": "AzureLLMInferenceTrace_code.csv", "conv": "AzureLLMInferenceTrace_conv.csv"}
FIRST_ID = 10  # prompt ids start here, past the usual special tokens

VARIANTS = {
    "bursty": {"zipf": 1.5, "arrivals": "gamma", "cv": 4.0, "long_frac": 0.05},
    "balanced": {"zipf": 0.0, "arrivals": "gamma", "cv": 1.0, "long_frac": 0.0},
}


def load_azure(folder: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [n, 2] of (prompt, output), inter-arrival gaps in seconds) of one or both CSVs."""
    names = list(AZURE_FILES) if which == "both" else [which]
    lengths, gaps = [], []
    for name in names:
        with open(folder / AZURE_FILES[name], newline="") as f:
            rows = list(csv.DictReader(f))
        lengths += [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in rows]
        ts = np.array([np.datetime64(r["TIMESTAMP"].strip()[:26]) for r in rows])
        d = np.diff(ts).astype("timedelta64[us]").astype(np.float64) / 1e6
        gaps += list(d)
    return np.array(lengths, dtype=np.int64), np.array(gaps, dtype=np.float64)


def popularity(n_models: int, zipf: float) -> np.ndarray:
    """Share of requests per model rank: rank^-zipf, normalised (zipf 0 = uniform)."""
    w = np.arange(1, n_models + 1, dtype=np.float64) ** -zipf
    return w / w.sum()


def arrivals(rng: np.random.Generator, n: int, rate: float, kind: str, cv: float,
             azure_gaps: np.ndarray) -> np.ndarray:
    """n arrival times (s) starting at 0 with mean rate `rate` req/s."""
    mean = 1.0 / rate
    if kind == "gamma":
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, mean / shape, size=n)
    elif kind == "azure":  # bootstrap runs of the real gaps, rescaled to the target mean
        start = rng.integers(0, max(1, len(azure_gaps) - n))
        gaps = azure_gaps[start:start + n]
        gaps = np.resize(gaps, n) * (mean / max(gaps.mean(), 1e-12))
    else:
        raise ValueError(f"unknown arrival kind {kind!r}")
    t = np.cumsum(gaps)
    return t - t[0]


def clamp(prompt: int, output: int, max_context: int | None, max_output: int | None):
    if max_output is not None:
        output = min(output, max_output)
    if max_context is not None:
        output = min(output, max(1, max_context // 4))
        prompt = min(prompt, max_context - output)
    return max(1, prompt), max(1, output)


def generate(args: argparse.Namespace, lengths: np.ndarray, azure_gaps: np.ndarray) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    names = [f"{args.prefix}{i:02d}" for i in range(args.models)]
    order = rng.permutation(args.models)  # which model gets which popularity rank
    share = popularity(args.models, args.zipf)
    model_idx = order[rng.choice(args.models, size=args.requests, p=share)]
    times = arrivals(rng, args.requests, args.rate, args.arrivals, args.cv, azure_gaps)
    rows = lengths[rng.integers(0, len(lengths), size=args.requests)]
    is_long = rng.random(args.requests) < args.long_frac
    lo, hi = np.log(args.long_min), np.log(args.long_max)
    long_len = np.exp(rng.uniform(lo, hi, size=args.requests)).astype(np.int64)
    seeds = rng.integers(0, 2**31 - 1, size=args.requests)
    out = []
    for i in range(args.requests):
        prompt = int(long_len[i]) if is_long[i] else int(rows[i, 0])
        prompt, output = clamp(prompt, int(rows[i, 1]), args.max_context, args.max_output)
        out.append({"id": i, "t": round(float(times[i]), 6), "model": names[model_idx[i]],
                    "prompt_len": prompt, "output_len": output, "long": bool(is_long[i]),
                    "prompt_seed": int(seeds[i])})
    return out


def prompt_ids(rec: dict, vocab: int) -> list[int]:
    """The request's deterministic prompt token ids."""
    rng = np.random.default_rng(rec["prompt_seed"])
    return rng.integers(FIRST_ID, vocab, size=rec["prompt_len"]).tolist()


def read_trace(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_trace(recs: list[dict], path: str | Path) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in recs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="bursty")
    p.add_argument("--models", type=int, default=32)
    p.add_argument("--prefix", default="m", help="model names are PREFIX00, PREFIX01, ...")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, req/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--azure", type=Path, default=DEFAULT_AZURE, help="folder of the CSVs")
    p.add_argument("--azure-file", choices=["code", "conv", "both"], default="conv")
    p.add_argument("--zipf", type=float, help="popularity exponent (0: uniform)")
    p.add_argument("--arrivals", choices=["gamma", "azure"], help="azure: code-trace gaps")
    p.add_argument("--cv", type=float, help="gamma inter-arrival coefficient of variation")
    p.add_argument("--long-frac", type=float, help="share of long-context requests")
    p.add_argument("--long-min", type=int, default=16384)
    p.add_argument("--long-max", type=int, default=131072)
    p.add_argument("--max-context", type=int, help="clamp prompt+output to this (tiny models)")
    p.add_argument("--max-output", type=int, help="clamp output tokens to this")
    p.add_argument("--out", type=Path, required=True)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    for k, v in VARIANTS[args.variant].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.arrivals == "azure" and args.azure_file == "conv":
        args.azure_file = "code"  # the bursty one (inter-arrival CV 13)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = resolve(parser().parse_args(argv))
    lengths, gaps = load_azure(args.azure, args.azure_file)
    recs = generate(args, lengths, gaps)
    write_trace(recs, args.out)
    top = max(1, args.models // 10)
    counts = sorted(np.bincount([int(r["model"][len(args.prefix):]) for r in recs],
                                minlength=args.models), reverse=True)
    print(f"{len(recs)} requests over {recs[-1]['t']:.1f} s to {args.models} models; "
          f"top {top} models get {sum(counts[:top]) / len(recs):.0%}; "
          f"{sum(c < len(recs) / args.models for c in counts) / args.models:.0%} of models cold "
          f"(below a uniform share); "
          f"{sum(r['long'] for r in recs)} long-context -> {args.out}", file=sys.stderr)
    return recs


if __name__ == "__main__":
    main()
