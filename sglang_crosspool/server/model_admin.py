"""Models in and out of a running server, in SGLang's style of admin endpoints.

    POST /load_model    {"model_path", "served_model_name"?, "context_length"?, "load_format"?}
    POST /unload_model  {"served_model_name", "force"?: false, "timeout"?: seconds}
    POST /rebalance     {"placement"?: {model: [[expert ids of FFN server 0], ...]}}

Each answers `{"success": true, "message", ...what was loaded, freed or moved}` once done, or
an error in the usual shape: 400 a bad body or a name already served, 404 an unknown model,
501 not on this server (the static pool mode, the p2p crossing; rebalance: not crosspool, or
several attention workers), 507 no room (weights over the free memory, a KV block over the
budget, transport buffers too small), 504 when the scheduler did not finish in time (the
operation goes on).

A load checks the checkpoint's config.json and loads the tokenizer here, then the scheduler
loads the weights while every other model keeps serving (`engine/live_models.py`); requests
reach the model once the scheduler says every part is ready. An unload takes the model off
this side first, so that new requests get 404 at once, then waits until the scheduler has let
the requests in flight finish (or, with `force`, ended them with an error) and freed the model.
A rebalance moves experts between FFN servers while every model serves: without a placement it
spreads each model's experts evenly, moving as few as it can. With several attention workers
(`--devices`) a load goes to the worker holding the fewest weight bytes (worker_router.py).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sglang_crosspool.server.request_manager import ApiError

router = APIRouter()
LOAD_TIMEOUT_S = 1800.0
UNLOAD_TIMEOUT_S = 600.0  # default; the body's `timeout` overrides it


def _refuse_several_workers(state) -> None:
    workers = getattr(state.manager.client, "workers", None)
    if workers is not None and len(workers) > 1:
        raise ApiError(501, "rebalance is not supported on a server with several attention "
                            "workers (--devices): each has FFN servers of its own, and moving "
                            "experts across them is not built")


async def _control(state, kind: str, args: dict, timeout: float) -> dict:
    try:
        result = await state.manager.control(kind, timeout=timeout, args=args)
    except TimeoutError:
        raise ApiError(504, f"{kind}: the scheduler did not finish within {timeout:.0f} s; "
                            "it goes on (see /server_info's live_models)") from None
    if "error" in result:
        raise ApiError(result.get("status", 500), result["error"])
    return result


@router.post("/load_model")
async def load_model(request: Request):
    state = request.app.state.server
    body = await state.json_body(request)
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        raise ApiError(400, "model_path: expected the checkpoint directory", param="model_path")
    name = body.get("served_model_name") or Path(path).name
    if not isinstance(name, str):
        raise ApiError(400, "served_model_name: expected a string", param="served_model_name")
    if name in state.tokenizers:
        raise ApiError(400, f"served_model_name: {name!r} is already served",
                       param="served_model_name")
    tokenizer = await state.run_blocking(_tokenizer, path)
    args = {k: body[k] for k in ("model_path", "context_length", "load_format") if k in body}
    result = await _control(state, "load_model", {**args, "served_model_name": name},
                            LOAD_TIMEOUT_S)
    state.add_model(result["entry"], result["shares"], tokenizer)
    out = {k: v for k, v in result.items() if k not in ("entry",)}
    return JSONResponse({"success": True, "message": f"model {name!r} loaded", **out})


def _tokenizer(path: str):
    from sglang_crosspool.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer is the caller's
        raise ApiError(400, f"model_path: cannot load a tokenizer from {path!r}: "
                            f"{type(e).__name__}: {e}", param="model_path") from None


@router.post("/unload_model")
async def unload_model(request: Request):
    state = request.app.state.server
    body = await state.json_body(request)
    name = body.get("served_model_name") or body.get("model")
    if not isinstance(name, str) or name not in state.tokenizers:
        raise ApiError(404, f"model {name!r} is not served", param="served_model_name")
    force = body.get("force", False)
    timeout = body.get("timeout", UNLOAD_TIMEOUT_S)
    if not isinstance(force, bool):
        raise ApiError(400, "force: expected a boolean", param="force")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ApiError(400, "timeout: expected seconds > 0", param="timeout")
    saved = state.remove_model(name)
    try:
        result = await _control(state, "unload_model",
                                {"served_model_name": name, "force": force}, timeout)
    except ApiError as e:
        if e.status != 504:  # refused: nothing was done, the model serves on
            state.restore_model(name, saved)
        raise
    state.forget_model(name)
    return JSONResponse({"success": True, "message": f"model {name!r} unloaded", **result})


@router.post("/rebalance")
async def rebalance(request: Request):
    state = request.app.state.server
    body = await state.json_body(request)
    _refuse_several_workers(state)
    args = {"placement": body["placement"]} if body.get("placement") is not None else {}
    result = await _control(state, "rebalance", args, LOAD_TIMEOUT_S)
    moved = sum(m["moved_experts"] for m in result["models"].values())
    return JSONResponse({"success": True, "message": f"{moved} experts moved", **result})
