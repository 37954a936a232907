"""Prometheus text parsing and the /metrics poller of a replay.

In: the text of a server's `/metrics`. Out: `parse()` gives {(name, labels-tuple): value};
`MetricsPoller` samples KV pages over time (pool-wide used/free/total per pool, pages per
model, retractions so far) into a list of JSON-ready dicts.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

POOL_USED = "sglang_crosspool:kv_pool_pages_used"
POOL_FREE = "sglang_crosspool:kv_pool_pages_free"
POOL_TOTAL = "sglang_crosspool:kv_pool_pages_total"
MODEL_PAGES = "sglang_crosspool:kv_pages_used"
GPU_USED = "sglang_crosspool:gpu_kv_pages_used"
RETRACTIONS = "sglang:num_retractions"
GEN_TOKENS = "sglang:generation_tokens_total"
PROMPT_TOKENS = "sglang:prompt_tokens_total"


def parse(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    """{label value: sample} of metric `name`."""
    return {dict(lb).get(label, ""): v for (n, lb), v in samples.items() if n == name}


def kv_sample(samples: dict, t: float) -> dict:
    return {
        "t": round(t, 4),
        "pool_used": by_label(samples, POOL_USED, "pool"),
        "pool_free": by_label(samples, POOL_FREE, "pool"),
        "pool_total": by_label(samples, POOL_TOTAL, "pool"),
        "model_pages": by_label(samples, MODEL_PAGES, "model_name"),
        "gpu_used": by_label(samples, GPU_USED, "gpu"),  # per attention worker's device
        "retractions": sum(by_label(samples, RETRACTIONS, "").values()),
    }


async def fetch(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
        r.raise_for_status()
        return parse(await r.text())


class MetricsPoller:
    """Samples /metrics every `interval` s from `t0` (time.monotonic) until stopped."""

    def __init__(self, session: aiohttp.ClientSession, url: str, interval: float, t0: float):
        self.session, self.url, self.interval, self.t0 = session, url, interval, t0
        self.samples: list[dict] = []
        self.failures = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                s = await fetch(self.session, self.url)
                self.samples.append(kv_sample(s, time.monotonic() - self.t0))
            except (TimeoutError, aiohttp.ClientError):
                self.failures += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()
