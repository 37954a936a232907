"""Typed control messages between an attention worker and an FFN server, and their codec."""

from __future__ import annotations

import pickle
from dataclasses import dataclass


@dataclass(frozen=True)
class Ready:
    server_id: int
    pid: int
    ffn_bytes: int  # bytes of FFN weights this server holds
    keys_read: tuple[str, ...]  # "model:tensor" for every checkpoint tensor loaded here
    experts: dict  # model -> expert ids held


@dataclass(frozen=True)
class IpcHandles:
    """cuda-ipc start-up, once each way: one side's shared buffers and events
    (`transport.cuda_ipc.share`). The server sends its own first, then waits for the peer's."""

    handles: dict


@dataclass(frozen=True)
class Attach:
    """From a data-parallel attention replica that shares these FFN servers: its link (the
    shm segment or cuda-ipc buffers of its `clients` entry) is ready; answered by Ready
    (cuda-ipc: IpcHandles both ways first)."""

    replica: int


@dataclass(frozen=True)
class Forward:
    """One layer of one micro-batch: the data waits in `slot` of the transport."""

    slot: int
    model: str
    layer: int
    num_tokens: int
    top_k: int  # 0 for a dense layer (no routing sent)


@dataclass(frozen=True)
class Done:
    slot: int


@dataclass(frozen=True)
class Failed:
    slot: int
    message: str


@dataclass(frozen=True)
class Step:
    """p2p: the next step, once per step instead of a message per layer. `plan` is, per
    micro-batch (slot = its index), (model, tokens); `graph` says to replay the graph
    captured for this plan rather than run it eagerly."""

    plan: tuple[tuple[str, int], ...]
    graph: bool = False


@dataclass(frozen=True)
class Capture:
    """p2p: capture this plan's step as a CUDA graph (without running it); answered by
    Captured or Failed."""

    plan: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Captured:
    server_id: int
    memory_bytes: int


@dataclass(frozen=True)
class Shutdown:
    pass


# -- the model set: models loaded and unloaded while the server runs (ffn/server.py) ----------


@dataclass(frozen=True)
class LoadModel:
    """Load model `name`'s experts `experts` (and, with `with_shared`, its shared experts and
    dense MLPs) beside the models served; answered by Loaded or LoadFailed once done, while
    Forward messages keep being served meanwhile."""

    name: str
    path: str
    experts: tuple[int, ...]
    with_shared: bool
    load_format: str = "auto"
    # /rebalance: keep the loaded share aside (the model keeps its current one) until Swap
    stage: bool = False


@dataclass(frozen=True)
class Loaded:
    server_id: int
    name: str
    model_bytes: int  # this model's FFN bytes on the server
    ffn_bytes: int  # the server's FFN bytes in all, with this model


@dataclass(frozen=True)
class LoadFailed:
    server_id: int
    name: str
    message: str


@dataclass(frozen=True)
class Swap:
    """/rebalance: serve model `name` from its staged share from now on (`keep`), or drop the
    staged share; answered by Swapped. Sent between steps: every Forward before it used the
    old share, every one after it uses the new."""

    name: str
    keep: bool = True


@dataclass(frozen=True)
class Swapped:
    server_id: int
    name: str
    ffn_bytes: int  # the server's FFN bytes in all, after


@dataclass(frozen=True)
class UnloadModel:
    """Free model `name`'s FFN weights; answered by Unloaded."""

    name: str


@dataclass(frozen=True)
class Unloaded:
    server_id: int
    name: str
    freed_bytes: int
    ffn_bytes: int  # the server's FFN bytes in all, after


def encode(msg) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes):
    return pickle.loads(data)
