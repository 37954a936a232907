"""Engine-side request state: what came in, what has come out, and how it finished."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crosspool_scheduler import SchedReq

from sglang_crosspool.engine.sampler import SamplingState
from sglang_crosspool.engine.sampling_params import SamplingParams
from sglang_crosspool.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from sglang_crosspool.engine.grammar import RequestGrammar


@dataclass
class EngineRequest:
    """A tokenized request as the engine core accepts it."""

    rid: str
    model: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: only the last prompt token (SGLang's default)
    top_logprobs_num: int = 0


@dataclass
class RequestState:
    req: EngineRequest
    sched: SchedReq
    sampling: SamplingState
    detok: IncrementalDetokenizer
    max_new_tokens: int
    created: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_reason: dict | None = None
    text: str = ""  # output text, cut at a matched stop string
    input_lp_next: int = 0  # next prompt position whose successor's logprob is due
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    grammar: RequestGrammar | None = None  # its constraint (regex, json_schema or ebnf)

    @property
    def output_ids(self) -> list[int]:
        return self.sched.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> dict:
        """The response object, with SGLang's field names."""
        meta = {
            "id": self.req.rid,
            "model": self.req.model,
            "prompt_tokens": len(self.req.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.sched.cached_tokens,
            "finish_reason": self.finish_reason,
            "e2e_latency": time.monotonic() - self.created,
            "retractions": self.sched.retractions,
        }
        if self.req.return_logprob:
            meta["input_token_logprobs"] = self.input_token_logprobs
            meta["output_token_logprobs"] = self.output_token_logprobs
            if self.req.top_logprobs_num:
                meta["input_top_logprobs"] = self.input_top_logprobs
                meta["output_top_logprobs"] = self.output_top_logprobs
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}
