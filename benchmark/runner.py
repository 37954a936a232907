"""Replays a JSONL trace against a running server over HTTP and measures it.

In: a trace from `benchmark.trace` (t, model, prompt_len, output_len, prompt_seed), a server
URL, a time scale (0.1 replays ten times faster) and SLO flags. Each request goes at its
(scaled) time to the native `POST /generate` with `input_ids`, `max_new_tokens=output_len`,
`ignore_eos`, greedy, `stream: true`. Out: a JSON with one record per request (TTFT, every
inter-token gap, completion_tokens, prompt_tokens, finish reason or error status + message),
the KV pages sampled from /metrics over time, the server's token counters before and after,
and per-model and overall summaries (`benchmark.stats`).

Gaps come from `meta_info.completion_tokens` deltas: a chunk bringing n new tokens Δt after
the previous one adds n gaps of Δt/n; the first chunk's extra tokens add gaps of 0. So a
completed stream of k tokens has exactly k-1 gaps.

    python -m benchmark.runner --url http://127.0.0.1:30000 --trace trace.jsonl \
        --time-scale 1 --slo-ttft 2 --slo-tbt 0.1 --out run.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

from benchmark import prom
from benchmark.stats import summarize, summarize_by_model
from benchmark.trace import prompt_ids, read_trace


def new_record(req: dict) -> dict:
    return {"id": req["id"], "model": req["model"], "t_sched": req["t"],
            "prompt_len": req["prompt_len"], "output_len": req["output_len"],
            "long": req.get("long", False), "sent_at": None, "ok": False, "status": None,
            "error": None, "ttft": None, "gaps": [], "completion_tokens": 0,
            "prompt_tokens": 0, "finish_reason": None, "e2e": None}


def payload(req: dict, vocab: int) -> dict:
    return {"model": req["model"], "input_ids": prompt_ids(req, vocab), "stream": True,
            "sampling_params": {"max_new_tokens": req["output_len"], "ignore_eos": True,
                                "temperature": 0.0}}


def on_chunk(rec: dict, meta: dict, now: float, state: dict) -> None:
    """Folds one SSE chunk's meta_info into the record (TTFT, gaps, counts)."""
    n_total = int(meta.get("completion_tokens", rec["completion_tokens"]))
    n_new = n_total - rec["completion_tokens"]
    if n_new > 0:
        if rec["completion_tokens"] == 0:
            rec["ttft"] = now - rec["sent_at"]
            rec["gaps"].extend([0.0] * (n_new - 1))
        else:
            dt = now - state["last"]
            rec["gaps"].extend([dt / n_new] * n_new)
        rec["completion_tokens"] = n_total
        state["last"] = now
    if "prompt_tokens" in meta:
        rec["prompt_tokens"] = int(meta["prompt_tokens"])
    if meta.get("finish_reason"):
        rec["finish_reason"] = meta["finish_reason"]


async def read_stream(resp: aiohttp.ClientResponse, rec: dict) -> None:
    state = {"last": None}
    done = False
    buf = b""
    async for piece in resp.content.iter_any():
        now = time.monotonic()
        buf += piece
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                err = chunk["error"]
                rec["status"] = err.get("code") if isinstance(err, dict) else None
                rec["error"] = err.get("message") if isinstance(err, dict) else str(err)
                continue
            on_chunk(rec, chunk.get("meta_info", {}), now, state)
    fr = rec["finish_reason"] or {}
    if rec["error"] is None and fr.get("type") == "abort":
        rec["status"] = fr.get("status_code")
        rec["error"] = f"aborted: {fr.get('message')}"
    if rec["error"] is None and not done:
        rec["error"] = "stream ended without [DONE]"
    rec["ok"] = rec["error"] is None and done


async def send(session: aiohttp.ClientSession, url: str, req: dict, rec: dict, vocab: int,
               timeout: float) -> None:
    body = payload(req, vocab)
    rec["sent_at"] = time.monotonic()
    try:
        async with session.post(url + "/generate", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            rec["status"] = resp.status
            if resp.status != 200:
                text = await resp.text()
                try:
                    err = json.loads(text).get("error", text)
                    rec["error"] = err.get("message", str(err)) if isinstance(err, dict) else err
                except (ValueError, AttributeError):
                    rec["error"] = text[:500]
                return
            await read_stream(resp, rec)
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["e2e"] = time.monotonic() - rec["sent_at"]


async def replay(url: str, trace: list[dict], time_scale: float = 1.0, vocab: int = 1024,
                 poll_interval: float = 0.25, timeout: float = 600.0) -> dict:
    """Sends every request at t * time_scale; returns records, KV samples and counters."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        before = await prom.fetch(session, url)
        t0 = time.monotonic()
        poller = MetricsPollerTask(session, url, poll_interval, t0)
        records = [new_record(r) for r in trace]
        tasks = []
        for req, rec in zip(trace, records):
            delay = t0 + req["t"] * time_scale - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(session, url, req, rec, vocab, timeout)))
        await asyncio.gather(*tasks)
        duration = time.monotonic() - t0
        await poller.finish()
        after = await prom.fetch(session, url)
    for rec in records:
        rec["sent_at"] = None if rec["sent_at"] is None else round(rec["sent_at"] - t0, 6)
    return {"records": records, "duration": duration, "kv_timeline": poller.poller.samples,
            "metrics_poll_failures": poller.poller.failures,
            "server_counters": counters(before, after)}


class MetricsPollerTask:
    def __init__(self, session, url, interval, t0):
        self.poller = prom.MetricsPoller(session, url, interval, t0)
        self.task = asyncio.create_task(self.poller.run())

    async def finish(self) -> None:
        self.poller.stop()
        await self.task


def counters(before: dict, after: dict) -> dict:
    """Per-model deltas of the server's prompt / generation token counters over the replay."""
    out = {}
    for key, name in (("generation_tokens", prom.GEN_TOKENS),
                      ("prompt_tokens", prom.PROMPT_TOKENS)):
        a, b = prom.by_label(after, name, "model_name"), prom.by_label(before, name, "model_name")
        out[key] = {m: a[m] - b.get(m, 0.0) for m in a}
    out["retractions"] = (sum(prom.by_label(after, prom.RETRACTIONS, "").values())
                          - sum(prom.by_label(before, prom.RETRACTIONS, "").values()))
    return out


def report(result: dict, slo_ttft: float | None, slo_tbt: float | None) -> dict:
    recs, dur = result["records"], result["duration"]
    result["slo"] = {"ttft_s": slo_ttft, "tbt_s": slo_tbt}
    result["overall"] = summarize(recs, dur, slo_ttft, slo_tbt)
    result["overall"]["preempted"] = result["server_counters"]["retractions"]
    result["per_model"] = summarize_by_model(recs, dur, slo_ttft, slo_tbt)
    used = [sum(s["pool_used"].values()) for s in result["kv_timeline"]]
    result["overall"]["kv_pages_used_max"] = max(used) if used else None
    return result


def run(url: str, trace_path: str | Path, time_scale: float = 1.0, vocab: int = 1024,
        slo_ttft: float | None = None, slo_tbt: float | None = None,
        poll_interval: float = 0.25, timeout: float = 600.0) -> dict:
    trace = read_trace(trace_path)
    result = asyncio.run(replay(url, trace, time_scale, vocab, poll_interval, timeout))
    result["trace"] = str(trace_path)
    result["time_scale"] = time_scale
    return report(result, slo_ttft, slo_tbt)


def headline(summary: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.1f}"
    return (f"sent {summary['sent']} completed {summary['completed']} rejected "
            f"{summary['rejected']} failed {summary['failed']} | TTFT p50/p99 "
            f"{ms(summary['ttft_p50'])}/{ms(summary['ttft_p99'])} ms | TBT p50/p99 "
            f"{ms(summary['tbt_p50'])}/{ms(summary['tbt_p99'])} ms | goodput "
            f"{summary['goodput_requests']} | longest context {summary['longest_context']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiplies trace times (0.1 = ten times faster)")
    p.add_argument("--vocab-size", type=int, default=1024, help="prompt ids are < this")
    p.add_argument("--slo-ttft", type=float, help="seconds")
    p.add_argument("--slo-tbt", type=float, help="seconds, on each request's P99 gap")
    p.add_argument("--poll-interval", type=float, default=0.25)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    result = run(a.url.rstrip("/"), a.trace, a.time_scale, a.vocab_size, a.slo_ttft,
                 a.slo_tbt, a.poll_interval, a.timeout)
    a.out.write_text(json.dumps(result, indent=1))
    print(headline(result["overall"]), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
