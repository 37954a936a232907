"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

In: OpenAI request bodies (`model` picks the served model; SGLang's extra sampling fields such
as top_k, min_p, repetition_penalty, ignore_eos are accepted too). Out: OpenAI response objects;
streams as OpenAI sends them - for chat a role chunk, content deltas, a chunk with the
finish_reason, a usage chunk only when `stream_options.include_usage` asks, then
`data: [DONE]`. Errors come in OpenAI's shape, `{"error": {message, type, param, code}}`; a
stream that fails midway ends its choice with finish_reason "stop", then sends such an error
object (which OpenAI's clients raise), then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sglang_crosspool.engine.sampling_params import InvalidRequest
from sglang_crosspool.server.messages import TokenizedRequest
from sglang_crosspool.server.request_manager import ApiError, RequestHandle
from sglang_crosspool.server.sampling import engine_params

router = APIRouter(prefix="/v1")

# OpenAI fields -> SGLang sampling fields (same meaning), and SGLang extras passed through.
_RENAMED = {"temperature": "temperature", "top_p": "top_p", "n": "n", "seed": "seed",
            "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
            "stop": "stop"}
_EXTRAS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "skip_special_tokens",
           "stop_token_ids", "regex", "json_schema", "ebnf", "no_stop_trim")
_ROLES = ("system", "user", "assistant", "developer", "tool")


# -- models ------------------------------------------------------------------------------------


def _model_card(state, name: str) -> dict:
    entry = state.config.model(name)
    return {"id": name, "object": "model", "created": state.created, "owned_by": "sglang-crosspool",
            "root": entry.path, "max_model_len": entry.context_length}


@router.get("/models")
async def list_models(request: Request):
    state = request.app.state.server
    return {"object": "list", "data": [_model_card(state, m) for m in state.config.model_names]}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request):
    state = request.app.state.server
    return _model_card(state, state.check_model(model))


# -- shared request handling ---------------------------------------------------------------------


def _response_format(fmt) -> dict:
    """OpenAI's `response_format` as SGLang's constraint: `json_object` is any JSON object,
    `json_schema` its schema (followed whether `strict` is set or not), `text` none."""
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": '{"type": "object"}'}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema: expected a JSON schema "
                                "(an object)", param="response_format")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise ApiError(400, "response_format.json_schema.strict: expected a boolean",
                           param="response_format")
        return {"json_schema": json.dumps(schema)}
    raise ApiError(400, f"response_format.type: expected one of text, json_object, "
                        f"json_schema, got {kind!r}", param="response_format")


def _sampling(body: dict, prompt_len: int, context_length: int, chat: bool) -> dict:
    """SGLang sampling_params from an OpenAI body."""
    params = {dst: body[src] for src, dst in _RENAMED.items() if body.get(src) is not None}
    params.update({k: body[k] for k in _EXTRAS if body.get(k) is not None})
    params.update(_response_format(body.get("response_format")))
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        # Chat: until the context ends, as OpenAI does; completions: OpenAI's default of 16.
        max_tokens = max(context_length - prompt_len, 0) if chat else 16
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ApiError(400, f"{key}: expected an integer >= 0, got {max_tokens!r}", param=key)
    params["max_new_tokens"] = max_tokens
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias: not supported by this server", param="logit_bias")
    min_tokens = body.get("min_tokens")
    if min_tokens:
        raise ApiError(400, "min_tokens: not supported by this server", param="min_tokens")
    return params


def _engine_params(params: dict, max_n: int):
    try:
        return engine_params(params, where="request", max_n=max_n)
    except InvalidRequest as e:
        msg = str(e)
        param = msg.split(":")[0].split(".")[-1] if "." in msg.split(":")[0] else None
        raise ApiError(400, msg.replace("request.", "", 1), param=param) from None


def _stream(body: dict) -> bool:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream: expected a boolean, got {stream!r}", param="stream")
    return bool(stream)


def _stream_options(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options: expected an object", param="stream_options")
    if not body.get("stream"):
        raise ApiError(400, "stream_options: only allowed when stream is true",
                       param="stream_options")
    return bool(opts.get("include_usage"))


def _finish(h: RequestHandle) -> str | None:
    """OpenAI's finish reason: an aborted request stopped (its error goes out on its own)."""
    r = h.finish_reason
    if r is None:
        return None
    return "length" if r.get("type") == "length" else "stop"


def _stream_error(h: RequestHandle) -> bytes:
    """The error event of a stream whose request was aborted, or nothing."""
    r = h.finish_reason or {}
    if r.get("type") != "abort":
        return b""
    status = r.get("status_code") or 400  # no status: a client aborted it (/abort_request)
    error = ApiError(status, f"the request was aborted: {r.get('message')}")
    return _sse({"error": {"message": error.message, "type": error.type, "param": None,
                           "code": status}})


def _usage(handles: list[RequestHandle], n: int) -> dict:
    prompt = sum(h.prompt_tokens for h in handles[::n])  # each prompt once, as OpenAI counts
    completion = sum(len(h.output_ids) for h in handles)
    cached = sum(h.cached_tokens for h in handles[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _check_abort(handles: list[RequestHandle]) -> None:
    for h in handles:
        r = h.finish_reason or {}
        if r.get("type") == "abort":
            raise ApiError(r.get("status_code", 500), f"the request was aborted: "
                                                      f"{r.get('message')}")


async def _submit(state, request: Request, body: dict, model: str, prompts: list[list[int]],
                  params: list[dict], logprobs: int | None):
    reqs = []
    for i, ids in enumerate(prompts):
        sp = _engine_params(params[i], state.args.max_n)
        for k in range(sp.n):
            reqs.append(TokenizedRequest(uuid.uuid4().hex, model, ids, sp.for_sample(k),
                                         return_logprob=logprobs is not None,
                                         top_logprobs_num=logprobs or 0))
    n = reqs and len(reqs) // len(prompts)
    return await state.manager.submit(reqs), n


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# -- completions ---------------------------------------------------------------------------------


def _prompts(body: dict, tokenizer) -> list[list[int]]:
    p = body.get("prompt")

    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in x)
    if isinstance(p, str):
        return [tokenizer.encode(p)]
    if is_ids(p):
        return [list(p)]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return [tokenizer.encode(x) for x in p]
    if isinstance(p, list) and p and all(is_ids(x) for x in p):
        return [list(x) for x in p]
    raise ApiError(400, "prompt: expected a string, a list of strings, a list of token ids or "
                        "a list of such lists", param="prompt")


def _completion_logprobs(h: RequestHandle, state, start: int, text_offset: int) -> dict:
    model = h.req.model
    entries = h.output_token_logprobs[start:]
    tokens = [state.token_text(model, e[1]) for e in entries]
    offsets, pos = [], text_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops = None
    if h.req.top_logprobs_num:
        tops = [{state.token_text(model, i): lp for lp, i, _ in row}
                for row in h.output_top_logprobs[start:]]
    return {"tokens": tokens, "token_logprobs": [e[0] for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


@router.post("/completions")
async def completions(request: Request):
    state = request.app.state.server
    body = await state.json_body(request)
    model = state.resolve_model(request, body.get("model"))
    tokenizer = state.tokenizers[model]
    stream = _stream(body)
    prompts = await state.run_blocking(_prompts, body, tokenizer)
    if body.get("suffix"):
        raise ApiError(400, "suffix: not supported by this server", param="suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise ApiError(400, "best_of: only best_of == n is supported", param="best_of")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= 20):
        raise ApiError(400, "logprobs: expected an integer in [0, 20]", param="logprobs")
    echo = bool(body.get("echo"))
    ctx = state.config.model(model).context_length
    params = [_sampling(body, len(ids), ctx, chat=False) for ids in prompts]
    include_usage = _stream_options(body)
    handles, n = await _submit(state, request, body, model, prompts, params, logprobs)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prefix = [tokenizer.decode(ids) if echo else "" for ids in prompts]

    if stream:
        async def events():
            event = handles[0].event
            sent = [0] * len(handles)  # characters of text sent per choice
            sent_lp = [0] * len(handles)
            done = [False] * len(handles)
            try:
                if echo:
                    for i, h in enumerate(handles):
                        yield _sse(_completion_chunk(cid, created, model, i, prefix[i // n],
                                                     None, None))
                while not all(done):
                    await event.wait()
                    event.clear()
                    for i, h in enumerate(handles):
                        if done[i]:
                            continue
                        text = h.visible_text()
                        delta = text[sent[i]:]
                        lp = None
                        if logprobs is not None and len(h.output_token_logprobs) > sent_lp[i]:
                            lp = _completion_logprobs(h, state, sent_lp[i],
                                                      len(prefix[i // n]) + sent[i])
                            sent_lp[i] = len(h.output_token_logprobs)
                        if delta or lp:
                            sent[i] = len(text)
                            yield _sse(_completion_chunk(cid, created, model, i, delta, lp, None))
                        if h.finished:
                            done[i] = True
                            yield _sse(_completion_chunk(cid, created, model, i, "", None,
                                                         _finish(h)))
                            if error := _stream_error(h):
                                yield error
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created,
                                "model": model, "choices": [], "usage": _usage(handles, n)})
                yield b"data: [DONE]\n\n"
            finally:
                for h in handles:
                    if not h.finished:
                        state.manager.abort(h.rid, "the client disconnected")

        return StreamingResponse(events(), media_type="text/event-stream")

    await state.wait_all(handles, request)
    _check_abort(handles)
    choices = []
    for i, h in enumerate(handles):
        lp = (_completion_logprobs(h, state, 0, len(prefix[i // n]))
              if logprobs is not None else None)
        choices.append({"index": i, "text": prefix[i // n] + h.text, "logprobs": lp,
                        "finish_reason": _finish(h),
                        "matched_stop": (h.finish_reason or {}).get("matched")})
    return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                         "model": model, "choices": choices, "usage": _usage(handles, n)})


def _completion_chunk(cid, created, model, index, text, logprobs, finish) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}]}


# -- chat completions ----------------------------------------------------------------------------


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: expected a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}].role: expected one of {', '.join(_ROLES)}",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: expected a string or a list of parts",
                           param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"],
                    "content": content})
    return out


def _chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions",
                       param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja raises many types for a bad conversation
        raise ApiError(400, f"messages: the chat template failed: {e}", param="messages") \
            from None
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_logprobs(h: RequestHandle, state, start: int) -> dict:
    model = h.req.model
    content = []
    tops = h.output_top_logprobs[start:] if h.req.top_logprobs_num else None
    for j, (lp, tid, _) in enumerate(h.output_token_logprobs[start:]):
        tok = state.token_text(model, tid)
        entry = {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
        if tops is not None:
            entry["top_logprobs"] = [
                {"token": (t := state.token_text(model, i)), "logprob": v,
                 "bytes": list(t.encode())} for v, i, _ in tops[j]]
        content.append(entry)
    return {"content": content}


@router.post("/chat/completions")
async def chat_completions(request: Request):
    state = request.app.state.server
    body = await state.json_body(request)
    model = state.resolve_model(request, body.get("model"))
    tokenizer = state.tokenizers[model]
    stream = _stream(body)
    ids = await state.run_blocking(_chat_prompt, tokenizer, _messages(body))
    want_lp = body.get("logprobs") or False
    if not isinstance(want_lp, bool):
        raise ApiError(400, "logprobs: expected a boolean", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool)
                            or not 0 <= top <= 20):
        raise ApiError(400, "top_logprobs: expected an integer in [0, 20]", param="top_logprobs")
    if top and not want_lp:
        raise ApiError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
    if body.get("tools"):
        raise ApiError(400, "tools: tool calling is not supported by this server", param="tools")
    ctx = state.config.model(model).context_length
    params = [_sampling(body, len(ids), ctx, chat=True)]
    include_usage = _stream_options(body)
    handles, n = await _submit(state, request, body, model, [ids], params,
                               (top or 0) if want_lp else None)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if stream:
        async def events():
            event = handles[0].event
            sent = [0] * len(handles)
            sent_lp = [0] * len(handles)
            done = [False] * len(handles)
            try:
                for i in range(len(handles)):
                    yield _sse(_chat_chunk(cid, created, model, i,
                                           {"role": "assistant", "content": ""}, None, None,
                                           include_usage))
                while not all(done):
                    await event.wait()
                    event.clear()
                    for i, h in enumerate(handles):
                        if done[i]:
                            continue
                        text = h.visible_text()
                        delta = text[sent[i]:]
                        lp = None
                        if want_lp and len(h.output_token_logprobs) > sent_lp[i]:
                            lp = _chat_logprobs(h, state, sent_lp[i])
                            sent_lp[i] = len(h.output_token_logprobs)
                        if delta or lp:
                            sent[i] = len(text)
                            yield _sse(_chat_chunk(cid, created, model, i, {"content": delta},
                                                   lp, None, include_usage))
                        if h.finished:
                            done[i] = True
                            yield _sse(_chat_chunk(cid, created, model, i, {}, None,
                                                   _finish(h), include_usage))
                            if error := _stream_error(h):
                                yield error
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [], "usage": _usage(handles, n)})
                yield b"data: [DONE]\n\n"
            finally:
                for h in handles:
                    if not h.finished:
                        state.manager.abort(h.rid, "the client disconnected")

        return StreamingResponse(events(), media_type="text/event-stream")

    await state.wait_all(handles, request)
    _check_abort(handles)
    choices = [{"index": i,
                "message": {"role": "assistant", "content": h.text},
                "logprobs": _chat_logprobs(h, state, 0) if want_lp else None,
                "finish_reason": _finish(h),
                "matched_stop": (h.finish_reason or {}).get("matched")}
               for i, h in enumerate(handles)]
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                         "model": model, "choices": choices, "usage": _usage(handles, n)})


def _chat_chunk(cid, created, model, index, delta, logprobs, finish, with_usage) -> dict:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk
