"""The `p2p` crossing: hidden states cross with peer stores and device flags, control once a step.

This module owns the protocol between one attention worker (rank 0) and its FFN servers
(rank j + 1 is FFN server j): the buffers, the flags and counters, who writes what and when.
The kernels that move the bytes and flip the flags are `crosspool_kernels.crossing`.

Buffers. Every rank holds the same arena (`P2PLayout.sections`), and maps every peer's:

    err        int32      the rank's error word: 0, or who failed (crossing.ERR_*)
    in_flags   [slot, row]          set by the attention worker, read by the server
    out_flags  [server, slot, row]  set by server j in row j, read by the attention worker
    in_h, in_ids, in_w  [slot]      hidden states, top-k ids (int64) and weights of a slot
    out        [server, slot]       each server's partial FFN output of a slot

A micro-batch of a step uses slot = its index in the step. On CUDA the arena comes from torch
SymmetricMemory (allocated and exchanged once at start-up, before any graph capture); on CPU
it is one shared-memory segment per rank and the kernels' torch references stand in for the
kernels: that CPU twin runs the same bookkeeping in CI.

Flags hold counters that only grow: each side keeps, in its own memory, how many times it has
sent or received each (peer, slot, row), and a receiver waits until the flag reaches its own
count + 1. Nothing is reset between steps, so captured graphs replay as they are; both sides
must run the same crossings in the same order, which the step plan guarantees.

One step (control once, data per layer, no host in the loop):

    attention worker                              FFN server j
    Step(plan) over ZeroMQ  ------------------>   replay its graph for plan (or run it eagerly)
    for each SUBMIT (mb, l) of layer_pipeline(plan):
      attention(mb, l); send rows -> in_h[mb] of j, then in_flags[mb] (release)
                                                  wait in_flags[mb] (acquire)
                                                  FFN_j(l) over its experts
                            out[j, mb] <- rows,   then out_flags[j, mb] (release)
      ... other micro-batches' attention ...
      wait_sum: out_flags[*, mb] (acquire), x += sum_j out[j, mb]
    logits; end_step reads err once

Faults. Every wait is bounded (`timeout_s`, on the GPU's global timer) and every wait also
stops as soon as the error word is set, so a graph with a dead peer drains in one timeout, not
one per layer. A server whose forward raises writes its code into the attention worker's error
word; a host watchdog that sees a server process die writes it too. The attention worker reads
the word once per step and fails the step, naming the server; the link is broken from then on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from sglang_crosspool.config import DTYPES

_ALIGN = 256


@dataclass(frozen=True)
class P2PLayout:
    servers: int
    slots: int
    max_tokens: int
    hidden: int  # largest hidden size over the models
    max_top_k: int
    dtype: str  # torch dtype name of hidden states
    timeout_s: float = 20.0  # bound of every wait (a dead peer is caught by a watchdog first)

    def sections(self) -> dict[str, tuple[int, int, tuple[int, ...], torch.dtype]]:
        """name -> (byte offset, bytes, shape, dtype) inside one rank's arena."""
        s, t, h, k = self.slots, self.max_tokens, self.hidden, max(self.max_top_k, 1)
        dt = DTYPES[self.dtype]
        shapes = {
            "err": ((4,), torch.int32),
            "in_flags": ((s, t), torch.int32),
            "out_flags": ((self.servers, s, t), torch.int32),
            "in_h": ((s, t * h), dt),
            "in_ids": ((s, t * k), torch.int64),
            "in_w": ((s, t * k), dt),
            "out": ((self.servers, s, t * h), dt),
        }
        out, offset = {}, 0
        for name, (shape, dtype) in shapes.items():
            size = dtype.itemsize * math.prod(shape)
            out[name] = (offset, size, shape, dtype)
            offset += -(-size // _ALIGN) * _ALIGN
        return out

    @property
    def nbytes(self) -> int:
        offset, size, _, _ = list(self.sections().values())[-1]
        return offset + size

    @property
    def timeout_ns(self) -> int:
        return int(self.timeout_s * 1e9)


def views(layout: P2PLayout, arena: torch.Tensor) -> dict[str, torch.Tensor]:
    """Typed views of one rank's arena (a flat uint8 tensor)."""
    return {name: arena[offset : offset + size].view(dtype).view(shape)
            for name, (offset, size, shape, dtype) in layout.sections().items()}


# -- arenas: one rank's own bytes and its peers' ---------------------------------------------

class ShmArena:
    """CPU: one shared-memory segment per rank, named `{prefix}-{rank}`. The attention worker
    creates all of them before the servers start (and unlinks them); servers attach."""

    def __init__(self, layout: P2PLayout, prefix: str, create: bool):
        from multiprocessing import shared_memory

        self.create = create
        self.segments = []
        for rank in range(layout.servers + 1):
            name = f"{prefix}-{rank}"
            if create:
                seg = shared_memory.SharedMemory(name=name, create=True, size=layout.nbytes)
                seg.buf[: layout.nbytes] = bytes(layout.nbytes)
            else:
                seg = shared_memory.SharedMemory(name=name)
                _untrack(seg)
            self.segments.append(seg)
        self.ranks = [torch.frombuffer(seg.buf, dtype=torch.uint8, count=layout.nbytes)
                      for seg in self.segments]

    def close(self) -> None:
        self.ranks = []
        for seg in self.segments:
            try:
                seg.close()
            except BufferError:  # a view is still alive somewhere; the OS frees it at exit
                pass
            if self.create:
                try:
                    seg.unlink()
                except FileNotFoundError:
                    pass
        self.segments = []


def _untrack(seg) -> None:
    # NOTE: Python's resource tracker would unlink an attached segment when this process
    # exits; only the creator (the attention worker) may do that.
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001
    except Exception:  # noqa: BLE001 - best effort, absent on some platforms
        pass


_SYMMETRIC_ARENAS = 0  # made in this process


class SymmetricArena:
    """CUDA: the arena from torch SymmetricMemory over the default process group, which the
    attention worker and its servers form (rank 0 and j + 1). Collective: every rank calls it
    once, at start-up, before any graph capture.

    NOTE: one p2p pool per process on CUDA. On torch 2.11 a second rendezvous after the process
    group was destroyed and made again hung (2xH200); a server holds one pool for its life, and
    tests and benchmarks make each p2p engine in its own process."""

    def __init__(self, layout: P2PLayout, device: torch.device):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        global _SYMMETRIC_ARENAS
        if _SYMMETRIC_ARENAS:  # fail at once rather than hang in the rendezvous
            raise RuntimeError("a process makes one p2p pool on CUDA (torch's SymmetricMemory "
                               "rendezvous hung on a second one); start another process")
        _SYMMETRIC_ARENAS += 1
        group = dist.group.WORLD.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # older torch needs it; newer warns that it is not needed
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                try:
                    enable(group)
                except Exception:  # noqa: BLE001 - newer torch needs no enabling
                    pass
        own = symm_mem.empty(layout.nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(own, group)
        own.zero_()
        torch.cuda.synchronize(device)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.ranks = [own if r == rank else
                      self.handle.get_buffer(r, (layout.nbytes,), torch.uint8, 0)
                      for r in range(world)]
        dist.barrier()  # every rank's arena is zeroed before anyone writes into a peer's

    def close(self) -> None:
        self.ranks = []


# -- the two ends ------------------------------------------------------------------------------

def _ops(device: torch.device):
    """The crossing's kernels for `device`: Triton on CUDA, the torch references on CPU."""
    from crosspool_kernels import crossing as k

    if device.type == "cuda":
        return k.send_rows, k.wait_rows, k.wait_sum
    return k.send_rows_ref, k.wait_rows_ref, k.wait_sum_ref


class _End:
    def __init__(self, layout: P2PLayout, arena, rank: int, device):
        self.layout = layout
        self.arena = arena
        self.rank = rank
        self.device = torch.device(device)
        self.mine = views(layout, arena.ranks[rank])
        self.peers = {r: views(layout, a) for r, a in enumerate(arena.ranks) if r != rank}
        s, t = layout.slots, layout.max_tokens
        # How many times this side sent / received each (peer, slot, row): its own memory.
        self.sent = torch.zeros(layout.servers, s, t, dtype=torch.int32, device=self.device)
        self.received = torch.zeros(layout.servers, s, t, dtype=torch.int32, device=self.device)
        self._send, self._wait, self._wait_sum = _ops(self.device)

    def error(self) -> int:
        """This side's error word (a host read: once per step)."""
        return int(self.mine["err"][0])

    def set_error(self, code: int, rank: int | None = None) -> None:
        """Writes `code` into the error word of `rank` (default: this side) from the host, on a
        side stream, so that it lands while this process's graph is still spinning."""
        target = self.mine if rank is None or rank == self.rank else self.peers[rank]
        if self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                target["err"][:1].fill_(code)
            stream.synchronize()
        else:
            target["err"][0] = code

    def close(self) -> None:
        self.mine = self.peers = None
        self.arena.close()


class AttentionEnd(_End):
    """Rank 0: sends each micro-batch's inputs to every FFN server, sums their outputs."""

    def __init__(self, layout: P2PLayout, arena, device):
        super().__init__(layout, arena, 0, device)
        mine = self.mine
        # Per slot, made once: what a send writes on each server, and what wait_sum reads.
        self._targets = [[(p["in_h"][slot], p["in_ids"][slot], p["in_w"][slot],
                           p["in_flags"][slot], self.sent[j, slot])
                          for j, p in ((j, self.peers[j + 1]) for j in range(layout.servers))]
                         for slot in range(layout.slots)]
        self._sources = [(mine["out"][:, slot], mine["out_flags"][:, slot],
                          self.received[:, slot]) for slot in range(layout.slots)]

    def send(self, slot: int, hidden: torch.Tensor, topk_ids, topk_weights) -> None:
        if hidden.shape[0] > self.layout.max_tokens:
            raise ValueError(f"{hidden.shape[0]} tokens exceed the crossing's "
                             f"{self.layout.max_tokens}")
        w = None if topk_weights is None else topk_weights.to(hidden.dtype)
        for target in self._targets[slot]:
            self._send(hidden, topk_ids, w, *target)

    def wait_sum(self, slot: int, x: torch.Tensor | None, num_rows: int,
                 hidden: int) -> torch.Tensor:
        """x + the sum of every server's output rows of `slot` (x None: the sum alone)."""
        parts, flags, counts = self._sources[slot]
        out = torch.empty(num_rows, hidden, dtype=parts.dtype if x is None else x.dtype,
                          device=self.device)
        return self._wait_sum(x, parts, out, flags, counts, self.mine["err"], num_rows, hidden,
                              self.layout.timeout_ns)


class FFNEnd(_End):
    """Rank server_id + 1: waits for a slot's inputs, sends its partial output back."""

    def __init__(self, layout: P2PLayout, arena, server_id: int, device):
        super().__init__(layout, arena, server_id + 1, device)
        self.server_id = server_id

    def wait(self, slot: int, num_rows: int, hidden: int, top_k: int):
        """Views of the slot's hidden states [T, H] and, when top_k, ids and weights [T, k]."""
        from crosspool_kernels.crossing import ERR_STALLED

        mine = self.mine
        # A timeout here is told to the attention worker too: it must not take this step's
        # outputs, computed from inputs that never came.
        self._wait(num_rows, mine["in_flags"][slot], self.received[0, slot], mine["err"],
                   ERR_STALLED + self.server_id, self.layout.timeout_ns,
                   peer_err=self.peers[0]["err"])
        h = mine["in_h"][slot, : num_rows * hidden].view(num_rows, hidden)
        if not top_k:
            return h, None, None
        n = num_rows * top_k
        return (h, mine["in_ids"][slot, :n].view(num_rows, top_k),
                mine["in_w"][slot, :n].view(num_rows, top_k))

    def send(self, slot: int, out: torch.Tensor) -> None:
        peer, j = self.peers[0], self.server_id
        out = out.contiguous()
        self._send(out, None, None, peer["out"][j, slot], peer["in_ids"][slot],
                   peer["in_w"][slot], peer["out_flags"][j, slot], self.sent[0, slot])

    def fail(self, code: int) -> None:
        """Tells the attention worker (and this side's own waits) that this server failed."""
        self.set_error(code, 0)
        self.set_error(code)


@functools.cache
def crossing_order(num_layers: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(micro-batch, layer) of every crossing of a step, in the order both sides run them:
    the SUBMIT ops of the layer-wise pipeline over micro-batches with these layer counts.
    Cached: a server sees the same few plans step after step."""
    from crosspool_scheduler.pipeline import SUBMIT, layer_pipeline

    return tuple((op.mb, op.layer) for op in layer_pipeline(list(num_layers))
                 if op.kind == SUBMIT)
