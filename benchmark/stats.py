"""Statistics of a replay: percentiles, SLO goodput, per-model and overall summaries.

In: per-request records (dicts as written by `benchmark.runner`: model, ok, ttft, gaps,
prompt_tokens, completion_tokens, status) and the replay's wall duration. Out: plain dicts of
numbers (JSON-ready). Percentiles use linear interpolation between closest ranks (numpy's
default), so they can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

PCTS = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def pct_dict(values: Sequence[float], prefix: str) -> dict:
    out = {f"{prefix}_p{q}": percentile(values, q) for q in PCTS}
    out[f"{prefix}_mean"] = sum(values) / len(values) if values else None
    out[f"{prefix}_count"] = len(values)
    return out


def meets_slo(rec: dict, slo_ttft: float | None, slo_tbt: float | None) -> bool:
    """A completed request meets the SLO when its TTFT and the P99 of its own gaps are within."""
    if not rec["ok"]:
        return False
    if slo_ttft is not None and (rec["ttft"] is None or rec["ttft"] > slo_ttft):
        return False
    return slo_tbt is None or not rec["gaps"] or percentile(rec["gaps"], 99) <= slo_tbt


def is_rejected(rec: dict) -> bool:
    """Refused up front (queue full / too long / overloaded): 4xx or 503 before any token."""
    return not rec["ok"] and rec.get("status") in (400, 413, 429, 503) and not rec["completion_tokens"]


def summarize(records: Iterable[dict], duration: float, slo_ttft: float | None = None,
              slo_tbt: float | None = None) -> dict:
    recs = list(records)
    ok = [r for r in recs if r["ok"]]
    ttfts = [r["ttft"] for r in recs if r["ttft"] is not None]
    gaps = [g for r in recs for g in r["gaps"]]
    good = [r for r in ok if meets_slo(r, slo_ttft, slo_tbt)]
    rejected = [r for r in recs if is_rejected(r)]
    contexts = [r["prompt_tokens"] + r["completion_tokens"] for r in ok]
    out = {
        "sent": len(recs),
        "completed": len(ok),
        "errors": len(recs) - len(ok),
        "rejected": len(rejected),
        "failed": len(recs) - len(ok) - len(rejected),
        "goodput_requests": len(good),
        "goodput_fraction": len(good) / len(recs) if recs else None,
        "goodput_rps": len(good) / duration if duration > 0 else None,
        "output_tokens": sum(r["completion_tokens"] for r in recs),
        "output_tokens_per_s": (sum(r["completion_tokens"] for r in recs) / duration
                                if duration > 0 else None),
        "longest_context": max(contexts) if contexts else 0,
    }
    out.update(pct_dict(ttfts, "ttft"))
    out.update(pct_dict(gaps, "tbt"))
    return out


def summarize_by_model(records: Iterable[dict], duration: float, slo_ttft: float | None = None,
                       slo_tbt: float | None = None) -> dict:
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["model"], []).append(r)
    return {m: summarize(rs, duration, slo_ttft, slo_tbt) for m, rs in sorted(by.items())}


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their empirical CDF heights (i/n), for plotting."""
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]
