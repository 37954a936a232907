"""The HTTP server: a FastAPI app over a `RequestManager`, served by uvicorn on uvloop.

In: HTTP requests (SGLang native API at / and /models/{name}/..., OpenAI API at /v1/...).
Out: JSON and SSE responses; errors as `{"error": {"message", "type", "param", "code"}}`.

`create_app` builds the app around any `EngineClient` (the in-process one in tests);
`run_server` spawns the scheduler process, waits until it is ready, then serves until it is
stopped or the scheduler dies - which stops the server with a clear log line and exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sglang_crosspool.server.metrics import ServerMetrics
from sglang_crosspool.server.native_api import NATIVE_ROUTES
from sglang_crosspool.server.openai_api import router as openai_router
from sglang_crosspool.server.request_manager import ApiError, RequestHandle, RequestManager

logger = logging.getLogger(__name__)
_OPEN_PATHS = ("/health", "/health_generate", "/metrics")  # no API key needed, as in SGLang


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

    def token_text(self, model: str, token_id: int) -> str:
        cache = self._token_texts[model]
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self.tokenizers[model].decode([token_id])
        return text

    # -- requests ------------------------------------------------------------------------------

    async def json_body(self, request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    async def wait_all(self, handles: list[RequestHandle], request: Request | None) -> None:
        """Waits until every handle finished; aborts them if the client disconnects first."""
        done = asyncio.ensure_future(asyncio.gather(*(h.done for h in handles)))
        if request is None:
            await done
            return
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({done, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not done.done():
            done.cancel()
            for h in handles:
                if not h.finished:
                    self.manager.abort(h.rid, "the client disconnected")
            raise ClientGone()


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

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception):
        logger.exception("error while serving %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    for path, methods, handler in NATIVE_ROUTES:
        app.add_api_route(path, handler, methods=methods)
        app.add_api_route("/models/{model_name}" + path, handler, methods=methods)
    app.include_router(openai_router)
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    return app


def run_server(args) -> int:
    """Serves until SIGINT/SIGTERM (exit 0) or until the scheduler dies (exit 1)."""
    import uvicorn

    from sglang_crosspool.server.engine_client import MultiprocessEngineClient

    config = args.engine_config()
    logger.info("starting the scheduler process for %s", ", ".join(config.model_names))
    client = MultiprocessEngineClient(args, config)
    exit_code = 0
    try:
        app = create_app(args, config, client)  # loads tokenizers while the models load
        client.wait_ready()
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, loop="uvloop",
            timeout_keep_alive=5, access_log=args.log_level == "debug"))

        def on_dead(message: str) -> None:
            nonlocal exit_code
            exit_code = 1
            server.should_exit = True

        app.state.server.manager.on_dead_callbacks.append(on_dead)
        logger.info("serving %s at %s", ", ".join(config.model_names), args.url)
        server.run()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        client.close()
    if exit_code:
        logger.critical("the server stopped because the scheduler process died")
    return exit_code
