"""The FFN server's loop on the `p2p` crossing (transport/p2p.py): one message per step.

In: `Step(plan)` and `Capture(plan)` messages over ZeroMQ; per crossing, hidden states and
routing in this server's input slots, with their flags. Out: partial FFN outputs stored into
the attention worker's output slots, with their flags; `Captured` / `Failed` replies.

A step runs every crossing of the plan in `crossing_order`: wait for the slot's inputs, run
the layer's FFN over this server's experts, send the output. On CUDA a plan captured with
`Capture` is one graph replay, and the host returns to the socket at once; the device waits
for the attention worker's flags by itself. A failing forward is reported twice: into the
attention worker's error word (its device waits stop) and as a `Failed` message.
"""

from __future__ import annotations

import logging
import os

import torch
import zmq

from sglang_crosspool.models.common import Routing
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.p2p import FFNEnd, crossing_order

log = logging.getLogger("sglang_crosspool.ffn_server")


def model_shape(half) -> tuple[int, int, int, list[bool]]:
    """(hidden, layers, top_k, moe per layer) of an FFN half (or an echo stand-in)."""
    spec = half.spec
    return spec.hidden_size, spec.num_layers, spec.top_k, list(spec.moe_layers)


class StepRunner:
    def __init__(self, end: FFNEnd, halves: dict):
        self.end = end
        self.halves = halves
        self.shapes = {name: model_shape(h) for name, h in halves.items()}
        self.graphs: dict[tuple, object] = {}
        self.cuda = end.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None

    def run(self, plan: tuple) -> None:
        """Every crossing of the plan, eagerly (prefill, uncaptured sizes, warm-up, CPU)."""
        layers = tuple(self.shapes[model][1] for model, _ in plan)
        for mb, layer in crossing_order(layers):
            model, tokens = plan[mb]
            hidden, _, top_k, moe = self.shapes[model]
            h, ids, w = self.end.wait(mb, tokens, hidden, top_k if moe[layer] else 0)
            out = self.halves[model].forward(layer, h, Routing(ids, w))
            self.end.send(mb, out)

    def replay(self, plan: tuple) -> None:
        graph = self.graphs.get(plan)
        if graph is None:
            raise RuntimeError(f"no graph captured for step plan {plan}")
        graph.replay()

    def capture(self, plan: tuple) -> int:
        """Captures the plan's step (nothing runs); returns the graph memory it took."""
        if not self.cuda:
            raise RuntimeError("CUDA graphs need a CUDA device")
        before = torch.cuda.memory_reserved(self.end.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.run(plan)
        self.graphs[plan] = graph
        return torch.cuda.memory_reserved(self.end.device) - before


def next_message(sock, parent: int):
    """The next control message; None on Shutdown or once the parent process (the attention
    worker) is gone, when there is nothing left to serve."""
    while not sock.poll(1000):
        if os.getppid() != parent:
            log.error("parent process %d is gone; exiting", parent)
            return None
    msg = m.decode(sock.recv())
    return None if isinstance(msg, m.Shutdown) else msg


def serve_steps(sock, end: FFNEnd, halves: dict, server_id: int) -> None:
    """The loop: until Shutdown, or until the attention worker (the parent) is gone."""
    from crosspool_kernels.crossing import ERR_FAILED

    runner = StepRunner(end, halves)
    parent = os.getppid()
    broken = False
    with torch.inference_mode():
        while (msg := next_message(sock, parent)) is not None:
            if broken:  # the link's counters are out of step: refuse, do not touch buffers
                sock.send(m.encode(m.Failed(-1, "this FFN server failed earlier")))
                continue
            try:
                if isinstance(msg, m.Capture):
                    grown = runner.capture(tuple(msg.plan))
                    sock.send(m.encode(m.Captured(server_id, grown)))
                elif msg.graph:
                    runner.replay(tuple(msg.plan))
                else:
                    runner.run(tuple(msg.plan))
            except Exception as e:  # noqa: BLE001 - report, never leave the peer spinning
                log.exception("FFN step failed")
                broken = True
                end.fail(ERR_FAILED + server_id)
                try:
                    sock.send(m.encode(m.Failed(-1, f"{type(e).__name__}: {e}")), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
