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


def encode(msg) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes):
    return pickle.loads(data)
