"""The HTTP server: a FastAPI app over a `RequestManager`, served by uvicorn on uvloop.

In: HTTP requests (SGLang native API at / and /models/{name}/..., OpenAI API at /v1/...).
Out: JSON and SSE responses; errors as `{"error": {"message", "type", "param", "code"}}`.

`create_app` builds the app around any `EngineClient` (the in-process one in tests);
`run_server` spawns the scheduler process, waits until it is ready, then serves until it is
stopped or the scheduler dies - which stops the server with a clear log line and exit code 1.
SIGTERM and SIGINT stop it alike: no new connection or request is taken, requests in flight
get --shutdown-timeout seconds to finish and then end with an error, the scheduler process
and its FFN servers stop, temp folders go, and the exit code is 0.

The event loop only moves bytes: request bodies are parsed (when large) and prompts tokenized
in a worker thread, so one huge prompt never stalls /health or the streams of others. Bodies
over --max-request-bytes get 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from sglang_crosspool.server.metrics import ServerMetrics
from sglang_crosspool.server.model_admin import router as model_admin_router
from sglang_crosspool.server.native_api import NATIVE_ROUTES
from sglang_crosspool.server.openai_api import router as openai_router
from sglang_crosspool.server.request_manager import ApiError, RequestHandle, RequestManager

logger = logging.getLogger(__name__)
_OPEN_PATHS = ("/health", "/health_generate", "/metrics")  # no API key needed, as in SGLang
_INLINE_JSON_BYTES = 64 << 10  # smaller bodies are parsed on the event loop (a thread hop
#                                costs more than the parse)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # may start a lone surrogate


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class ServerState:
    """What every endpoint needs: config, tokenizers, the request manager, metrics."""

    def __init__(self, args, config, client):
        from sglang_crosspool.tokenizer import load_tokenizer

        self.args = args
        self.config = config
        self.created = int(time.time())
        self.metrics = ServerMetrics(config.model_names)
        self.manager = RequestManager(args, config, client, self.metrics)
        self.tokenizers = {m.name: load_tokenizer(m.path) for m in config.models}
        self.architectures = {m.name: _architectures(m.path) for m in config.models}
        self._token_texts: dict[str, dict[int, str]] = {m: {} for m in config.model_names}
        self.retired: dict = {}  # tokenizers of models being unloaded, for requests in flight
        # NOTE: one thread: a Hugging Face fast tokenizer must not encode in two threads at
        # once (transformers sets its truncation per call: "Already borrowed").
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    async def run_blocking(self, fn, *args):
        """fn(*args) in the tokenizer thread, off the event loop (tokenization, big parses)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- models --------------------------------------------------------------------------------

    def check_model(self, name: str) -> str:
        if name not in self.tokenizers:
            raise ApiError(404, f"model {name!r} is not served; served models: "
                                f"{', '.join(self.config.model_names)}", param="model")
        return name

    def resolve_model(self, request: Request, body_model) -> str:
        """The path's model (/models/{name}/...), else the body's, else the default one."""
        path_model = request.path_params.get("model_name")
        if path_model is not None:
            return self.check_model(path_model)
        if body_model is not None:
            if not isinstance(body_model, str):
                raise ApiError(400, "model: expected a string", param="model")
            return self.check_model(body_model)
        names = self.config.model_names
        if len(names) == 1:
            return names[0]
        if self.args.default_model:
            return self.args.default_model
        raise ApiError(400, f"model: this server serves several models ({', '.join(names)}); "
                            "name one with the `model` field, or use /models/{name}/...",
                       param="model")

    def add_model(self, entry, shares, tokenizer) -> None:
        """A model loaded while serving (`model_admin.py`): from now on requests reach it."""
        self.config = self.config.with_model(entry, shares)
        self.manager.config = self.config
        self.architectures[entry.name] = _architectures(entry.path)
        self._token_texts[entry.name] = {}
        self.tokenizers[entry.name] = tokenizer  # last: check_model looks here
        self.metrics.set_models(self.config.model_names)

    def remove_model(self, name: str) -> tuple:
        """Stops requests for a model at once (404); returns what `restore_model` needs. Its
        requests in flight keep their token texts (`retired`) until `forget_model`."""
        tokenizer = self.tokenizers.pop(name)
        self.retired[name] = tokenizer
        saved = (self.config, tokenizer, self.architectures.get(name))
        self.config = self.config.without_model(name)
        self.manager.config = self.config
        self.metrics.set_models(self.config.model_names)
        return saved

    def restore_model(self, name: str, saved: tuple) -> None:
        """Undoes `remove_model` (the scheduler refused the unload)."""
        self.config, tokenizer, self.architectures[name] = saved
        self.manager.config = self.config
        self.retired.pop(name, None)
        self.tokenizers[name] = tokenizer
        self.metrics.set_models(self.config.model_names)

    def forget_model(self, name: str) -> None:
        """The model's last request is done and the scheduler freed it."""
        self.retired.pop(name, None)
        self._token_texts.pop(name, None)

    def token_text(self, model: str, token_id: int) -> str:
        cache = self._token_texts[model]
        text = cache.get(token_id)
        if text is None:
            tokenizer = self.tokenizers.get(model) or self.retired[model]  # a model draining
            text = cache[token_id] = tokenizer.decode([token_id])
        return text

    # -- requests ------------------------------------------------------------------------------

    async def json_body(self, request: Request) -> dict:
        limit = self.args.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(size, limit)
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        raw = b"".join(chunks)
        if not raw:
            return {}
        if len(raw) <= _INLINE_JSON_BYTES:
            return parse_json_body(raw)
        return await self.run_blocking(parse_json_body, raw)

    async def wait_all(self, handles: list[RequestHandle], request: Request | None) -> None:
        """Waits until every handle finished; aborts them if the client disconnects first."""
        # NOTE: waits on the handles' futures without wrapping them (a cancelled gather would
        # log "exception was never retrieved" on every disconnect).
        pending = {h.done for h in handles if h.done is not None and not h.done.done()}
        if request is None:
            if pending:
                await asyncio.wait(pending)
            return
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while pending and not watcher.done():
                finished, _ = await asyncio.wait(pending | {watcher},
                                                 return_when=asyncio.FIRST_COMPLETED)
                pending -= finished
        finally:
            watcher.cancel()
        if pending:
            for h in handles:
                if not h.finished:
                    self.manager.abort(h.rid, "the client disconnected")
            raise ClientGone()


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body has {size} bytes or more, over the limit of {limit} "
                         "(--max-request-bytes)", type="invalid_request_error")


def parse_json_body(raw: bytes) -> dict:
    """A request body -> its JSON object; 400 for anything else, including JSON that nests too
    deep for the parser and strings with lone surrogates (no tokenizer can encode them)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: it nests too deep") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        _check_strings(body)
    return body


def _check_strings(value) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"the body holds a string with a lone surrogate "
                                    f"(an unpaired \\u{ord(v[_surrogate_at(v)]):04x} escape); "
                                    "text must be valid Unicode") from None


def _surrogate_at(text: str) -> int:
    return next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _architectures(path: str):
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("architectures")
    except (OSError, json.JSONDecodeError):
        return None


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every path but health checks and metrics (pure ASGI, so
    streams and disconnects pass through untouched)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].endswith(_OPEN_PATHS):
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization") != self.expected:
                response = error_response(ApiError(
                    401, "missing or wrong API key: send `Authorization: Bearer <key>`"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(args, config, client) -> FastAPI:
    state = ServerState(args, config, client)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.manager.start()
        yield

    app = FastAPI(title="sglang-crosspool", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, e: ClientGone):
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(request: Request, e: ClientDisconnect):
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception):
        logger.exception("error while serving %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    for path, methods, handler in NATIVE_ROUTES:
        app.add_api_route(path, handler, methods=methods)
        app.add_api_route("/models/{model_name}" + path, handler, methods=methods)
    app.include_router(openai_router)
    app.include_router(model_admin_router)
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    return app


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: unwind, so that every cleanup runs


def run_server(args) -> int:
    """Serves until SIGINT/SIGTERM (exit 0) or until the scheduler dies (exit 1)."""
    import uvicorn

    from sglang_crosspool.server.worker_router import make_engine_client

    class Server(uvicorn.Server):
        """uvicorn's server, whose shutdown first stops taking connections and lets requests
        in flight finish (bounded by --shutdown-timeout)."""

        async def shutdown(self, sockets=None) -> None:
            for listener in self.servers:
                listener.close()
            await app.state.server.manager.drain(args.shutdown_timeout,
                                                  give_up=lambda: self.force_exit)
            await super().shutdown(sockets)

    if threading.current_thread() is threading.main_thread():
        # uvicorn takes SIGTERM and SIGINT while it serves, and raises them again once stopped.
        signal.signal(signal.SIGTERM, _interrupt)
    config = args.engine_config()
    logger.info("starting the scheduler process for %s", ", ".join(config.model_names))
    client = make_engine_client(args, config)
    exit_code = 0
    try:
        app = create_app(args, config, client)  # loads tokenizers while the models load
        client.wait_ready()
        server = Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, loop="uvloop",
            timeout_keep_alive=5, access_log=args.log_level == "debug",
            timeout_graceful_shutdown=2))  # responses ended by drain() have this to go out

        def on_dead(message: str) -> None:
            nonlocal exit_code
            exit_code = 1
            server.should_exit = True

        app.state.server.manager.on_dead_callbacks.append(on_dead)
        logger.info("serving %s at %s", ", ".join(config.model_names), args.url)
        server.run()
    finally:
        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C or SIGTERM must not cut the cleanup.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        client.close()
    if exit_code:
        logger.critical("the server stopped because the scheduler process died")
    return exit_code
