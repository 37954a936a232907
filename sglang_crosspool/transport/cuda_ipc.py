"""CUDA-IPC data path: device buffers per slot, shared once at start-up between two processes.

Per link and slot there is an input area (hidden states, top-k ids int64, top-k weights float32)
and an output area (the FFN output). Each side owns the area it reads and maps the one it
writes: inputs live on the FFN server's GPU, outputs on the attention worker's GPU, so every
transfer is one device-to-device `copy_` into the peer's memory (over NVLink between two GPUs,
a plain device copy on one GPU) and every read is local. Areas are flat, so a batch of `n`
tokens is the contiguous prefix `[: n * width]` whatever the model's hidden size.

Readiness travels as interprocess CUDA events, one per slot and direction, also shared once:
the writer records its event on its current stream after the copy; the reader makes its own
stream wait on it (`cudaStreamWaitEvent`, no host sync). The ZeroMQ doorbell only says "the
event is recorded"; it is always sent after the record, so the wait sees the right one.

Sharing goes through torch's own CUDA-tensor IPC (`torch.multiprocessing.reductions`): it
needs no extra package, finds the `cudaMalloc` block behind a caching-allocator tensor, opens
the handle on the owning device in the importer, orders the exporter's pending writes before
the import, and keeps the exporter's block out of reuse until the importer has let go.
Events: `torch.cuda.Event(interprocess=True)`; CUDA requires timing off for that (the torch
default); `blocking` only changes how a host `synchronize()` waits, which we never call.

NOTE: both processes must see the same CUDA device numbering (same CUDA_VISIBLE_DEVICES): the
handles carry device indices. Not done here, and the faster route (DESIGN.md section 5): a
Triton kernel storing straight into the peer buffer inside a captured CUDA graph, with a flag
written on the GPU instead of the doorbell. A peer store into a torch-IPC mapping hit an
illegal address in a first try, so this path uses `copy_` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import reduce_tensor

from sglang_crosspool.transport.shm import prefix

__all__ = ["IpcLayout", "alloc_inputs", "alloc_outputs", "cuda_device", "new_events",
           "open_areas", "open_events", "prefix", "share"]


@dataclass(frozen=True)
class IpcLayout:
    slots: int
    max_tokens: int
    hidden: int  # largest hidden size over the models
    max_top_k: int
    dtype: str  # torch dtype name of hidden states


def cuda_device(device) -> torch.device:
    """`device` with its index made explicit (the handles name devices by index)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"cuda-ipc needs a CUDA device, got {device!r}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def alloc_inputs(layout: IpcLayout, device: torch.device) -> list[dict[str, torch.Tensor]]:
    t, h, k = layout.max_tokens, layout.hidden, layout.max_top_k
    dtype = getattr(torch, layout.dtype)
    return [{"hidden": torch.zeros(t * h, dtype=dtype, device=device),
             "ids": torch.zeros(t * k, dtype=torch.int64, device=device),
             "weights": torch.zeros(t * k, dtype=torch.float32, device=device)}
            for _ in range(layout.slots)]


def alloc_outputs(layout: IpcLayout, device: torch.device) -> list[torch.Tensor]:
    dtype = getattr(torch, layout.dtype)
    return [torch.zeros(layout.max_tokens * layout.hidden, dtype=dtype, device=device)
            for _ in range(layout.slots)]


def new_events(count: int, device: torch.device) -> list[torch.cuda.Event]:
    with torch.cuda.device(device):  # an event is created on the current device
        events = [torch.cuda.Event(interprocess=True) for _ in range(count)]
        for event in events:
            event.record()  # creates it now, on this device; completes at once
    return events


def share(areas, events: list[torch.cuda.Event], device: torch.device) -> dict:
    """Picklable handles of this side's areas (a tensor, or a dict or list of them) and events.

    NOTE: the caller must keep the tensors alive while the peer maps them."""
    return {"device": device.index, "areas": _map(areas, reduce_tensor),
            "events": [e.ipc_handle() for e in events]}


def open_areas(handles: dict):
    """The peer's areas, mapped into this process (closed again when the tensors are dropped;
    the peer keeps ownership)."""
    return _map(handles["areas"], lambda h: h[0](*h[1]))


def open_events(handles: dict) -> list[torch.cuda.Event]:
    device = torch.device("cuda", handles["device"])  # opened on the owner's device
    return [torch.cuda.Event.from_ipc_handle(device, h) for h in handles["events"]]


def _map(tree, fn):
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    return fn(tree)
