"""Both ends of one attention-worker <-> FFN-server link, for each data path.

The attention side (`ShmLink`, `DistLink`) submits a layer's inputs into a slot and waits for
that slot's output; the FFN-server side (`ShmEndpoint`, `DistEndpoint`) reads inputs and writes
outputs. Control and completion always travel as small ZeroMQ messages; only the data path
differs. While waiting, the attention side checks that the server process is alive, so a dead
server is an error within a fraction of a second, never a hang.
"""

from __future__ import annotations

import zmq

from sglang_crosspool.models.common import Routing
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.errors import FFNServerError
from sglang_crosspool.transport.shm import ShmBuffers, ShmLayout

__all__ = ["DistEndpoint", "DistLink", "FFNServerError", "ShmEndpoint", "ShmLink"]


class _LinkBase:
    POLL_MS = 100

    def __init__(self, sock: zmq.Socket, server_id: int, alive):
        self.sock = sock
        self.server_id = server_id
        self.alive = alive  # callable -> None if alive, else a description of the death
        self._done: set[int] = set()
        self._pending: dict[int, int] = {}  # slot -> num tokens

    def _control(self, msg) -> None:
        # NOTE: a PAIR socket blocks a send while its peer is gone; poll so a dead server is
        # an error, not a hang.
        while not self.sock.poll(self.POLL_MS, zmq.POLLOUT):
            self._check_alive()
        self.sock.send(m.encode(msg), zmq.NOBLOCK)

    def _check_alive(self) -> None:
        death = self.alive()
        if death:
            raise FFNServerError(f"FFN server {self.server_id} {death}")

    def _await_done(self, slot: int) -> None:
        while slot not in self._done:
            if self.sock.poll(self.POLL_MS):
                msg = m.decode(self.sock.recv())
                if isinstance(msg, m.Failed):
                    raise FFNServerError(f"FFN server {self.server_id} failed: {msg.message}")
                self._done.add(msg.slot)
                continue
            self._check_alive()
        self._done.discard(slot)


class ShmLink(_LinkBase):
    def __init__(self, sock, server_id, alive, layout: ShmLayout):
        super().__init__(sock, server_id, alive)
        self.buffers = ShmBuffers(layout, create=True)

    def submit(self, slot: int, model: str, layer: int, hidden, routing: Routing) -> None:
        self.buffers.write_input(slot, hidden, routing)
        k = 0 if routing.topk_ids is None else routing.topk_ids.shape[1]
        self._pending[slot] = hidden.shape[0]
        self._control(m.Forward(slot, model, layer, hidden.shape[0], k))

    def wait(self, slot: int):
        self._await_done(slot)
        return self.buffers.slots[slot]["out"][: self._pending.pop(slot)]

    def close(self) -> None:
        self.buffers.close()


class ShmEndpoint:
    def __init__(self, layout: ShmLayout):
        self.buffers = ShmBuffers(layout, create=False)

    def read(self, msg: m.Forward):
        return self.buffers.read_input(msg.slot, msg.num_tokens, msg.top_k)

    def write(self, msg: m.Forward, out) -> None:
        self.buffers.slots[msg.slot]["out"][: msg.num_tokens].copy_(out)

    def close(self) -> None:
        self.buffers.close()


class DistLink(_LinkBase):
    """torch.distributed data path: rank 0 is the attention worker, rank s+1 FFN server s.

    NOTE: the output's irecv is posted at submit time. With two slots in flight, a server
    may finish one slot's output while the attention worker is still sending the other's
    inputs; a pre-posted receive lets its send complete instead of deadlocking both sides.
    """

    def __init__(self, sock, server_id, alive, hidden_dtype):
        super().__init__(sock, server_id, alive)
        self.rank = server_id + 1
        self.dtype = hidden_dtype
        self._works: dict[int, tuple] = {}  # slot -> (tensors kept alive, works, output)

    def submit(self, slot, model, layer, hidden, routing: Routing) -> None:
        import torch
        import torch.distributed as dist

        k = 0 if routing.topk_ids is None else routing.topk_ids.shape[1]
        self._control(m.Forward(slot, model, layer, hidden.shape[0], k))
        tensors = [hidden.contiguous()]
        if k:
            tensors += [routing.topk_ids.contiguous(), routing.topk_weights.float().contiguous()]
        works = [dist.isend(t, self.rank) for t in tensors]
        out = torch.empty(hidden.shape, dtype=self.dtype)
        works.append(dist.irecv(out, self.rank))
        self._works[slot] = (tensors, works, out)

    def wait(self, slot):
        self._await_done(slot)
        _, works, out = self._works.pop(slot)
        for work in works:
            work.wait()
        return out

    def close(self) -> None:
        pass


class DistEndpoint:
    def __init__(self, hidden_sizes: dict[str, int], dtype):
        self.hidden_sizes = hidden_sizes
        self.dtype = dtype

    def read(self, msg: m.Forward):
        import torch
        import torch.distributed as dist

        hidden = torch.empty(msg.num_tokens, self.hidden_sizes[msg.model], dtype=self.dtype)
        dist.recv(hidden, 0)
        if msg.top_k == 0:
            return hidden, Routing(None, None)
        ids = torch.empty(msg.num_tokens, msg.top_k, dtype=torch.int64)
        weights = torch.empty(msg.num_tokens, msg.top_k, dtype=torch.float32)
        dist.recv(ids, 0)
        dist.recv(weights, 0)
        return hidden, Routing(ids, weights)

    def write(self, msg: m.Forward, out) -> None:
        self._out = out.contiguous()  # sent after the Done message, see FFN server loop

    def send_output(self) -> None:
        import torch.distributed as dist

        dist.send(self._out, 0)
        self._out = None

    def close(self) -> None:
        pass
