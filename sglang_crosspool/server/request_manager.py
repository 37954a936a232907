"""The HTTP process's view of requests in flight (SGLang calls this the tokenizer manager).

In: tokenized requests from the API layers (`submit`), aborts, control questions; messages from
the scheduler (`on_message`). Out: `RequestHandle`s whose text, token ids and logprobs grow as
`RequestUpdate`s arrive; each handle signals its `event` on every change, so a stream can send a
chunk per change; metrics.

Admission happens here: past `max_running_requests + max_queued_requests` requests in flight,
new ones get 503. The scheduler's answer to each `AddRequests` (queued, or the reason it was
refused) is awaited before a request counts as accepted, so a bad request is a 400 even when
only the engine can tell (prompt over the context length, KV that could never fit).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from sglang_crosspool.server.messages import (
    AbortRequest,
    AddRequests,
    AddResults,
    BatchOutput,
    ControlRequest,
    ControlResult,
    RequestUpdate,
    TokenizedRequest,
)
from sglang_crosspool.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error response: HTTP status, message (naming the field at fault), error type."""

    def __init__(self, status: int, message: str, type: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.headers = headers or {}


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                503: "service_unavailable", 500: "server_error", 501: "not_implemented",
                504: "timeout", 507: "insufficient_storage"}


@dataclass
class RequestHandle:
    req: TokenizedRequest
    event: asyncio.Event  # set on changes (see stream_interval); shared by one call's requests
    return_text_in_logprobs: bool = False
    log_metrics: bool = True  # False for health checks
    stream_interval: int = 1  # signal `event` per this many new tokens (first and last at once)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict | None = None
    retractions: int = 0
    cached_tokens: int = 0
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    done: asyncio.Future | None = None
    signalled_tokens: int = 0  # output tokens when `event` was last set

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.req.input_ids)

    def apply(self, u: RequestUpdate) -> int:
        """Takes one update; returns how many new tokens it brought."""
        self.text = self.text[: u.text_offset] + u.text_delta
        self.output_ids.extend(u.new_ids)
        self.retractions = u.retractions
        self.cached_tokens = u.cached_tokens
        self.input_token_logprobs.extend(u.input_token_logprobs)
        self.input_top_logprobs.extend(u.input_top_logprobs)
        self.output_token_logprobs.extend(u.output_token_logprobs)
        self.output_top_logprobs.extend(u.output_top_logprobs)
        if u.finish_reason is not None:
            self.finish_reason = u.finish_reason
            self.finished_time = time.monotonic()
        unsignalled = len(self.output_ids) - self.signalled_tokens
        if (self.stream_interval == 1 or self.finished or unsignalled >= self.stream_interval
                or (self.signalled_tokens == 0 and unsignalled)):
            self.signalled_tokens = len(self.output_ids)
            self.event.set()
        return len(u.new_ids)

    def visible_text(self) -> str:
        """The text safe to show mid-stream: a tail that may yet become a stop string is held."""
        if self.finished or not self.req.params.stop:
            return self.text
        hold = 0
        for stop in self.req.params.stop:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold] if hold else self.text


class RequestManager:
    def __init__(self, server_args, engine_config, client, metrics: ServerMetrics):
        self.args = server_args
        self.config = engine_config
        self.client = client
        self.metrics = metrics
        self.handles: dict[str, RequestHandle] = {}
        self.stats: dict = {}
        self.dead: str | None = None  # why the scheduler is gone
        self.closing = False  # shutting down: new requests get 503, those in flight may finish
        self._pending_adds: dict[str, asyncio.Future] = {}
        self._controls: dict[int, asyncio.Future] = {}
        self._cids = itertools.count()
        self.on_dead_callbacks: list = []
        limit = server_args.max_queued_requests
        self.max_in_flight = None if limit is None else server_args.max_running_requests + limit

    def start(self) -> None:
        """Called on the event loop once the scheduler is ready."""
        self.stats = self.client.ready.stats
        self.metrics.set_stats(self.stats)
        self.client.start(asyncio.get_running_loop(), self.on_message, self.on_dead)

    # -- requests ------------------------------------------------------------------------------

    async def submit(self, reqs: list[TokenizedRequest], event: asyncio.Event | None = None,
                     return_text_in_logprobs: bool = False,
                     log_metrics: bool = True) -> list[RequestHandle]:
        """Queues requests (all or none); raises ApiError when they are refused."""
        model = reqs[0].model if reqs else ""
        if self.dead is not None:
            raise ApiError(503, f"the server is shutting down: {self.dead.splitlines()[0]}")
        if self.closing:
            raise ApiError(503, "the server is shutting down")
        if self.max_in_flight is not None and len(self.handles) + len(reqs) > self.max_in_flight:
            self.metrics.rejected(model, 503)
            raise ApiError(
                503, f"the server is saturated: {len(self.handles)} requests in flight, the "
                     f"limit is {self.max_in_flight} (--max-running-requests + "
                     f"--max-queued-requests); retry later", headers={"Retry-After": "1"})
        for r in reqs:
            if r.rid in self.handles:
                self.metrics.rejected(model, 400)
                raise ApiError(400, f"rid: request id {r.rid!r} is already in use", param="rid")
        event = event or asyncio.Event()
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(r, event, return_text_in_logprobs, log_metrics,
                                 self.args.stream_interval, done=loop.create_future())
                   for r in reqs]
        for h in handles:
            self.handles[h.rid] = h
        answer = loop.create_future()
        self._pending_adds[reqs[0].rid] = answer
        self.client.send(AddRequests(list(reqs)))
        try:
            error = await answer
        except BaseException:
            # Cancelled while waiting (client gone): make sure nothing keeps running.
            for h in handles:
                self.abort(h.rid, "the client disconnected")
            raise
        if error is not None:  # on_message has dropped the handles
            status, message = error
            self.metrics.rejected(model, status)
            raise ApiError(status, message,
                           headers={"Retry-After": "5"} if status == 503 else None)
        return handles

    def abort(self, rid: str, message: str = "aborted") -> None:
        if rid in self.handles and self.dead is None:
            self.client.send(AbortRequest(rid, message))

    def abort_all(self, message: str = "aborted") -> None:
        if self.dead is None:
            self.client.send(AbortRequest(None, message, abort_all=True))

    async def control(self, kind: str, timeout: float = 30.0, args: dict | None = None) -> dict:
        if self.dead is not None:
            raise ApiError(503, f"the scheduler is gone: {self.dead.splitlines()[0]}")
        cid = next(self._cids)
        fut = asyncio.get_running_loop().create_future()
        self._controls[cid] = fut
        self.client.send(ControlRequest(cid, kind, dict(args or {})))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._controls.pop(cid, None)

    # -- messages from the scheduler -----------------------------------------------------------

    def on_message(self, msg) -> None:
        if isinstance(msg, BatchOutput):
            now = time.monotonic()
            for u in msg.updates:
                self._on_update(u, now)
            if msg.stats is not None:
                self.stats = msg.stats
                self.metrics.set_stats(msg.stats)
        elif isinstance(msg, AddResults):
            fut = self._pending_adds.pop(msg.rids[0], None) if msg.rids else None
            if msg.error is not None:
                for rid in msg.rids:
                    self.handles.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(None if msg.error is None else (msg.status, msg.error))
        elif isinstance(msg, ControlResult):
            fut = self._controls.get(msg.cid)
            if fut is not None and not fut.done():
                fut.set_result(msg.result)
        else:
            logger.warning("ignoring a %s from the scheduler", type(msg).__name__)

    def _on_update(self, u: RequestUpdate, now: float) -> None:
        h = self.handles.get(u.rid)
        if h is None:
            return
        model = h.req.model
        new = h.apply(u)
        if new and h.log_metrics:
            if h.first_token_time is None:
                h.first_token_time = now
                self.metrics.first_token(model, now - h.created)
                if new > 1:
                    self.metrics.tokens(model, new - 1, 0.0)
            else:
                self.metrics.tokens(model, new, now - (h.last_token_time or now))
            h.last_token_time = now
        if new and h.first_token_time is None:
            h.first_token_time = now
        if h.finished:
            self.handles.pop(h.rid, None)
            decode = (now - h.first_token_time) if h.first_token_time is not None else None
            if h.log_metrics:
                self.metrics.finished(model, h.prompt_tokens, len(h.output_ids),
                                      now - h.created, decode,
                                      h.finish_reason.get("type") == "abort")
                self.metrics.cached(model, h.cached_tokens)
            if h.done is not None and not h.done.done():
                h.done.set_result(None)

    async def drain(self, timeout: float, give_up=lambda: False) -> None:
        """Shutting down: refuses new requests, lets those in flight finish within `timeout`
        seconds, then ends the rest with an error."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while self.handles and time.monotonic() < deadline and not give_up():
            await asyncio.sleep(0.05)
        if self.handles:
            logger.warning("shutting down: ending %d requests still in flight", len(self.handles))
            self.abort_all("the server is shutting down")
            self.end_all("the server shut down before the request finished", 503)

    def end_all(self, message: str, status: int) -> None:
        """Ends every request in flight here, with an error, whatever the scheduler does."""
        for fut in list(self._pending_adds.values()) + list(self._controls.values()):
            if not fut.done():
                fut.set_exception(ApiError(status, message))
        for h in list(self.handles.values()):
            h.finish_reason = {"type": "abort", "message": message, "status_code": status}
            h.finished_time = time.monotonic()
            h.event.set()
            if h.done is not None and not h.done.done():
                h.done.set_result(None)
        self.handles.clear()

    def on_dead(self, message: str) -> None:
        """The scheduler is gone: fail everything in flight, then let the server go down."""
        if self.dead is not None:
            return
        self.dead = message
        logger.critical("%s", message)
        logger.critical("shutting the server down: the scheduler process is gone")
        self.end_all("the scheduler process is gone", 503)
        for cb in self.on_dead_callbacks:
            cb(message)
