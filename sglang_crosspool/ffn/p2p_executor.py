"""The attention worker's FFN executor on the `p2p` crossing (transport/p2p.py).

The engine announces each step once (`begin_step(plan)`: per micro-batch, model and tokens),
every FFN server is told once over ZeroMQ, and then each layer's `submit` / `wait` are device
work only: peer stores and flags, no host synchronisation and no message. `end_step` reads the
error word once. The same calls run inside a captured decode graph (`supports_graphs`), with
`capture(plan)` around the capture so the servers capture the matching step.

A protocol check runs on the host for every crossing: the step's crossings must come in the
order `crossing_order` gives (the servers follow it blindly), for the planned model and size.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque

from sglang_crosspool.ffn.executor import FFNExecutor
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.errors import FFNServerError
from sglang_crosspool.transport.p2p import crossing_order


class P2PProtocolError(RuntimeError):
    """The engine's crossings strayed from the announced step plan (a bug, not a fault)."""


class P2PFFNExecutor(FFNExecutor):
    supports_graphs = True
    WATCH_S = 0.05

    def __init__(self, pool, layers: dict[str, int]):
        self.pool = pool
        self.links = pool.links
        self.end = pool.end
        self.layers = layers  # model -> layer count
        self.broken: str | None = None
        self.plan: tuple = ()
        self._order: deque = deque()
        self._in_step = False  # between begin_step and end_step
        self.steps = 0
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, name="p2p-watchdog", daemon=True)
        self._watch.start()

    # -- the step ------------------------------------------------------------------------------

    def begin_step(self, plan, graph: bool = False) -> None:
        if self.broken:
            raise FFNServerError(self.broken)
        if self._in_step:
            # NOTE: a step that stopped midway (an exception between begin and end) left the
            # servers waiting for crossings that never came; the next step's data would be
            # taken for them. Only a fresh link is safe.
            self._break(f"a step over the crossing stopped midway ({self.plan}); the FFN "
                        f"servers are out of step with this worker")
        self._in_step = True
        self.plan = tuple((model, int(tokens)) for model, tokens in plan)
        # A replay makes its crossings on the device: the host checks the eager ones only.
        self._order = deque() if graph else deque(
            crossing_order(tuple(self.layers[model] for model, _ in self.plan)))
        try:
            for link in self.links:
                link.step(m.Step(self.plan, graph))
        except FFNServerError as e:
            self._break(str(e))

    def submit(self, model, layer, hidden, routing):
        if not self._order:
            raise P2PProtocolError(f"crossing {model}:{layer} outside the step plan {self.plan}")
        mb, planned_layer = self._order.popleft()
        planned_model, tokens = self.plan[mb]
        if (planned_model, planned_layer, tokens) != (model, layer, hidden.shape[0]):
            raise P2PProtocolError(
                f"crossing {model}:{layer} of {hidden.shape[0]} tokens, but the plan's next is "
                f"{planned_model}:{planned_layer} of {tokens} tokens (micro-batch {mb})")
        self.end.send(mb, hidden, routing.topk_ids, routing.topk_weights)
        return mb, hidden.shape[0], hidden.shape[1]

    def wait(self, handle):
        mb, rows, hidden = handle
        return self.end.wait_sum(mb, None, rows, hidden)

    def wait_residual(self, handle, x):
        mb, rows, hidden = handle
        return self.end.wait_sum(mb, x, rows, hidden)

    def end_step(self) -> None:
        """Once per step, after its outputs were used: fails the step if any side failed."""
        left = len(self._order)
        self._order.clear()
        self._in_step = False
        self.steps += 1
        code = self.end.error()  # the step's one extra host read
        reports = [(i, msg) for i, link in enumerate(self.links) for msg in link.failures()]
        if code or reports:
            self._break(self._describe(code, reports))
        if left:
            raise P2PProtocolError(f"{left} crossings of the step plan {self.plan} never ran")

    @contextlib.contextmanager
    def capture(self, plan):
        """Around a graph capture of `plan` on this side: every server captures it too."""
        plan = tuple((model, int(tokens)) for model, tokens in plan)
        for link in self.links:
            link.step(m.Capture(plan))
        self.plan = plan
        self._order = deque(crossing_order(tuple(self.layers[model] for model, _ in plan)))
        try:
            yield
        finally:  # every server answers once, also when this side's capture failed
            self._order.clear()
            replies = [link.await_reply(self.pool.spec.start_timeout_s) for link in self.links]
        for i, reply in enumerate(replies):
            if isinstance(reply, m.Failed):
                self._break(f"FFN server {i} could not capture {plan}: {reply.message}")

    # -- faults ----------------------------------------------------------------------------------

    def _describe(self, code: int, reports) -> str:
        from crosspool_kernels.crossing import ERR_FAILED, ERR_PEER_BASE, ERR_STALLED

        parts = []
        if code >= ERR_STALLED:
            parts.append(f"FFN server {code - ERR_STALLED} waited {self.end.layout.timeout_s} s "
                         f"for this worker's inputs (a stalled step); its outputs were dropped")
        elif ERR_PEER_BASE <= code < ERR_FAILED:
            j = code - ERR_PEER_BASE
            death = self.links[j].alive()
            parts.append(f"FFN server {j} " + (death or f"sent no output within "
                                                        f"{self.end.layout.timeout_s} s"))
        elif ERR_FAILED <= code < ERR_STALLED:
            parts.append(f"FFN server {code - ERR_FAILED} failed")
        elif code:
            parts.append(f"crossing error {code}")
        parts += [f"FFN server {i}: {msg}" for i, msg in reports]
        return "; ".join(parts)

    def _break(self, message: str):
        """The link is unusable from now on: stop every live server's device waits too."""
        from crosspool_kernels.crossing import ERR_FAILED

        if self.broken is None:
            for j, link in enumerate(self.links):
                if link.alive() is None:
                    try:
                        self.end.set_error(ERR_FAILED + j, j + 1)
                    except Exception:  # noqa: BLE001 - best effort on a failing link
                        pass
        self.broken = message
        raise FFNServerError(message)

    def _watchdog(self) -> None:
        """A server process that dies mid-step: stop this side's device waits at once."""
        from crosspool_kernels.crossing import ERR_PEER_BASE

        while not self._stop.wait(self.WATCH_S):
            for j, link in enumerate(self.links):
                if link.alive():
                    try:
                        self.end.set_error(ERR_PEER_BASE + j)
                    except Exception:  # noqa: BLE001 - closing underneath us
                        pass
                    return

    def live_models_refused(self) -> str | None:
        return ("the p2p crossing's FFN server loop (one Step message per step) has no load "
                "path yet, and its arena and step plans are sized for the start-up models")

    def failure(self) -> str | None:
        return self.broken or self.pool.failure()

    def server_bytes(self) -> list[int]:
        return [r.ffn_bytes for r in self.pool.ready]

    def close(self) -> None:
        self._stop.set()
        self._watch.join(timeout=1)
        self.pool.close()
