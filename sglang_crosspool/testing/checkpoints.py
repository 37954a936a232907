"""Synthesize real Hugging Face MoE checkpoints with random weights.

In: an architecture (``ARCHS``, or ``MLA_ARCHS``), a size (``SIZES``: ``tiny``/``small`` for every
architecture of ARCHS, ``tiny`` for MLA_ARCHS, or the name of a real model whose shapes are
copied from its published config.json), a seed, a dtype, a shard count, an expert layout and
optional config overrides.
Out: a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, holding
config.json, generation_config.json, model.safetensors (or ``model-0000X-of-0000N.safetensors`` +
``model.safetensors.index.json``) and the tokenizer files of ``testing.tokenizer``.

The model is built by transformers itself (``AutoConfig.for_model`` + ``from_config``) and saved
by ``save_pretrained``, so names, shapes and config spellings are exactly what transformers
writes. Two expert layouts:

* ``per_expert``: what ``save_pretrained`` writes by default, one 2-D tensor per expert, e.g.
  ``model.layers.0.mlp.experts.3.gate_proj.weight`` or, for Mixtral,
  ``model.layers.0.block_sparse_moe.experts.3.w1.weight`` (the layout of published checkpoints).
* ``fused``: transformers' in-memory names, written as they are
  (``save_pretrained(save_original_format=False)``): ``...mlp.experts.gate_up_proj`` [E, 2*I, H]
  (gate rows, then up rows) and ``...mlp.experts.down_proj`` [E, H, I]; Mixtral's router is then
  ``...mlp.gate.weight`` too.

Tiny models take well under a second on a CPU. Real shapes are meant for ``device="cuda"``: the
model is initialised on the device, and saving the per_expert layout needs about 1.6x its bytes
there (transformers copies the split gate/up halves before writing; fused needs 1.0x). Full
Mixtral-8x7B (93 GB in bf16) and Qwen3-30B-A3B (61 GB) overflow a 64 GB disk, so shrink them with
an override such as ``num_hidden_layers=8``.

``make_config_only`` writes a folder for ``load_format="dummy"`` instead: a real config.json
(optionally with fewer layers or other fields changed) and the tokenizer, no weights.

Config spellings are transformers 5's: ``rope_parameters`` instead of ``rope_theta``, and Qwen3-MoE
configs store ``num_local_experts`` (``num_experts`` is an alias) where published ones say
``num_experts``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from sglang_crosspool.testing.tokenizer import (
    ENDOFTEXT,
    IM_END,
    get_tokenizer,
    write_tokenizer,
)

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
# Multi-head latent attention (DeepSeek-V2): CPU attention only so far, so kept out of ARCHS,
# which tests iterate over every attention backend and transport.
MLA_ARCHS = ("deepseek_v2",)
ALL_ARCHS = ARCHS + MLA_ARCHS
EXPERT_LAYOUTS = ("per_expert", "fused")
TOKENIZER_VOCAB = 1024


def _rope(theta: float) -> dict:
    # transformers 5 keeps rope_theta inside rope_parameters (a bare rope_theta is also accepted).
    return {"rope_type": "default", "rope_theta": theta}


def _yarn(theta: float, factor: float, original: int, mscale: float, mscale_all_dim: float):
    return {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
            "original_max_position_embeddings": original, "beta_fast": 32, "beta_slow": 1,
            "mscale": mscale, "mscale_all_dim": mscale_all_dim}


# A larger init std than HF's 0.02 keeps tiny models' logits and router scores spread out, so
# greedy tokens and top-k experts are not decided by near-ties that rounding could flip.
_TINY_ATTN = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
}
_SMALL_ATTN = {
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "initializer_range": 0.08,
}

# Keyword arguments of AutoConfig.for_model, per size and architecture. The field spellings differ:
# qwen*/olmoe take num_experts, mixtral num_local_experts; mixtral/olmoe size their experts with
# intermediate_size, the qwen models with moe_intermediate_size.
SIZES: dict[str, dict[str, dict]] = {
    "tiny": {
        "qwen3_moe": {
            **_TINY_ATTN,
            "head_dim": 16,
            "num_hidden_layers": 3,
            "num_experts": 8,
            "num_experts_per_tok": 4,
            "norm_topk_prob": True,
            "moe_intermediate_size": 32,
            "intermediate_size": 96,
            "rope_parameters": _rope(1e6),
        },
        "qwen2_moe": {
            **_TINY_ATTN,
            "num_hidden_layers": 2,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "intermediate_size": 96,
            "rope_parameters": _rope(1e6),
        },
        "mixtral": {
            **_TINY_ATTN,
            "num_hidden_layers": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "rope_parameters": _rope(1e6),
        },
        "olmoe": {
            **_TINY_ATTN,
            "num_hidden_layers": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "intermediate_size": 32,
            "rope_parameters": _rope(1e4),
        },
        # DeepSeek-V2-Lite's layout shrunk: no q low-rank, first layer dense, 2 shared experts,
        # YaRN with mscale = mscale_all_dim; the latent (56 + 8 floats) divides a 4 KiB page.
        # Every head has its own keys (num_key_value_heads = heads, transformers' default).
        "deepseek_v2": {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "initializer_range": 0.2,
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "intermediate_size": 96,
            "q_lora_rank": None,
            "kv_lora_rank": 56,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 16,
            "norm_topk_prob": False,
            "topk_method": "greedy",
            "routed_scaling_factor": 1.0,
            "max_position_embeddings": 512,
            "rope_parameters": _yarn(1e4, 4.0, 128, 0.707, 0.707),
        },
    },
    "small": {
        "qwen3_moe": {
            **_SMALL_ATTN,
            "head_dim": 32,
            "num_hidden_layers": 4,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "norm_topk_prob": True,
            "moe_intermediate_size": 128,
            "intermediate_size": 512,
            "rope_parameters": _rope(1e6),
        },
        "qwen2_moe": {
            **_SMALL_ATTN,
            "num_hidden_layers": 4,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 512,
            "intermediate_size": 512,
            "rope_parameters": _rope(1e6),
        },
        "mixtral": {
            **_SMALL_ATTN,
            "num_hidden_layers": 4,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "intermediate_size": 512,
            "rope_parameters": _rope(1e6),
        },
        "olmoe": {
            **_SMALL_ATTN,
            "num_hidden_layers": 4,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,
            "intermediate_size": 128,
            "rope_parameters": _rope(1e4),
        },
    },
    # Shapes copied from the published config.json files (tests/data/model-configs holds them).
    "olmoe-1b-7b": {
        "olmoe": {
            "vocab_size": 50304,
            "hidden_size": 2048,
            "intermediate_size": 1024,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "norm_topk_prob": False,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "clip_qkv": None,
            "rope_parameters": _rope(10000.0),
        },
    },
    "qwen1.5-moe-a2.7b": {
        "qwen2_moe": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "max_position_embeddings": 8192,
            "max_window_layers": 21,
            "sliding_window": 4096,
            "use_sliding_window": False,
            "rms_norm_eps": 1e-6,
            "rope_parameters": _rope(1000000.0),
        },
    },
    "qwen3-30b-a3b": {
        "qwen3_moe": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_parameters": _rope(1000000.0),
        },
    },
    "deepseek-v2-lite": {
        "deepseek_v2": {
            "vocab_size": 102400,
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "first_k_dense_replace": 1,
            "q_lora_rank": None,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "norm_topk_prob": False,
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "max_position_embeddings": 163840,
            "rms_norm_eps": 1e-6,
            "rope_parameters": _yarn(10000.0, 40.0, 4096, 0.707, 0.707),
        },
    },
    "mixtral-8x7b": {
        "mixtral": {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "rope_parameters": _rope(1000000.0),
        },
    },
}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if isinstance(value, torch.dtype):
        return value
    raise ValueError(f"unknown dtype {dtype!r}")


def _special_ids(tokenizer_vocab: int) -> dict[str, int]:
    tok = get_tokenizer(tokenizer_vocab)
    return {t: tok.token_to_id(t) for t in (ENDOFTEXT, IM_END)}


def _default_vocab(size: str, arch: str) -> int:
    """Tiny/small use the tokenizer's vocabulary, real sizes the real model's."""
    spec = SIZES[size][arch]
    if "vocab_size" in spec:
        return spec["vocab_size"]
    n = get_tokenizer(TOKENIZER_VOCAB).get_vocab_size()
    return 64 * math.ceil(n / 64)  # rounded up like real vocabularies, for aligned matmuls


def build_config(
    arch: str, size: str = "tiny", vocab_size: int | None = None, **overrides
) -> PretrainedConfig:
    """The transformers config for (arch, size), with overrides applied last."""
    if arch not in ALL_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ALL_ARCHS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    if arch not in SIZES[size]:
        raise ValueError(f"size {size!r} exists only for {tuple(SIZES[size])}, not {arch!r}")
    vocab = vocab_size or _default_vocab(size, arch)
    # The tokenizer never has more ids than the model, so every id it emits is a valid row.
    ids = _special_ids(min(vocab, TOKENIZER_VOCAB))
    kwargs = dict(SIZES[size][arch])
    kwargs.update(
        vocab_size=vocab,
        tie_word_embeddings=False,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


@torch.no_grad()
def _perturb_identity_params(model: torch.nn.Module, bias_std: float) -> None:
    """Move norm weights off 1 and biases off 0, which HF initialises to exactly that.

    An engine that forgot a norm weight or a qkv bias would otherwise still match the reference.
    """
    for name, param in model.named_parameters():
        module_name = name.split(".")[-2]
        if "norm" in module_name and name.endswith(".weight"):
            param.add_(torch.randn_like(param), alpha=0.1)
        elif name.endswith(".bias"):
            param.normal_(0.0, bias_std)


def build_model(
    config: PretrainedConfig,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
):
    """The random-weight model make_model saves (same seed, dtype and device: same weights).

    CPU and CUDA draw different random numbers, so the device is part of the recipe.
    """
    torch.manual_seed(seed)
    # Creating the parameters on the target device makes random init of real shapes fast on GPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
    _perturb_identity_params(model, config.initializer_range)
    return model.eval()


def _state_dict_as_saved(model, layout: str) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained will split into shards, under the names it will write."""
    state_dict = model.state_dict()
    if layout == "fused":
        return state_dict
    try:  # private transformers helper; only used to predict the shard split
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state_dict
    return revert_weight_conversion(model, state_dict)


def _shard_count(state_dict: dict[str, torch.Tensor], limit: int) -> int:
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=limit)
    return len(split.filename_to_tensors)


def _shard_limit(state_dict: dict[str, torch.Tensor], num_shards: int) -> int:
    """Smallest max_shard_size giving at most num_shards shards (exactly num_shards if possible).

    The hub splitter packs tensors greedily in order, so the shard count only falls as the limit
    grows and a bisection finds the limit.
    """
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    lo, hi = 1, total
    while lo < hi:
        mid = (lo + hi) // 2
        if _shard_count(state_dict, mid) <= num_shards:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _clear_old_weights(out: Path) -> None:
    # A previous run with another shard count would leave files that confuse loaders.
    for path in out.glob("model*.safetensors*"):
        path.unlink()


def _check_shards(out: Path, num_shards: int) -> None:
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    if num_shards == 1 and not (out / "model.safetensors").is_file():
        raise RuntimeError(f"expected one model.safetensors in {out}, got {len(shards)} shards")
    if num_shards > 1 and (len(shards) < 2 or not (out / "model.safetensors.index.json").is_file()):
        raise RuntimeError(f"asked for {num_shards} shards, got {len(shards)} in {out}")
    if num_shards > 1 and len(shards) != num_shards:
        warnings.warn(
            f"asked for {num_shards} shards, tensor sizes allowed {len(shards)}", stacklevel=3
        )


def _save_weights(model, out: Path, num_shards: int, layout: str) -> None:
    limit = "1000GB"
    if num_shards > 1:
        limit = _shard_limit(_state_dict_as_saved(model, layout), num_shards)
    _clear_old_weights(out)
    model.save_pretrained(out, max_shard_size=limit, save_original_format=(layout == "per_expert"))
    _check_shards(out, num_shards)


def _generation_config(config: PretrainedConfig, ids: dict[str, int]) -> GenerationConfig:
    # Chat models stop on <|im_end|>, base models on <|endoftext|>; accept both as Qwen does.
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=config.pad_token_id,
    )


def make_model(
    out_dir: str | os.PathLike,
    arch: str,
    size: str = "tiny",
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    num_shards: int = 1,
    expert_layout: str = "per_expert",
    vocab_size: int | None = None,
    device: str = "cpu",
    **overrides,
) -> Path:
    """Write a random-weight HF checkpoint of (arch, size) into out_dir and return its path."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert_layout {expert_layout!r}; expected {EXPERT_LAYOUTS}")
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    config = build_config(arch, size, vocab_size=vocab_size, **overrides)
    tokenizer_vocab = min(config.vocab_size, TOKENIZER_VOCAB)
    model = build_model(config, seed, dtype, device)
    model.generation_config = _generation_config(config, _special_ids(tokenizer_vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(model, out, num_shards, expert_layout)
    write_tokenizer(out, tokenizer_vocab)
    return out


def make_config_only(
    out_dir: str | os.PathLike,
    from_config: str | os.PathLike,
    num_hidden_layers: int | None = None,
    **overrides,
) -> Path:
    """Write `from_config` (a config.json, or a folder holding one) into out_dir, with
    num_hidden_layers and other fields overridden, plus the test tokenizer; no weights.

    The folder serves with ``load_format="dummy"``. The tokenizer has at most the config's
    vocab_size ids (TOKENIZER_VOCAB for real vocabularies), so every id it emits is a row of
    the embedding; ids it lacks, which a model may generate, decode to nothing.
    """
    src = Path(from_config)
    if src.is_dir():
        src = src / "config.json"
    config = json.loads(src.read_text())
    if num_hidden_layers is not None:
        overrides["num_hidden_layers"] = num_hidden_layers
    config.update(overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_old_weights(out)  # a weight file left here would not be used, and would mislead
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out, min(int(config["vocab_size"]), TOKENIZER_VOCAB))
    return out


def hf_reference(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The HF model the engine is tested against: eager attention, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation="eager"
    )
    return model.eval()
