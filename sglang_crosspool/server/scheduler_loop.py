"""The scheduler loop: drives one `EngineCore`, fed by messages, answering with messages.

In: AddRequests, AbortRequest, ControlRequest (from a `Transport`).
Out: AddResults, BatchOutput (per-request deltas: new token ids, text, logprobs, finish reason,
plus the core's stats after the step), ControlResult.

    loop: idle -> block on the transport (waking once a second to check on the parent and
                  on the FFN servers, and to restart dead ones; every few ms while a model
                  loads or unloads)
          busy -> take every waiting message without blocking, then core.step()
          then -> finish the model loads and unloads that are ready (`core.live.poll()`),
                  answering their ControlRequests, which were left open until then

No request can stop the loop: the core isolates a request that fails in its step; an exception
that still escapes a step or a handler (a bug) ends the requests concerned with a 500 error,
and the loop serves on.

The loop never touches a socket itself: `Transport` is a ZeroMQ pair in the scheduler process
(`scheduler_process.py`) and a pair of in-memory queues in the in-process mode.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sglang_crosspool.engine.core import EngineCore, EngineUnavailable
from sglang_crosspool.engine.live_models import LOAD, REBALANCE, UNLOAD, ModelOpError
from sglang_crosspool.engine.request import EngineRequest, RequestState
from sglang_crosspool.engine.sampling_params import InvalidRequest, SamplingParams
from sglang_crosspool.server.messages import (
    AbortRequest,
    AddRequests,
    AddResults,
    BatchOutput,
    ControlRequest,
    ControlResult,
    RequestUpdate,
)

logger = logging.getLogger(__name__)
IDLE_WAKE_MS = 1000
LIVE_POLL_MS = 5  # the idle wait while a model loads or unloads
RECOVERY_RETRY_S = 10.0  # between two attempts to restart dead FFN servers


class Transport(Protocol):
    def recv(self, timeout_ms: int | None) -> object | None:
        """The next message, or None when none came within timeout_ms (0: do not wait)."""

    def send(self, msg) -> None: ...


@dataclass
class _Sent:
    """How much of a request's output has already gone out."""

    ids: int = 0
    text: int = 0
    in_lp: int = 0
    in_top: int = 0
    out_lp: int = 0
    out_top: int = 0


class SchedulerLoop:
    def __init__(self, core: EngineCore, transport: Transport):
        self.core = core
        self.transport = transport
        self.sent: dict[str, _Sent] = {}
        self.states: dict[str, RequestState] = {}  # requests not yet reported finished
        self._recover_at = 0.0  # no attempt to restart dead FFN servers before this time
        self._model_ops: dict[tuple[str, str], int] = {}  # (op, model) -> its ControlRequest
        self.handlers = {
            AddRequests: self._add,
            AbortRequest: self._abort,
            ControlRequest: self._control,
        }

    def warmup(self) -> None:
        """One token per model, so that the first real request does not pay torch's start-up."""
        for i, model in enumerate(self.core.config.model_names):
            rid = f"warmup-{i}"
            params = SamplingParams(max_new_tokens=1, temperature=0.0)
            self.core.add_request(EngineRequest(rid, model, [0, 1], params))
            while self.core.has_work():
                self.core.step()

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        while keep_going():
            self.run_once()

    def run_once(self) -> None:
        pending: list[BatchOutput] = []
        if not self.core.has_work():
            msg = self.transport.recv(LIVE_POLL_MS if self.core.live.busy else IDLE_WAKE_MS)
            if msg is None:
                self._finish_model_ops()
                self._check_health()
                return
            self._handle(msg, pending)
        while (msg := self.transport.recv(0)) is not None:
            self._handle(msg, pending)
        updates = [u for out in pending for u in out.updates]
        if self.core.has_work():
            updates += [self._update(s) for s in self._step()]
        if updates or pending:
            self.transport.send(BatchOutput(updates, self.core.stats()))
        self._finish_model_ops()

    def _finish_model_ops(self) -> None:
        """Answers the loads and unloads that finished since the last step."""
        if not self.core.live.busy:
            return
        try:
            done = self.core.live.poll()
        except Exception as e:  # a bug: keep serving the other models
            logger.exception("scheduler: finishing a model load or unload failed")
            done = [(op, name, {"error": f"internal error: {type(e).__name__}: {e}",
                                "status": 500}) for op, name in list(self._model_ops)]
            self.core.live.loading.clear()
            self.core.live.draining.clear()
        for op, name, result in done:
            cid = self._model_ops.pop((op, name), None)
            if cid is not None:
                self.transport.send(ControlResult(cid, result))
        if done:
            self.transport.send(BatchOutput([], self.core.stats()))

    def _step(self) -> list[RequestState]:
        try:
            return self.core.step()
        except Exception as e:  # a bug: fail what is in flight, serve on
            logger.exception("scheduler: the engine step failed; ending the requests in flight")
            return self.core.fail_all(f"the engine step failed: {type(e).__name__}: {e}")

    def _check_health(self, recover: bool = True) -> None:
        """Pushes the news when an FFN server died while the engine was idle; once that news is
        out, restarts what died (meanwhile the loop blocks: new requests wait)."""
        was = self.core.unavailable
        ended = self.core.check_health()
        if ended or self.core.unavailable != was:
            self.transport.send(BatchOutput([self._update(s) for s in ended], self.core.stats()))
            return
        if recover and self.core.unavailable and time.monotonic() >= self._recover_at:
            if self.core.recover():
                self.transport.send(BatchOutput([], self.core.stats()))
            else:
                self._recover_at = time.monotonic() + RECOVERY_RETRY_S

    # -- messages ------------------------------------------------------------------------------

    def _handle(self, msg, pending: list[BatchOutput]) -> None:
        handler = self.handlers.get(type(msg))
        if handler is None:
            logger.error("scheduler: ignoring a message of unknown type %s", type(msg).__name__)
            return
        try:
            out = handler(msg)
        except Exception as e:  # a bug: answer with an error, serve on
            logger.exception("scheduler: handling a %s failed", type(msg).__name__)
            error = f"internal error: {type(e).__name__}: {e}"
            if isinstance(msg, AddRequests):
                self.transport.send(AddResults([r.rid for r in msg.requests], error, 500))
            elif isinstance(msg, ControlRequest):
                self.transport.send(ControlResult(msg.cid, {"error": error}))
            return
        if out is not None:
            pending.append(out)

    def _add(self, msg: AddRequests) -> None:
        rids = [r.rid for r in msg.requests]
        reqs = [EngineRequest(r.rid, r.model, list(r.input_ids), r.params, r.return_logprob,
                              r.logprob_start_len, r.top_logprobs_num) for r in msg.requests]
        try:
            if len(set(rids)) != len(rids):
                raise InvalidRequest("rid: the request ids of one batch must differ")
            for req in reqs:  # all or nothing: no request is queued if one is bad
                self.core.validate(req)
            added = []
            try:
                for req in reqs:
                    added.append(self.core.add_request(req))
            except (InvalidRequest, EngineUnavailable):
                for state in added:
                    self.core.abort(state.req.rid, "the batch failed")
                raise
        except InvalidRequest as e:
            self.transport.send(AddResults(rids, str(e), getattr(e, "status", 400)))
            return
        except EngineUnavailable as e:
            self.transport.send(AddResults(rids, f"the engine cannot take requests: {e}", 503))
            return
        for state in added:
            self.states[state.req.rid] = state
            self.sent[state.req.rid] = _Sent()
        self.transport.send(AddResults(rids, None))

    def _abort(self, msg: AbortRequest) -> BatchOutput | None:
        rids = list(self.states) if msg.abort_all else [msg.rid]
        updates = []
        for rid in rids:
            state = self.core.abort(rid, msg.message)
            if state is not None:
                updates.append(self._update(state))
        return BatchOutput(updates)  # also when nothing was aborted: the stats go out

    def _control(self, msg: ControlRequest) -> BatchOutput | None:
        if msg.kind in (LOAD, UNLOAD, REBALANCE):
            return self._model_op(msg)
        if msg.kind == "health":
            self._check_health(recover=False)
            result = {"unavailable": self.core.unavailable}
        elif msg.kind == "stats":
            result = {**self.core.stats(), "pid": os.getpid(), "in_flight": len(self.states)}
        elif msg.kind == "flush_cache":
            # Every model's prefix cache; like SGLang, refused while requests are in flight.
            idle = self.core.flush_cache()
            result = {"success": idle, "message": "" if idle else
                      "there are running or waiting requests; the cache was not flushed"}
        else:
            result = {"error": f"unknown control request {msg.kind!r}"}
        self.transport.send(ControlResult(msg.cid, result))

    def _model_op(self, msg: ControlRequest) -> BatchOutput | None:
        """Starts a load or unload; it is answered once done (`_finish_model_ops`), or now
        if refused. An unload with `force` ends the model's requests here."""
        live = self.core.live
        ended = []
        try:
            if msg.kind == LOAD:
                name = live.begin_load(msg.args)
            elif msg.kind == REBALANCE:
                name = live.begin_rebalance(msg.args)
            else:
                name, ended = live.begin_unload(msg.args)
        except ModelOpError as e:
            self.transport.send(ControlResult(msg.cid, {"error": e.message,
                                                        "status": e.status}))
            return None
        if name is None:  # a rebalance with nothing to move
            self.transport.send(ControlResult(msg.cid, {"seconds": 0.0, "models": {},
                                                        "ffn_bytes_per_server":
                                                            self.core.ffn.server_bytes()}))
            return None
        self._model_ops[(msg.kind, name)] = msg.cid
        return BatchOutput([self._update(s) for s in ended])

    # -- outputs -------------------------------------------------------------------------------

    def _update(self, state: RequestState) -> RequestUpdate:
        rid = state.req.rid
        sent = self.sent.get(rid) or _Sent()
        ids = state.output_ids
        text = state.text
        # The core only appends to the text, or cuts it at a matched stop string, which never
        # lies past text already sent plus the new part: resend from the shorter of the two.
        offset = min(sent.text, len(text))
        update = RequestUpdate(
            rid, list(ids[sent.ids:]), offset, text[offset:], len(ids), state.finish_reason,
            state.sched.retractions,
            list(state.input_token_logprobs[sent.in_lp:]),
            list(state.input_top_logprobs[sent.in_top:]),
            list(state.output_token_logprobs[sent.out_lp:]),
            list(state.output_top_logprobs[sent.out_top:]), state.sched.cached_tokens)
        sent.ids, sent.text = len(ids), len(text)
        sent.in_lp, sent.in_top = len(state.input_token_logprobs), len(state.input_top_logprobs)
        sent.out_lp = len(state.output_token_logprobs)
        sent.out_top = len(state.output_top_logprobs)
        if state.finished:
            self.sent.pop(rid, None)
            self.states.pop(rid, None)
        return update
