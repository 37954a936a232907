"""DeepSeek-V2 (MLA): tokens and logits against transformers, the latent KV cache in the shared
pool, YaRN and routing against transformers' formulas, and every pool mode on CPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sglang_crosspool import Engine
from sglang_crosspool.memory.kv_pool import KVPool, KVPoolError
from sglang_crosspool.memory.page_backend import SimulatedPageBackend
from sglang_crosspool.models.config import CheckpointError, load_spec
from sglang_crosspool.models.deepseek_v2 import (
    rope_frequencies,
    route_topk,
    softmax_scale,
)
from sglang_crosspool.testing.checkpoints import (
    MLA_ARCHS,
    build_config,
    hf_reference,
    make_model,
)
from sglang_crosspool.testing.multimodel import run_all
from sglang_crosspool.testing.parity import PARITY_PROMPTS, parity_problems

ARCH = "deepseek_v2"
LITE = Path(__file__).resolve().parents[1] / "data" / "model-configs" / "DeepSeek-V2-Lite"
PROMPTS = PARITY_PROMPTS
NEW_TOKENS = 16
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}

# The tiny size as it is (greedy routing, q straight from q_proj, mscale = mscale_all_dim), and
# a variant with every other option: group-limited routing, q through its low rank, biases,
# routed_scaling_factor, and YaRN's attention factor != 1 on cos/sin.
VARIANTS = {
    "greedy": {},
    "grouped": {
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 1.5, "q_lora_rank": 24, "attention_bias": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                            "original_max_position_embeddings": 128, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707},
    },
}


@pytest.fixture(scope="module")
def ds_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("deepseek")
    return {name: str(make_model(root / name, ARCH, seed=1, **fields))
            for name, fields in VARIANTS.items()}


# -- parity with transformers ------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_and_logits_match_hf(ds_models, variant):
    # Chunks of 16 split the longer prompts, so prefills continue over cached latents.
    engine = Engine(ds_models[variant], dtype="float32", chunked_prefill_size=16)
    hf = hf_reference(ds_models[variant])
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    assert parity_problems(engine, hf, PROMPTS, NEW_TOKENS, variant) == []
    assert engine.stats()["kv"]["used_pages"] == 0


def test_fused_expert_layout_gives_the_same_tokens(ds_models, tmp_path):
    fused = make_model(tmp_path / "fused", ARCH, seed=1, expert_layout="fused",
                       **VARIANTS["grouped"])
    outs = [[o["output_ids"] for o in Engine(str(p)).generate(
        input_ids=PROMPTS[:3], sampling_params=GREEDY)] for p in (ds_models["grouped"], fused)]
    assert outs[0] == outs[1]


def test_latent_attention_serves_whatever_backend_is_named(ds_models):
    from sglang_crosspool.engine.attention_mla import LatentAttention

    outs = []
    for backend in ("torch", "triton"):
        engine = Engine(ds_models["greedy"], attention_backend=backend)
        assert all(isinstance(r.backend, LatentAttention) for r in engine.core.runners.values())
        outs.append([o["output_ids"] for o in engine.generate(input_ids=PROMPTS[:2],
                                                              sampling_params=GREEDY)])
    assert outs[0] == outs[1]


def test_yarn_tables_and_softmax_scale_match_transformers(ds_models):
    from transformers import AutoConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2RotaryEmbedding,
        yarn_apply_mscale,
    )

    for path in (str(LITE), ds_models["grouped"]):
        config = AutoConfig.from_pretrained(path)
        spec = load_spec(path)
        hf = DeepseekV2RotaryEmbedding(config)
        inv_freq, factor = rope_frequencies(spec.mla.qk_rope_head_dim, spec.rope_theta, spec.yarn)
        assert torch.allclose(inv_freq, hf.inv_freq, rtol=1e-6, atol=0)
        assert factor == pytest.approx(hf.attention_scaling, rel=1e-12)
        expected = yarn_apply_mscale(config.rope_parameters, config.qk_head_dim**-0.5)
        assert softmax_scale(spec) == pytest.approx(expected, rel=1e-12)
    # The variant's mscale differs from mscale_all_dim: cos/sin are scaled too.
    assert rope_frequencies(8, 1e4, load_spec(ds_models["grouped"]).yarn)[1] > 1.0


# -- config and routing ------------------------------------------------------------------------

def test_lite_config_reads_as_mla():
    spec = load_spec(LITE)
    mla = spec.mla
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_rope_head_dim) == (None, 512, 64)
    assert mla.qk_head_dim == 192 and mla.latent_dim == 576
    # The cache geometry is the latent: one "head" of 576 values, not 16 heads of K and V.
    assert (spec.num_kv_heads, spec.head_dim) == (1, 576) and spec.kv_latent
    assert spec.kv_bytes_per_token("bfloat16") == 27 * 576 * 2
    assert spec.moe_layers == (False,) + (True,) * 26
    assert (spec.num_experts, spec.top_k, spec.moe_intermediate_size) == (64, 6, 1408)
    assert spec.shared_expert_intermediate_size == 2 * 1408
    assert spec.dense_intermediate_size == 10944
    assert spec.yarn.factor == 40 and spec.yarn.original_max_position_embeddings == 4096
    assert spec.router.topk_method == "greedy" and not spec.norm_topk_prob


def test_lite_size_matches_the_published_config():
    published = json.loads((LITE / "config.json").read_text())
    config = build_config(ARCH, "deepseek-v2-lite")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                  "first_k_dense_replace", "topk_method", "routed_scaling_factor",
                  "max_position_embeddings"):
        assert getattr(config, field) == published[field], field
    for key in ("factor", "mscale", "mscale_all_dim", "original_max_position_embeddings"):
        assert config.rope_parameters[key] == published["rope_scaling"][key], key
    assert MLA_ARCHS == (ARCH,)


@pytest.mark.parametrize("fields, message", [
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "n_group"),
])
def test_unsupported_routing_is_refused_by_name(tmp_path, fields, message):
    config = json.loads((LITE / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(CheckpointError, match=message):
        load_spec(tmp_path)


def test_yarn_is_refused_for_architectures_that_do_not_apply_it(tmp_path):
    config = json.loads((LITE.parent / "Qwen3-30B-A3B" / "config.json").read_text())
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'yarn' is not supported"):
        load_spec(tmp_path)


def test_group_limited_routing_stays_in_the_best_groups(ds_models):
    spec = load_spec(ds_models["grouped"])  # 8 experts in 4 groups, 2 groups kept, top-3
    logits = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    ids, weights = route_topk(logits, spec, torch.float32)
    scores = torch.softmax(logits, dim=-1)
    best_groups = scores.view(256, 4, 2).amax(-1).topk(2, dim=-1).indices
    assert all(set((row // 2).tolist()) <= set(groups.tolist())
               for row, groups in zip(ids, best_groups))
    assert torch.allclose(weights, scores.gather(1, ids) * 1.5)
    greedy_ids = scores.topk(3, dim=-1).indices
    assert (ids.sort().values != greedy_ids.sort().values).any(dim=-1).sum() > 10
    # norm_topk_prob renormalizes instead of scaling (DeepSeek's own code).
    normed = dataclasses.replace(spec, norm_topk_prob=True)
    _, weights = route_topk(logits, normed, torch.float32)
    assert torch.allclose(weights.sum(-1), torch.ones(256))


def test_cuda_takes_the_triton_mla_path():
    pytest.importorskip("triton")
    from sglang_crosspool.engine.attention_mla import TritonLatentAttention, make_latent_attention

    spec = load_spec(LITE)
    # Whatever backend the engine names (FlashInfer's MLA kernels are not wired).
    backend = make_latent_attention(None, "cuda", spec.num_heads, spec.mla.latent_dim,
                                     spec.mla.kv_lora_rank, softmax_scale(spec), torch.bfloat16)
    assert isinstance(backend, TritonLatentAttention) and backend.supports_graphs
    assert (backend.head_dim, backend.value_dim) == (576, 512)


def test_prefill_in_query_chunks_gives_the_same_tokens(ds_models, monkeypatch):
    # The torch path bounds its scores by chunking queries (long prefills on GPU).
    from sglang_crosspool.engine import attention_mla

    engine = Engine(ds_models["greedy"], dtype="float32", chunked_prefill_size=64)
    whole = engine.generate(input_ids=PROMPTS[3], sampling_params=GREEDY)["output_ids"]
    monkeypatch.setattr(attention_mla, "_SCORE_ELEMENTS", 4 * 40 * 3)  # 3 queries a chunk
    assert engine.generate(input_ids=PROMPTS[3], sampling_params=GREEDY)["output_ids"] == whole


# -- the latent KV cache -----------------------------------------------------------------------

def test_lite_latent_cache_holds_576_values_per_token_and_layer():
    spec = load_spec(LITE)
    slot = spec.num_kv_heads * spec.head_dim * 2  # bf16
    pool = KVPool(SimulatedPageBackend(page_bytes=16 * slot), total_pages=27 * 4)
    kv = pool.add_model("lite", spec.num_layers, spec.num_kv_heads, spec.head_dim,
                        torch.bfloat16, max_tokens=1000, latent=spec.kv_latent)
    assert kv.k[0].shape[1:] == (1, 576) and kv.v is kv.k and kv.v_ranges == []
    assert pool.block_tokens("lite") == 16
    assert kv.pages_per_block == 27  # one latent page per layer, not K and V pages
    assert pool.max_blocks("lite") == 4
    blocks = pool.alloc_blocks("lite", 4)
    assert pool.used_pages == 108 and pool.free_pages == 0
    assert pool.stats()["models"]["lite"]["tokens_capacity_in_use"] == 64
    assert spec.kv_bytes_per_token("bfloat16") * 64 == pool.stats()["used_bytes"]
    pool.free_blocks("lite", blocks)
    assert pool.used_pages == 0
    with pytest.raises(KVPoolError, match="latent of one layer is 1152 bytes"):
        KVPool(SimulatedPageBackend(page_bytes=4096), 10).add_model(
            "x", 1, 1, 576, torch.bfloat16, max_tokens=10, latent=True)


def test_engine_caches_latents_only(ds_models):
    engine = Engine(ds_models["greedy"], dtype="float32")
    name = engine.config.model_names[0]
    kv = engine.core.kv_pool.models[name]
    assert kv.latent and kv.pages_per_block == 3 and kv.v is kv.k
    assert kv.k[0].shape[1:] == (1, 56 + 8)
    engine.generate(input_ids=PROMPTS[3], sampling_params={**GREEDY, "max_new_tokens": 2})
    assert engine.stats()["kv"]["used_pages"] == 0


# -- pool modes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(ds_models, tiny_models):
    """DeepSeek (latent cache) next to OLMoE (K and V) in one pool, and the monolithic run."""
    paths, names = [ds_models["grouped"], tiny_models["olmoe"]], (ARCH, "olmoe")
    return paths, names, run_all(paths, names=names, pool_mode="monolithic")


@pytest.mark.parametrize("options", [
    dict(pool_mode="static"),
    dict(pool_mode="crosspool", ffn_servers=3, ffn_transport="local"),
    dict(pool_mode="crosspool", ffn_servers=2, ffn_transport="local", pipeline_microbatches=2),
    dict(pool_mode="crosspool", ffn_servers=2, ffn_transport="shm", pipeline_microbatches=2),
], ids=["static", "crosspool-local", "crosspool-local-pipelined", "crosspool-shm"])
def test_pool_modes_match_monolithic(mixed, options):
    paths, names, (reference, ref_stats) = mixed
    outputs, stats = run_all(paths, names=names, **options)
    assert outputs == reference
    assert stats["kv"]["used_pages"] == 0
    assert sum(stats["ffn_bytes_per_server"]) == ref_stats["ffn_bytes_here"]
    if options.get("ffn_transport") == "shm":  # the experts live in the server processes
        assert stats["ffn_bytes_here"] == 0
