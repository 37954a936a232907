"""Typed messages between the HTTP server and the scheduler process, and their one serializer.

    server -> scheduler: AddRequests, AbortRequest, ControlRequest
    scheduler -> server: Ready, AddResults, BatchOutput, ControlResult, SchedulerError

Every message is a small dataclass; `dumps`/`loads` (pickle) is the only wire format. The
in-process mode passes the same objects without serializing them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from sglang_crosspool.engine.sampling_params import SamplingParams

# -- server -> scheduler ---------------------------------------------------------------------


@dataclass
class TokenizedRequest:
    """One engine request: tokens in, sampling params already validated by the server."""

    rid: str
    model: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0


@dataclass
class AddRequests:
    """Requests that are added together: all are queued, or none (the first error wins)."""

    requests: list[TokenizedRequest]


@dataclass
class AbortRequest:
    rid: str | None  # None with abort_all
    message: str = "aborted"
    abort_all: bool = False


@dataclass
class ControlRequest:
    """A question for the scheduler, answered by a ControlResult with the same cid."""

    cid: int
    kind: str  # "stats" | "health" | "flush_cache" | "load_model" | "unload_model"
    args: dict = field(default_factory=dict)  # load_model, unload_model: the request's body


# -- scheduler -> server ---------------------------------------------------------------------


@dataclass
class Ready:
    pid: int
    models: list[str]
    stats: dict


@dataclass
class AddResults:
    """The answer to one AddRequests: error is None when every request was queued."""

    rids: list[str]
    error: str | None = None
    status: int = 400  # of the error: 400 a bad request, 503 the engine cannot take requests


@dataclass
class RequestUpdate:
    """What one request produced since its previous update (deltas, not totals)."""

    rid: str
    new_ids: list[int]
    text_offset: int  # the text is cut to this length, then text_delta is appended
    text_delta: str
    completion_tokens: int
    finish_reason: dict | None = None
    retractions: int = 0
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class BatchOutput:
    updates: list[RequestUpdate]
    stats: dict | None = None  # EngineCore.stats() after the step


@dataclass
class ControlResult:
    cid: int
    result: dict


@dataclass
class SchedulerError:
    """The scheduler is going down; `message` says why (the traceback, on a crash)."""

    message: str


def dumps(msg) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes):
    return pickle.loads(data)
