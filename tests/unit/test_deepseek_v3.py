"""DeepSeek-V3's routing (sigmoid scores, e_score_correction_bias, groups ranked by their two
best biased scores, routed_scaling_factor) against transformers' own DeepseekV3 router, and a
tiny DeepSeek-V3 checkpoint made by transformers served with the same tokens and logits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from sglang_crosspool import Engine
from sglang_crosspool.models.config import CheckpointError, load_spec
from sglang_crosspool.models.deepseek_v2 import route_topk
from sglang_crosspool.testing.checkpoints import build_model, hf_reference
from sglang_crosspool.testing.parity import parity_problems
from sglang_crosspool.testing.tokenizer import write_tokenizer

LITE = Path(__file__).resolve().parents[1] / "data" / "model-configs" / "DeepSeek-V2-Lite"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], list(range(1, 41))]

# DeepSeek-V2's tiny layout with V3's router: 16 experts in 4 groups, 2 groups kept, top-4,
# renormalized then scaled by 2.5; q through its low rank as in V3.
TINY_V3 = {
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "initializer_range": 0.2,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "intermediate_size": 96,
    "q_lora_rank": 24, "kv_lora_rank": 56, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
    "moe_intermediate_size": 16, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "max_position_embeddings": 512, "num_mtp_layers": 0,
    "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                        "original_max_position_embeddings": 128, "beta_fast": 32,
                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}


def _hf_router(config, seed: int):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        # Larger than the spread of the sigmoid scores, so the bias changes choices.
        router.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts,
                                                         generator=gen) * 0.3)
    return router


@pytest.mark.parametrize("norm", [True, False])
def test_routing_matches_transformers_router(tmp_path, norm):
    config = AutoConfig.for_model("deepseek_v3", **{**TINY_V3, "norm_topk_prob": norm})
    config.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert (spec.router.scoring_func, spec.router.topk_method) == ("sigmoid", "noaux_tc")
    assert (spec.router.n_group, spec.router.topk_group, spec.norm_topk_prob) == (4, 2, norm)
    router = _hf_router(config, seed=0)
    hidden = torch.randn(512, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hf_weights, hf_ids = router(hidden)
    bias = router.e_score_correction_bias
    ids, weights = route_topk(F.linear(hidden, router.weight), spec, torch.float32, bias)
    order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order),
                               rtol=1e-6, atol=1e-6)
    # The chosen experts lie in topk_group groups, and the bias did change some choices.
    assert all(len(set((row // 4).tolist())) <= 2 for row in ids)
    unbiased, _ = route_topk(F.linear(hidden, router.weight), spec, torch.float32, None)
    assert (unbiased.sort().values != ids.sort().values).any(-1).sum() > 10
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.full((512,), 2.5))


@pytest.fixture(scope="module")
def v3_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("deepseek_v3")
    config = AutoConfig.for_model("deepseek_v3", **TINY_V3)
    model = build_model(config, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    write_tokenizer(out, config.vocab_size)
    return str(out)


def test_tiny_v3_tokens_and_logits_match_transformers(v3_model):
    spec = load_spec(v3_model)
    assert spec.model_type == "deepseek_v3" and spec.mla.q_lora_rank == 24
    engine = Engine(v3_model, dtype="float32", chunked_prefill_size=16)
    hf = hf_reference(v3_model)
    assert parity_problems(engine, hf, PROMPTS, 12, "deepseek_v3") == []
    # The bias is the checkpoint's, in float32, and not zero.
    attn = next(iter(engine.core.attention.values()))
    loaded = attn.layers[1].router_bias
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, hf.model.layers[1].mlp.gate.e_score_correction_bias)


def test_v3_config_options_and_refusals(tmp_path):
    config = json.loads((LITE / "config.json").read_text())
    # A published-style V3 config names its router; V2 fields with V3's router read too.
    v3 = {**config, "model_type": "deepseek_v3", "scoring_func": "sigmoid",
          "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
          "routed_scaling_factor": 2.5}
    (tmp_path / "config.json").write_text(json.dumps(v3))
    spec = load_spec(tmp_path)
    assert spec.router == dataclasses.replace(spec.router, topk_method="noaux_tc", n_group=8,
                                              topk_group=4, routed_scaling_factor=2.5,
                                              scoring_func="sigmoid")
    for fields, message in (({"rope_interleave": False}, "rope_interleave"),
                            ({"scoring_func": "softmax"}, "scoring_func"),
                            ({"n_group": 3}, "n_group")):
        (tmp_path / "config.json").write_text(json.dumps({**v3, **fields}))
        with pytest.raises(CheckpointError, match=message):
            load_spec(tmp_path)


def test_transformers_checkpoint_reads_without_router_fields(v3_model):
    # transformers' deepseek_v3 config has no scoring_func / topk_method: the type implies them.
    raw = json.loads((Path(v3_model) / "config.json").read_text())
    assert "scoring_func" not in raw and "topk_method" not in raw
    model = AutoModelForCausalLM.from_pretrained(v3_model)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
