"""Both ends of one attention-worker <-> FFN-server link, for each data path.

The attention side (`ShmLink`, `DistLink`, `CudaIpcLink`) submits a layer's inputs into a slot
and waits for that slot's output; the FFN-server side (`ShmEndpoint`, `DistEndpoint`,
`CudaIpcEndpoint`) reads inputs and writes outputs. Control and completion always travel as
small ZeroMQ messages; only the data path differs. While waiting, the attention side checks
that the server process is alive, so a dead server is an error within a fraction of a second,
never a hang.

A slot is reused only after its `wait`, and the output `wait` returns may be a view of the
link's buffer: it stays valid until the next `submit` to the same slot (the executor consumes
it before that).
"""

from __future__ import annotations

import torch
import zmq

from sglang_crosspool.models.common import Routing
from sglang_crosspool.transport import cuda_ipc
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.errors import FFNServerError
from sglang_crosspool.transport.shm import ShmBuffers, ShmLayout

__all__ = ["CudaIpcEndpoint", "CudaIpcLink", "DistEndpoint", "DistLink", "FFNServerError",
           "P2PLink", "ShmEndpoint", "ShmLink"]


class _LinkBase:
    POLL_MS = 100

    def __init__(self, sock: zmq.Socket, server_id: int, alive):
        self.sock = sock
        self.server_id = server_id
        self.alive = alive  # callable -> None if alive, else a description of the death
        self._done: set[int] = set()
        self._pending: dict[int, tuple] = {}  # slot -> shape of the submitted hidden states
        self.replies: list = []  # answers to model loads and unloads, kept until taken

    def reconnect(self, sock: zmq.Socket) -> None:
        """Starts over on `sock` (a restarted server's, or the same one drained): what was in
        flight is forgotten."""
        self.sock = sock
        self._done.clear()
        self._pending.clear()

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
                if isinstance(msg, _MODEL_REPLIES):  # a load finished between two layers
                    self.replies.append(msg)
                    continue
                self._done.add(msg.slot)
                continue
            self._check_alive()
        self._done.discard(slot)

    def send_control(self, msg) -> None:
        """A control message outside the step (a model load or unload)."""
        self._control(msg)

    def take_reply(self, kind: type, name: str, timeout_ms: int = 0):
        """The server's reply of `kind` (or LoadFailed) about model `name`, or None if it has
        not come within `timeout_ms`. Only between steps: nothing may be in flight."""
        import time

        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            for msg in self.replies:
                if isinstance(msg, (kind, m.LoadFailed)) and msg.name == name:
                    self.replies.remove(msg)
                    return msg
            wait = max(0, int((deadline - time.monotonic()) * 1000))
            if self.sock.poll(min(wait, self.POLL_MS)):
                msg = m.decode(self.sock.recv())
                if isinstance(msg, _MODEL_REPLIES):
                    self.replies.append(msg)
                continue  # NOTE: anything else is a late answer to a failed step: dropped
            self._check_alive()
            if time.monotonic() >= deadline:
                return None


_MODEL_REPLIES = (m.Loaded, m.LoadFailed, m.Unloaded, m.Swapped)


class ShmLink(_LinkBase):
    """Shared-memory data path. On a GPU each crossing goes device -> host -> device: the
    inputs are copied into host memory before the doorbell, the output back in `wait`."""

    def __init__(self, sock, server_id, alive, layout: ShmLayout, device="cpu"):
        super().__init__(sock, server_id, alive)
        self.buffers = ShmBuffers(layout, create=True)
        self.device = torch.device(device)

    def submit(self, slot: int, model: str, layer: int, hidden, routing: Routing) -> None:
        self.buffers.write_input(slot, hidden, routing)  # synchronous from a GPU too
        k = 0 if routing.topk_ids is None else routing.topk_ids.shape[1]
        self._pending[slot] = hidden.shape
        self._control(m.Forward(slot, model, layer, hidden.shape[0], k))

    def wait(self, slot: int):
        self._await_done(slot)
        out = self.buffers.output(slot, *self._pending.pop(slot))
        return out if self.device.type == "cpu" else out.to(self.device)

    def close(self) -> None:
        self.buffers.close()


class ShmEndpoint:
    def __init__(self, layout: ShmLayout, hidden_sizes: dict[str, int], device="cpu"):
        self.buffers = ShmBuffers(layout, create=False)
        self.hidden_sizes = hidden_sizes
        self.device = torch.device(device)

    def read(self, msg: m.Forward):
        hidden, routing = self.buffers.read_input(msg.slot, msg.num_tokens, msg.top_k,
                                                  self.hidden_sizes[msg.model])
        if self.device.type == "cpu":
            return hidden, routing
        return hidden.to(self.device), Routing(*(None if t is None else t.to(self.device)
                                                 for t in (routing.topk_ids,
                                                           routing.topk_weights)))

    def write(self, msg: m.Forward, out) -> None:
        # From a GPU: a blocking copy into pageable memory, complete before the Done message.
        self.buffers.output(msg.slot, *out.shape).copy_(out)

    def close(self) -> None:
        self.buffers.close()


class DistLink(_LinkBase):
    """torch.distributed data path: rank 0 is the attention worker, rank s+1 FFN server s.

    With the nccl backend (`ffn_transport="nccl"`) tensors cross GPU to GPU; with gloo they
    cross in host memory (staged through it when the engine runs on a GPU).

    NOTE: the output's irecv is posted at submit time. With two slots in flight, a server
    may finish one slot's output while the attention worker is still sending the other's
    inputs; a pre-posted receive lets its send complete instead of deadlocking both sides.
    """

    def __init__(self, sock, server_id, alive, hidden_dtype, device="cpu", backend="gloo"):
        super().__init__(sock, server_id, alive)
        self.rank = server_id + 1
        self.dtype = hidden_dtype
        self.device = torch.device(device)
        self.wire = self.device if backend == "nccl" else torch.device("cpu")
        self._works: dict[int, tuple] = {}  # slot -> (tensors kept alive, works, output)

    def submit(self, slot, model, layer, hidden, routing: Routing) -> None:
        import torch.distributed as dist

        k = 0 if routing.topk_ids is None else routing.topk_ids.shape[1]
        self._control(m.Forward(slot, model, layer, hidden.shape[0], k))
        tensors = [hidden.to(self.wire).contiguous()]
        if k:
            tensors += [routing.topk_ids.to(self.wire).contiguous(),
                        routing.topk_weights.to(self.wire, torch.float32).contiguous()]
        works = [dist.isend(t, self.rank) for t in tensors]
        out = torch.empty(hidden.shape, dtype=self.dtype, device=self.wire)
        works.append(dist.irecv(out, self.rank))
        self._works[slot] = (tensors, works, out)

    def wait(self, slot):
        self._await_done(slot)
        _, works, out = self._works.pop(slot)
        for work in works:
            work.wait()  # nccl: this stream waits for the transfer, the host does not
        return out.to(self.device)

    def close(self) -> None:
        pass


class DistEndpoint:
    def __init__(self, hidden_sizes: dict[str, int], dtype, device="cpu", backend="gloo"):
        self.hidden_sizes = hidden_sizes
        self.dtype = dtype
        self.device = torch.device(device)
        self.wire = self.device if backend == "nccl" else torch.device("cpu")

    def read(self, msg: m.Forward):
        import torch.distributed as dist

        n, wire = msg.num_tokens, self.wire
        hidden = torch.empty(n, self.hidden_sizes[msg.model], dtype=self.dtype, device=wire)
        dist.recv(hidden, 0)
        if msg.top_k == 0:
            return hidden.to(self.device), Routing(None, None)
        ids = torch.empty(n, msg.top_k, dtype=torch.int64, device=wire)
        weights = torch.empty(n, msg.top_k, dtype=torch.float32, device=wire)
        dist.recv(ids, 0)
        dist.recv(weights, 0)
        return hidden.to(self.device), Routing(ids.to(self.device), weights.to(self.device))

    def write(self, msg: m.Forward, out) -> None:
        self._out = out.to(self.wire).contiguous()  # sent after the Done message, see the loop

    def send_output(self) -> None:
        import torch.distributed as dist

        dist.send(self._out, 0)
        self._out = None

    def close(self) -> None:
        pass


class CudaIpcLink(_LinkBase):
    """CUDA-IPC data path (transport/cuda_ipc.py), attention side.

    `submit` copies the inputs into the server's slot, mapped here, on this device's current
    stream, records this slot's "sent" event after the copies and rings the doorbell. `wait`
    takes the Done message, makes the current stream wait on the server's "done" event for the
    slot and returns a view of this side's output slot. The host never waits for the GPU.

    Ordering, with one current stream for submit, wait and the consumer:
    - inputs: a slot is reused only after its `wait`, whose stream wait on the server's done
      event orders the next copy after the server's last read of that slot;
    - outputs: the server writes a slot only after waiting on the sent event of the next
      submit to it, recorded after whatever consumed the previous output on this stream (the
      executor's sum in `wait`). So no extra event and no extra copy are needed, as long as
      the consumer runs on the stream that submits.
    """

    def __init__(self, sock, server_id, alive, layout: cuda_ipc.IpcLayout, device):
        super().__init__(sock, server_id, alive)
        self.layout = layout
        self.device = cuda_ipc.cuda_device(device)
        self.out = cuda_ipc.alloc_outputs(layout, self.device)  # owned here, mapped there
        self.sent = cuda_ipc.new_events(layout.slots, self.device)
        self.inputs = self.done = None  # the server's, mapped by `attach`

    def attach(self, handles: dict) -> None:
        """Start-up: maps the server's input slots and events, then sends this side's."""
        self.inputs = cuda_ipc.open_areas(handles)
        self.done = cuda_ipc.open_events(handles)
        self._control(m.IpcHandles(cuda_ipc.share(self.out, self.sent, self.device)))

    def submit(self, slot, model, layer, hidden, routing: Routing) -> None:
        # NOTE: the inputs are the server's memory. Checked here so that a server known to be
        # dead is never written to; one dying between the check and the copy is not covered.
        self._check_alive()
        (n, h), area = hidden.shape, self.inputs[slot]
        cuda_ipc.prefix(area["hidden"], n, h).copy_(hidden)
        k = 0
        if routing.topk_ids is not None:
            k = routing.topk_ids.shape[1]
            cuda_ipc.prefix(area["ids"], n, k).copy_(routing.topk_ids)
            cuda_ipc.prefix(area["weights"], n, k).copy_(routing.topk_weights)
        self.sent[slot].record(torch.cuda.current_stream(self.device))
        self._pending[slot] = (n, h)
        self._control(m.Forward(slot, model, layer, n, k))

    def wait(self, slot):
        self._await_done(slot)
        torch.cuda.current_stream(self.device).wait_event(self.done[slot])
        n, h = self._pending.pop(slot)
        return cuda_ipc.prefix(self.out[slot], n, h)

    def close(self) -> None:
        # Unmap the server's buffers before it exits, once our copies into them are done
        # (not waited for when it is dead: its events may never complete). Ours may stay
        # mapped there until it exits: torch keeps an exported block out of reuse meanwhile.
        if self.inputs is not None and self.alive() is None:
            torch.cuda.current_stream(self.device).synchronize()
        self.inputs = self.done = None
        self.out = self.sent = None


class CudaIpcEndpoint:
    """CUDA-IPC data path, FFN-server side: owns the input slots, maps the output slots.

    `read` makes the current stream wait on the slot's sent event and returns views of the
    input slot; `write` copies the output into the attention side's slot and records the
    slot's done event after the copy. The FFN runs on the same current stream in between.
    """

    def __init__(self, layout: cuda_ipc.IpcLayout, device, hidden_sizes: dict[str, int]):
        self.device = cuda_ipc.cuda_device(device)
        self.hidden_sizes = hidden_sizes
        self.inputs = cuda_ipc.alloc_inputs(layout, self.device)  # owned here, mapped there
        self.done = cuda_ipc.new_events(layout.slots, self.device)
        self.out = self.sent = None  # the attention side's, mapped by `attach`

    def share(self) -> dict:
        return cuda_ipc.share(self.inputs, self.done, self.device)

    def attach(self, handles: dict) -> None:
        self.out = cuda_ipc.open_areas(handles)
        self.sent = cuda_ipc.open_events(handles)

    def read(self, msg: m.Forward):
        torch.cuda.current_stream(self.device).wait_event(self.sent[msg.slot])
        n, k, area = msg.num_tokens, msg.top_k, self.inputs[msg.slot]
        hidden = cuda_ipc.prefix(area["hidden"], n, self.hidden_sizes[msg.model])
        if k == 0:
            return hidden, Routing(None, None)
        return hidden, Routing(cuda_ipc.prefix(area["ids"], n, k),
                               cuda_ipc.prefix(area["weights"], n, k))

    def write(self, msg: m.Forward, out) -> None:
        cuda_ipc.prefix(self.out[msg.slot], *out.shape).copy_(out)
        self.done[msg.slot].record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        self.out = self.sent = None
        self.inputs = self.done = None


class P2PLink(_LinkBase):
    """The `p2p` crossing's control link (transport/p2p.py): a Step message once per step and
    the capture handshake. The data never passes here, and nothing is awaited per layer."""

    def step(self, msg) -> None:
        self._control(msg)

    def await_reply(self, timeout_s: float):
        """The server's next message (Captured or Failed), checking that it stays alive."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(self.POLL_MS):
                return m.decode(self.sock.recv())
            self._check_alive()
        raise FFNServerError(f"FFN server {self.server_id}: no reply within {timeout_s} s")

    def failures(self) -> list[str]:
        """Failure reports that have arrived (never blocks)."""
        out = []
        while self.sock.poll(0):
            msg = m.decode(self.sock.recv())
            if isinstance(msg, m.Failed):
                out.append(msg.message)
        return out

    def close(self) -> None:
        pass
