"""Sampling and logprobs for one step's rows of logits.

In: float32 logits [rows, vocab] and each row's `SamplingState`. Out: chosen token ids and,
where asked, the chosen tokens' logprobs and the top-k logprobs. Logprobs are those of the
model's distribution (log_softmax of the raw logits), as SGLang and vLLM report them;
penalties, temperature and the top-k/top-p/min-p filters only shape the choice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from sglang_crosspool.engine.sampling_params import SamplingParams


@dataclass
class SamplingState:
    params: SamplingParams
    generator: torch.Generator | None  # per-request, when a seed is given
    prompt_tokens: set[int]
    output_counts: Counter = field(default_factory=Counter)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], device) -> SamplingState:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        return cls(params, gen, set(prompt_ids) if params.repetition_penalty != 1 else set())

    def record(self, token: int) -> None:
        if self.params.has_penalties:
            self.output_counts[token] += 1


def apply_penalties(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; frequency/presence over output."""
    p = state.params
    if p.repetition_penalty != 1.0:
        seen = state.prompt_tokens | set(state.output_counts)
        if seen:
            idx = torch.tensor(sorted(seen), device=logits.device)
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty,
                                      vals * p.repetition_penalty)
    if state.output_counts and (p.frequency_penalty or p.presence_penalty):
        ids = list(state.output_counts)
        idx = torch.tensor(ids, device=logits.device)
        counts = torch.tensor([state.output_counts[i] for i in ids], device=logits.device,
                              dtype=logits.dtype)
        logits[idx] -= p.frequency_penalty * counts + p.presence_penalty
    return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filters; returns renormalized probs."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_probs) > params.top_p * cum[-1]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def choose(logits: torch.Tensor, state: SamplingState, default_gen: torch.Generator) -> int:
    """Picks one token from one row of raw logits (the row is not modified)."""
    p = state.params
    if p.has_penalties:
        logits = apply_penalties(logits.clone(), state)
    if p.greedy:
        return int(torch.argmax(logits))
    probs = filtered_probs(logits, p)
    gen = state.generator or default_gen
    return int(torch.multinomial(probs, 1, generator=gen))


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_k: int):
    """log p(token) per row, and the top_k (logprob, id) pairs per row when top_k > 0."""
    logp = torch.log_softmax(logits, dim=-1)
    idx = torch.tensor(tokens, device=logits.device)
    chosen = logp.gather(-1, idx[:, None]).squeeze(-1).tolist()
    tops: list[list[tuple[float, int]]] = [[] for _ in tokens]
    if top_k > 0:
        vals, ids = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1)
        tops = [list(zip(v, i)) for v, i in zip(vals.tolist(), ids.tolist())]
    return chosen, tops
