"""Parity with transformers for tests: the engine's greedy tokens and per-step logits against
HF `generate` on the same checkpoint, in float32."""

from __future__ import annotations

import torch

# Prompts of every parity test: short, repeated and long enough to cross a chunk or a block.
PARITY_PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [100, 200, 300],
    [42] * 21,
    list(range(1, 41)),
    [900],
]


def hf_greedy(hf, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """HF's greedy continuation of `prompt` and its logits at each step."""
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [x[0] for x in out.logits]


def parity_problems(engine, hf, prompts: list[list[int]], new_tokens: int,
                    label: str = "", tolerance: float = 1e-4) -> list[str]:
    """Generates `new_tokens` greedy tokens per prompt in one batch (whatever chunking the
    engine is built with) and compares them with HF: the ids must be equal and every step's
    logits within `tolerance` of HF's, relative to HF's largest. Returns what differs."""
    seen: dict[str, list[torch.Tensor]] = {}
    engine.core.logits_observer = lambda rid, row: seen.setdefault(rid, []).append(row.clone())
    rids = [f"r{i}" for i in range(len(prompts))]
    greedy = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    outs = engine.generate(input_ids=prompts, sampling_params=greedy, rid=rids)
    problems = []
    for prompt, out, rid in zip(prompts, outs, rids):
        ref_ids, ref_logits = hf_greedy(hf, prompt, new_tokens)
        where = f"{label} prompt of {len(prompt)}"
        if out["output_ids"] != ref_ids:
            problems.append(f"{where}: ids {out['output_ids']} != HF {ref_ids}")
        if len(seen[rid]) != new_tokens:
            problems.append(f"{where}: {len(seen[rid])} logits rows, not {new_tokens}")
        for step, (ours, ref) in enumerate(zip(seen[rid], ref_logits)):
            rel = float((ours - ref).abs().max() / ref.abs().max())
            if not rel < tolerance:
                problems.append(f"{where} step {step}: relative logit error {rel:.2e}")
    return problems
