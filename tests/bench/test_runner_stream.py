"""The runner against a scripted loopback server: normal, aborted, cut and refused streams."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from benchmark.runner import replay, report

METRICS = 'sglang:generation_tokens_total{model_name="ok"} 0\n'


def chunk(n, finish=None):
    meta = {"completion_tokens": n, "prompt_tokens": 3, "finish_reason": finish}
    return f"data: {json.dumps({'text': 'x' * n, 'meta_info': meta})}\n\n".encode()


async def generate(request):
    body = await request.json()
    model = body["model"]
    if model == "busy":
        return web.json_response({"error": {"message": "queue full", "code": 503}}, status=503)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if model == "ok":
        for n, fin in ((1, None), (3, None), (4, {"type": "length", "length": 4})):
            await resp.write(chunk(n, fin))
            await asyncio.sleep(0.02)
        await resp.write(b"data: [DONE]\n\n")
    elif model == "abort":
        await resp.write(chunk(1))
        await resp.write(chunk(1, {"type": "abort", "message": "KV pool full",
                                   "status_code": 500}))
        await resp.write(b"data: [DONE]\n\n")
    else:  # "cut": the stream ends without [DONE]
        await resp.write(chunk(2))
    return resp


async def metrics(_):
    return web.Response(text=METRICS)


async def scripted_replay():
    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    trace = [{"id": i, "t": 0.01 * i, "model": m, "prompt_len": 3, "output_len": 4,
              "prompt_seed": i} for i, m in enumerate(["ok", "abort", "cut", "busy"])]
    try:
        return await replay(f"http://127.0.0.1:{port}", trace, poll_interval=0.05)
    finally:
        await runner.cleanup()


def test_runner_records_every_outcome():
    result = report(asyncio.run(scripted_replay()), slo_ttft=10, slo_tbt=10)
    ok, abort, cut, busy = result["records"]
    assert ok["ok"] and ok["completion_tokens"] == 4 and len(ok["gaps"]) == 3
    assert ok["gaps"][0] == ok["gaps"][1]  # 2 tokens in one chunk share its delay
    assert ok["gaps"][2] > 0.015 and ok["ttft"] > 0
    assert not abort["ok"] and abort["status"] == 500 and "KV pool full" in abort["error"]
    assert not cut["ok"] and "without [DONE]" in cut["error"] and cut["completion_tokens"] == 2
    assert not busy["ok"] and busy["status"] == 503 and busy["error"] == "queue full"
    s = result["overall"]
    assert (s["sent"], s["completed"], s["rejected"], s["failed"]) == (4, 1, 1, 2)
    assert s["goodput_requests"] == 1
    assert result["kv_timeline"] and result["metrics_poll_failures"] == 0
