"""SGLang's native HTTP API: /generate and the server endpoints, at the root and per model.

    POST /generate            text | input_ids, single or batch, sampling_params, stream, logprobs
    GET  /health              200 while the scheduler lives and the engine can serve
    GET  /health_generate     200 once one token came back from each model asked about
    GET  /model_info, /get_model_info
    GET  /server_info, /get_server_info
    GET|POST /flush_cache     POST /abort_request       GET /metrics
    POST /concate_and_append_request   refused with a 400 (see its handler)

Each is also served under `/models/{name}/...`, where it concerns that one model, so that any
SGLang client (which knows no model field) reaches one model by its base URL. The response
shapes are those of SGLang's `sglang/api/v1/api_types.py`: `text`, `output_ids`, `meta_info`
(`id`, `prompt_tokens`, `completion_tokens`, `cached_tokens`, `finish_reason`, `e2e_latency`,
logprobs as `[logprob, token_id, text|null]`, with the running `output_token_logprobs_length`).
Streams send cumulative `text`, `output_ids` and `completion_tokens` in every chunk (one per
`--stream-interval` tokens after the first), then `data: [DONE]`; with `return_logprob`, a
chunk's `output_token_logprobs` and `output_top_logprobs` hold only the tokens new since the
previous chunk (so `output_token_logprobs_length` equals `completion_tokens`): text as in
SGLang's default streams, output logprobs as in its `--incremental-streaming-output` ones, the
pairing its frontend reads (`text_async_iter(..., return_meta_data=True)`,
test_stream_logprobs).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sglang_crosspool import __version__
from sglang_crosspool.engine.sampling_params import InvalidRequest
from sglang_crosspool.server.messages import TokenizedRequest
from sglang_crosspool.server.request_manager import ApiError, RequestHandle
from sglang_crosspool.server.sampling import engine_params

NATIVE_ROUTES = []  # (path, methods, handler); http_server mounts each at / and /models/{name}


def route(path: str, methods=("GET",)):
    def register(fn):
        NATIVE_ROUTES.append((path, list(methods), fn))
        return fn
    return register


# -- /generate ---------------------------------------------------------------------------------


def _per_item(body: dict, key: str, n: int, single: bool, default):
    value = body.get(key)
    if value is None:
        return [default] * n
    if isinstance(value, list) and not single:
        if len(value) != n:
            raise ApiError(400, f"{key}: {len(value)} values for {n} prompts", param=key)
        return [default if v is None else v for v in value]
    if isinstance(value, list) and key != "sampling_params":
        if len(value) != 1:
            raise ApiError(400, f"{key}: a list of {len(value)} values for one prompt", param=key)
        return value
    return [value] * n


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ApiError(400, f"{key}: {why}", param=key)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_generate(body: dict, model: str, state) -> tuple[list[TokenizedRequest], bool]:
    """The engine requests of one /generate call, and whether it was a single prompt."""
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise ApiError(400, "give exactly one of `text` and `input_ids`", param="text")
    if text is not None:
        single = isinstance(text, str)
        items = [text] if single else text
        _check(isinstance(items, list) and all(isinstance(t, str) for t in items) and items,
               "text", "expected a string or a non-empty list of strings")
    else:
        single = isinstance(input_ids, list) and (not input_ids or _is_int(input_ids[0]))
        items = [input_ids] if single else input_ids
        _check(isinstance(items, list) and items and all(
            isinstance(ids, list) and all(_is_int(t) for t in ids) for ids in items),
            "input_ids", "expected a list of token ids or a non-empty list of such lists")
    n_items = len(items)
    params = _per_item(body, "sampling_params", n_items, single, {})
    rids = _per_item(body, "rid", n_items, single, None)
    return_logprob = _per_item(body, "return_logprob", n_items, single, False)
    start_lens = _per_item(body, "logprob_start_len", n_items, single, -1)
    top_nums = _per_item(body, "top_logprobs_num", n_items, single, 0)
    for i in range(n_items):
        _check(rids[i] is None or isinstance(rids[i], str), "rid", "expected a string")
        _check(isinstance(return_logprob[i], bool), "return_logprob", "expected a boolean")
        _check(_is_int(start_lens[i]), "logprob_start_len", "expected an integer")
        _check(_is_int(top_nums[i]) and top_nums[i] >= 0, "top_logprobs_num",
               "expected an integer >= 0")
    tokenizer = state.tokenizers[model]
    requests = []
    for i, item in enumerate(items):
        try:
            sp = engine_params(params[i], max_n=state.args.max_n)
        except InvalidRequest as e:
            raise ApiError(400, str(e), param="sampling_params") from None
        ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        for k in range(sp.n):
            if rids[i] is None:
                rid = uuid.uuid4().hex
            else:
                rid = rids[i] if sp.n == 1 else f"{rids[i]}-{k}"
            requests.append(TokenizedRequest(rid, model, ids, sp.for_sample(k), return_logprob[i],
                                             start_lens[i], top_nums[i]))
    return requests, single and len(requests) == 1


def logprob_entries(entries, state, model: str, with_text: bool) -> list:
    if not with_text:
        return [list(e) if e is not None else None for e in entries]
    return [[e[0], e[1], state.token_text(model, e[1])] if e is not None else None
            for e in entries]


def top_entries(rows, state, model: str, with_text: bool) -> list:
    return [None if row is None else logprob_entries(row, state, model, with_text)
            for row in rows]


def result_dict(h: RequestHandle, state, text: str | None = None,
                logprobs_from: tuple[int, int] = (0, 0)) -> dict:
    """One response (or stream chunk); its output logprobs start at `logprobs_from` (token,
    top), the entries a stream has already sent."""
    req = h.req
    meta = {
        "id": req.rid,
        "finish_reason": h.finish_reason,
        "prompt_tokens": h.prompt_tokens,
        "completion_tokens": len(h.output_ids),
        "cached_tokens": h.cached_tokens,
        "num_retractions": h.retractions,
    }
    if h.finished:
        meta["e2e_latency"] = (h.finished_time or time.monotonic()) - h.created
    if req.return_logprob:
        wt = h.return_text_in_logprobs
        meta["input_token_logprobs"] = logprob_entries(h.input_token_logprobs, state, req.model,
                                                       wt)
        tok_from, top_from = logprobs_from
        meta["output_token_logprobs"] = logprob_entries(h.output_token_logprobs[tok_from:],
                                                        state, req.model, wt)
        meta["output_token_logprobs_length"] = len(h.output_token_logprobs)
        meta["input_top_logprobs"] = top_entries(h.input_top_logprobs, state, req.model, wt)
        meta["output_top_logprobs"] = top_entries(h.output_top_logprobs[top_from:], state,
                                                  req.model, wt)
    return {"text": h.text if text is None else text, "output_ids": list(h.output_ids),
            "meta_info": meta}


@route("/generate", methods=("POST", "PUT"))
async def generate(request: Request):
    state = request.app.state.server
    body = await state.json_body(request)
    model = state.resolve_model(request, body.get("model"))
    reqs, single = await state.run_blocking(parse_generate, body, model, state)  # tokenizes
    stream = body.get("stream", False)
    _check(isinstance(stream, bool), "stream", "expected a boolean")
    wt = body.get("return_text_in_logprobs") or False
    _check(isinstance(wt, bool), "return_text_in_logprobs", "expected a boolean")
    handles = await state.manager.submit(reqs, return_text_in_logprobs=wt)
    if stream:
        return StreamingResponse(_stream(handles, single, state), media_type="text/event-stream")
    await state.wait_all(handles, request)
    failed = server_failure(handles)
    if failed is not None:
        raise failed
    results = [result_dict(h, state) for h in handles]
    return JSONResponse(results[0] if single else results)


def server_failure(handles: list[RequestHandle]) -> ApiError | None:
    """The error of the first request the server failed (an abort with a status code, as
    SGLang answers them); None if none failed. A client's abort is no failure."""
    for h in handles:
        r = h.finish_reason or {}
        if r.get("type") == "abort" and r.get("status_code"):
            return ApiError(r["status_code"], f"the request failed: {r.get('message')}")
    return None


async def _stream(handles: list[RequestHandle], single: bool, state):
    event = handles[0].event
    done = [False] * len(handles)
    last: list = [None] * len(handles)  # (completion_tokens, text) last sent per request
    sent = [(0, 0)] * len(handles)  # output (token, top) logprob entries sent per request
    try:
        while not all(done):
            await event.wait()
            event.clear()
            for i, h in enumerate(handles):
                if done[i]:
                    continue
                text = h.visible_text()
                key = (len(h.output_ids), text)
                if key == last[i] and not h.finished:
                    continue
                chunk = result_dict(h, state, text, sent[i])
                sent[i] = (len(h.output_token_logprobs), len(h.output_top_logprobs))
                if not single:
                    chunk["index"] = i
                last[i], done[i] = key, h.finished
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        for h in handles:  # the client went away (or the stream broke): free its KV pages
            if not h.finished:
                state.manager.abort(h.rid, "the client disconnected")


# -- server endpoints --------------------------------------------------------------------------


@route("/health")
async def health(request: Request):
    """503 once the scheduler is gone, the engine cannot serve (a dead FFN server) or the
    server is shutting down."""
    manager = request.app.state.server.manager
    if manager.dead or manager.closing or manager.stats.get("unavailable"):
        return Response(status_code=503)
    try:  # asks the scheduler, which checks the FFN servers, between two steps
        result = await manager.control("health", timeout=10)
    except (TimeoutError, ApiError):
        return Response(status_code=503)
    return Response(status_code=503 if result.get("unavailable") else 200)


@route("/health_generate")
async def health_generate(request: Request):
    """One token from each model concerned (the path's, or all at the root)."""
    state = request.app.state.server
    name = request.path_params.get("model_name")
    models = [state.check_model(name)] if name else state.config.model_names
    from sglang_crosspool.engine.sampling_params import SamplingParams

    reqs = [TokenizedRequest(f"health-{uuid.uuid4().hex}", m, [0],
                             SamplingParams(max_new_tokens=1, temperature=0.0)) for m in models]
    try:
        handles = await state.manager.submit(reqs, log_metrics=False)
        await asyncio.wait_for(state.wait_all(handles, request), timeout=20)
    except (TimeoutError, ApiError):
        return Response(status_code=503)
    ok = all(h.finish_reason and h.finish_reason.get("type") != "abort" for h in handles)
    return Response(status_code=200 if ok else 503)


def model_info_dict(state, name: str) -> dict:
    entry = state.config.model(name)
    return {
        "model_path": entry.path,
        "tokenizer_path": entry.path,
        "served_model_name": entry.name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "model_type": entry.spec.model_type,
        "architectures": state.architectures.get(name),
        "context_length": entry.context_length,
        "has_image_understanding": False,
        "has_audio_understanding": False,
    }


@route("/model_info")
@route("/get_model_info")
async def model_info(request: Request):
    state = request.app.state.server
    name = state.resolve_model(request, request.query_params.get("model"))
    return JSONResponse(model_info_dict(state, name))


@route("/server_info")
@route("/get_server_info")
async def server_info(request: Request):
    state = request.app.state.server
    name = request.path_params.get("model_name")
    if name:
        state.check_model(name)
    stats = await state.manager.control("stats")
    models = [name] if name else state.config.model_names
    first = state.config.model(models[0])
    kv = stats["kv"]
    info = {
        **state.args.to_dict(),
        "model_path": first.path,
        "tokenizer_path": first.path,
        "served_model_name": first.name,
        "served_models": [model_info_dict(state, m) for m in models],
        "max_context_length": max(state.config.model(m).context_length for m in models),
        "max_total_num_tokens": None,
        "version": __version__,
        "frontend": "sglang_crosspool",
        "engine": {"kv_pages": state.config.kv_pages, "kv_page_bytes": kv["page_bytes"],
                   "kv_budget_bytes": state.config.kv_budget_bytes},
        "internal_states": [{
            "kv": kv,
            "scheduler": stats["scheduler"],
            "in_flight": stats["in_flight"],
            "scheduler_pid": stats["pid"],
            "avg_spec_accept_length": None,
            # --tp-size / --ep-size (or an attention split): ranks, heads and replicated KV
            "parallel": stats.get("parallel"),
            # one entry per attention worker (device): its models, KV pages, weight bytes
            "workers": stats.get("workers") or [{
                "index": 0, "device": stats.get("device"), "models": models,
                "pid": stats["pid"], "kv": {k: kv.get(k) for k in (
                    "used_pages", "total_pages", "page_bytes", "used_bytes", "total_bytes")},
                "attention_bytes": stats.get("attention_bytes", 0),
                "ffn_bytes_here": stats.get("ffn_bytes_here", 0),
                "ffn_device": stats.get("ffn_device"),
                "ffn_bytes_per_server": stats.get("ffn_bytes_per_server", []),
                "device_memory": stats.get("device_memory", {})}],
        }],
    }
    return JSONResponse(info)


@route("/plan")
async def plan(request: Request):
    """The plan the server was launched with (`--plan`) beside what its workers report, per
    device (see `plan_check.py`)."""
    from sglang_crosspool.planner.schema import load_plan
    from sglang_crosspool.server.plan_check import plan_report

    state = request.app.state.server
    if not state.args.plan_path:
        raise ApiError(404, "this server was launched without --plan")
    stats = await state.manager.control("stats")
    if "error" in stats:
        raise ApiError(503, stats["error"])
    if not stats.get("workers"):  # one worker: the shape the router gives several
        stats = {**stats, "workers": [{
            "device": stats.get("device"), "models": state.config.model_names,
            "kv": stats.get("kv", {}), "attention_bytes": stats.get("attention_bytes", 0),
            "ffn_bytes_here": stats.get("ffn_bytes_here", 0),
            "ffn_device": stats.get("ffn_device"),
            "ffn_bytes_per_server": stats.get("ffn_bytes_per_server", []),
            "device_memory": stats.get("device_memory")}]}
    report = plan_report(load_plan(state.args.plan_path), state.args.pool_mode,
                         state.args.plan_device_index, stats)
    return JSONResponse({"plan": state.args.plan_path, **report})


@route("/flush_cache", methods=("GET", "POST"))
async def flush_cache(request: Request):
    state = request.app.state.server
    name = request.path_params.get("model_name")
    if name:
        state.check_model(name)
    result = await state.manager.control("flush_cache")
    if result.get("success"):
        return Response("Cache flushed.\n", status_code=200)
    return Response((result.get("message") or "Flush cache failed.") + "\n", status_code=400)


@route("/abort_request", methods=("POST",))
async def abort_request(request: Request):
    state = request.app.state.server
    body = await state.json_body(request)
    if body.get("abort_all"):
        state.manager.abort_all(body.get("message") or "aborted by /abort_request")
        return Response(status_code=200)
    rid = body.get("rid")
    _check(isinstance(rid, str) and rid, "rid", "expected the id of a request")
    state.manager.abort(rid, body.get("message") or "aborted by /abort_request")
    return Response(status_code=200)


@route("/concate_and_append_request", methods=("POST",))
async def concate_and_append_request(request: Request):
    """The frontend's `forks.join(mode="concate_and_append")` asks for a request whose KV is
    its forks' KV concatenated, naming the forks by the frontend's stream ids, which no
    /generate call ever sends: the server cannot tell which KV they mean, so it refuses. SGLang's
    own server does not serve this path either.

    NOTE: the frontend (0.5.23) raises this in its executor thread and then waits forever for
    the next variable; the message shows in its "Error in stream_executor" warning."""
    raise ApiError(400, "/concate_and_append_request is not supported: the server keeps no KV "
                        "by frontend stream id, so forks cannot be joined by concatenating "
                        "their KV cache. Join them with the default mode (forks.join()), or set "
                        "sglang's global_config.enable_parallel_encoding = False so that the "
                        "frontend concatenates the forks' text instead.")


@route("/metrics")
async def metrics(request: Request):
    state = request.app.state.server
    if not state.manager.dead:
        try:  # fresh gauges; the last pushed stats do if the scheduler is busy for long
            stats = await state.manager.control("stats", timeout=5)
            state.metrics.set_stats(stats)
        except TimeoutError:
            pass
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
