"""Greedy tokens and per-step logits of the engine against transformers' own forward pass."""

from __future__ import annotations

import pytest
import torch

from sglang_crosspool import Engine
from sglang_crosspool.testing.checkpoints import ARCHS
from sglang_crosspool.testing.parity import PARITY_PROMPTS, parity_problems

PROMPTS = PARITY_PROMPTS
NEW_TOKENS = 32
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logits_match_hf(arch, tiny_models, hf_models):
    # A small prefill chunk makes the batch mix chunked prefills with decodes.
    engine = Engine(tiny_models[arch], dtype="float32", chunked_prefill_size=16)
    assert parity_problems(engine, hf_models(arch), PROMPTS, NEW_TOKENS, arch) == []
    assert engine.stats()["kv"]["used_pages"] == 0


def test_output_and_input_logprobs_match_hf(tiny_models, hf_models):
    arch = "qwen2_moe"
    engine = Engine(tiny_models[arch])
    prompt = list(range(50, 70))
    out = engine.generate(input_ids=prompt, sampling_params=dict(GREEDY, max_new_tokens=4),
                          return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    meta = out["meta_info"]
    full = torch.tensor([prompt + out["output_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(hf_models(arch)(full).logits[0].float(), dim=-1)
    inputs = meta["input_token_logprobs"]
    assert inputs[0] == (None, prompt[0], None) and len(inputs) == len(prompt)
    for pos in range(1, len(prompt)):
        lp, tok, _ = inputs[pos]
        assert tok == prompt[pos]
        assert lp == pytest.approx(logp[pos - 1, tok].item(), abs=1e-4)
    for i, (lp, tok, _) in enumerate(meta["output_token_logprobs"]):
        row = len(prompt) - 1 + i
        assert lp == pytest.approx(logp[row, tok].item(), abs=1e-4)
        top = meta["output_top_logprobs"][i]
        assert [t for _, t, _ in top] == torch.topk(logp[row], 3).indices.tolist()
        assert top[0][1] == tok  # greedy picks the top-1
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"][1]) == 3


def test_default_logprob_start_scores_last_prompt_token_only(tiny_models):
    engine = Engine(tiny_models["olmoe"])
    out = engine.generate(input_ids=[3, 4, 5, 6], sampling_params={"max_new_tokens": 2},
                          return_logprob=True)
    assert [t for _, t, _ in out["meta_info"]["input_token_logprobs"]] == [6]
    assert len(out["meta_info"]["output_token_logprobs"]) == 2


def test_prefill_only_request_scores_the_prompt(tiny_models):
    engine = Engine(tiny_models["mixtral"], chunked_prefill_size=8)
    prompt = list(range(10, 30))
    scored = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0},
                             return_logprob=True, logprob_start_len=5)
    assert scored["output_ids"] == [] and scored["meta_info"]["completion_tokens"] == 0
    assert scored["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    lps = scored["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in lps] == prompt[5:]
    # The same positions scored in one unchunked pass agree.
    whole = Engine(tiny_models["mixtral"], chunked_prefill_size=512).generate(
        input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True,
        logprob_start_len=5)
    for a, b in zip(lps, whole["meta_info"]["input_token_logprobs"]):
        assert a[0] == pytest.approx(b[0], abs=1e-5)
    assert engine.stats()["kv"]["used_pages"] == 0
