"""Architecture-neutral view of a Hugging Face MoE checkpoint's config.json.

In: a checkpoint directory (config.json, optional generation_config.json).
Out: a frozen `ModelSpec` with every number the engine, the KV pool and the planner need.

Checkpoints spell some fields differently across families and transformers versions
(`num_experts` / `num_local_experts` / `n_routed_experts`, `rope_theta` / `rope_parameters`);
each field is read from the first spelling present, and a missing or malformed field raises
`CheckpointError` naming the file and the field.

DeepSeek-V2 adds multi-head latent attention (`MLASpec`), YaRN rotary scaling (`YarnRope`) and
grouped top-k routing (`RouterSpec`); DeepSeek-V3 the same, with sigmoid routing and a score
correction bias. For an MLA model `num_kv_heads` and `head_dim` describe
what the KV cache holds per token and layer: one latent "head" of kv_lora_rank + rope dims.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: unsupported architecture or malformed files."""


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Architectures whose models apply YaRN rotary scaling; elsewhere it is refused, not ignored.
_YARN_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# (scoring_func, topk_method) pairs with a known meaning: DeepSeek-V2's softmax routers and
# DeepSeek-V3's sigmoid one with a score-correction bias (transformers' deepseek_v3 config has
# neither field: that model type implies the latter).
_ROUTERS = {("softmax", "greedy"), ("softmax", "group_limited_greedy"), ("sigmoid", "noaux_tc")}


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2): q through an optional low-rank (q_lora_rank),
    keys and values from one shared latent of kv_lora_rank plus a roped key of rope dims."""

    q_lora_rank: int | None  # None: q_proj straight from the hidden states
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token and layer: the normalized latent, then the roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class YarnRope:
    """YaRN rotary scaling, the fields of `rope_parameters` (or `rope_scaling`) as given."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class RouterSpec:
    """How the router picks experts from its scores (DeepSeek's options)."""

    topk_method: str = "greedy"  # or "group_limited_greedy": top-k within the best groups,
    # or "noaux_tc" (DeepSeek-V3): groups ranked by their two best biased scores
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"  # or "sigmoid" (with noaux_tc and e_score_correction_bias)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and options of one MoE decoder-only model (derived once from config.json)."""

    model_type: str
    path: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int  # 0: no shared expert
    dense_intermediate_size: int  # for layers that are dense MLPs (mlp_only_layers)
    moe_layers: tuple[bool, ...]  # per layer: True for a sparse MoE block
    attention_bias: bool
    clip_qkv: float | None
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    checkpoint_dtype: str
    mla: MLASpec | None = None  # None: attention with K and V heads
    yarn: YarnRope | None = None  # None: the default rotary embedding
    router: RouterSpec = RouterSpec()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_latent(self) -> bool:
        """The KV cache holds one latent per token and layer (K range only, no V range)."""
        return self.mla is not None

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V (or the MLA latent) of one token across all layers."""
        ranges = 1 if self.kv_latent else 2
        return ranges * self.num_layers * self.kv_size * _DTYPE_BYTES[dtype]


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class ConfigReader:
    """Reads fields from one config.json, trying alternative spellings, with clear errors."""

    _MISSING = object()

    def __init__(self, raw: dict[str, Any], file: Path):
        self.raw = raw
        self.file = file

    def get(self, *names: str, default: Any = _MISSING, kind: type | tuple = (int,)) -> Any:
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                value = self.raw[name]
                kinds = _tuple(kind)
                is_bool_for_number = isinstance(value, bool) and bool not in kinds
                if not isinstance(value, kinds) or is_bool_for_number:
                    raise CheckpointError(
                        f"{self.file}: field '{name}' has value {value!r}, expected {_names(kind)}"
                    )
                return value
        if default is self._MISSING:
            raise CheckpointError(f"{self.file}: missing field '{' or '.join(names)}'")
        return default

    def positive(self, *names: str, default: Any = _MISSING) -> int:
        value = self.get(*names, default=default)
        if value <= 0:
            raise CheckpointError(f"{self.file}: field '{names[0]}' must be > 0, got {value}")
        return value


def _tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind) -> str:
    return " or ".join(k.__name__ for k in _tuple(kind))


def _rope(cfg: ConfigReader, yarn_ok: bool) -> tuple[float, YarnRope | None]:
    """rope_theta, and the YaRN parameters where the config asks for YaRN."""
    params = cfg.raw.get("rope_parameters") or cfg.raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{cfg.file}: field 'rope_parameters' must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    supported = ("default", None, "yarn") if yarn_ok else ("default", None)
    if rope_type not in supported:
        only = "the default rotary embedding and YaRN are" if yarn_ok else \
            "only the default rotary embedding is"
        raise CheckpointError(
            f"{cfg.file}: field 'rope_parameters.rope_type' = {rope_type!r} is not supported "
            f"({only})"
        )
    theta = params.get("rope_theta", cfg.raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(f"{cfg.file}: field 'rope_theta' must be a positive number")
    return float(theta), _yarn(cfg, params) if rope_type == "yarn" else None


def _yarn(cfg: ConfigReader, params: dict) -> YarnRope:
    rope = ConfigReader(params, cfg.file)
    number = (int, float)
    factor = rope.get("factor", kind=number)
    if factor <= 0:
        raise CheckpointError(f"{cfg.file}: field 'rope_parameters.factor' must be > 0")
    # transformers falls back to max_position_embeddings, as here.
    original = rope.get("original_max_position_embeddings",
                        default=cfg.get("max_position_embeddings", default=4096))
    optional = {name: rope.get(name, default=None, kind=number)
                for name in ("mscale", "mscale_all_dim", "attention_factor")}
    return YarnRope(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast", default=32, kind=number)),
        beta_slow=float(rope.get("beta_slow", default=1, kind=number)),
        truncate=rope.get("truncate", default=True, kind=bool),
        **optional,
    )


def _mla(cfg: ConfigReader) -> MLASpec | None:
    if "kv_lora_rank" not in cfg.raw:
        return None
    q_lora = cfg.get("q_lora_rank", default=None)
    if q_lora is not None and q_lora <= 0:
        raise CheckpointError(f"{cfg.file}: field 'q_lora_rank' must be > 0 or null")
    return MLASpec(
        q_lora_rank=q_lora,
        kv_lora_rank=cfg.positive("kv_lora_rank"),
        qk_nope_head_dim=cfg.positive("qk_nope_head_dim"),
        qk_rope_head_dim=cfg.positive("qk_rope_head_dim"),
        v_head_dim=cfg.positive("v_head_dim"),
    )


def _router(cfg: ConfigReader, num_experts: int, model_type: str) -> RouterSpec:
    v3 = model_type == "deepseek_v3"
    scoring = cfg.get("scoring_func", default="sigmoid" if v3 else "softmax", kind=str)
    if scoring not in ("softmax", "sigmoid"):
        raise CheckpointError(f"{cfg.file}: field 'scoring_func' = {scoring!r} is not supported "
                              "(softmax and sigmoid are)")
    method = cfg.get("topk_method", default="noaux_tc" if v3 else "greedy", kind=str)
    if method not in _TOPK_METHODS:
        raise CheckpointError(f"{cfg.file}: field 'topk_method' = {method!r} is not supported; "
                              f"supported: {', '.join(_TOPK_METHODS)}")
    if (scoring, method) not in _ROUTERS:
        raise CheckpointError(f"{cfg.file}: scoring_func {scoring!r} with topk_method "
                              f"{method!r} is not supported; supported pairs: "
                              f"{', '.join(f'{a}/{b}' for a, b in sorted(_ROUTERS))}")
    n_group, topk_group = 1, 1
    if method in ("group_limited_greedy", "noaux_tc"):
        n_group, topk_group = cfg.positive("n_group"), cfg.positive("topk_group")
        if num_experts % n_group or topk_group > n_group:
            raise CheckpointError(
                f"{cfg.file}: group-limited routing needs n_group ({n_group}) to divide the "
                f"experts ({num_experts}) and topk_group ({topk_group}) <= n_group")
    scale = cfg.get("routed_scaling_factor", default=1.0, kind=(int, float))
    return RouterSpec(method, n_group, topk_group, float(scale), scoring)


def _eos_ids(config: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (generation, config):
        value = source.get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return tuple(ids)


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Parses `model_dir/config.json` (+ generation_config.json) into a `ModelSpec`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    file = model_dir / "config.json"
    raw = read_json(file)
    gen_file = model_dir / "generation_config.json"
    generation = read_json(gen_file) if gen_file.exists() else {}
    cfg = ConfigReader(raw, file)
    model_type = cfg.get("model_type", kind=str)

    hidden = cfg.positive("hidden_size")
    num_heads = cfg.positive("num_attention_heads")
    num_kv_heads = cfg.positive("num_key_value_heads", default=num_heads)
    head_dim = cfg.get("head_dim", default=None) or hidden // num_heads
    if num_heads % num_kv_heads:
        raise CheckpointError(
            f"{file}: num_attention_heads ({num_heads}) is not a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    num_layers = cfg.positive("num_hidden_layers")
    num_experts = cfg.positive("num_experts", "num_local_experts", "n_routed_experts")
    top_k = cfg.positive("num_experts_per_tok")
    if top_k > num_experts:
        raise CheckpointError(f"{file}: num_experts_per_tok ({top_k}) > num_experts")
    dense_intermediate = cfg.get("intermediate_size", default=0)
    moe_intermediate = cfg.get("moe_intermediate_size", default=0) or dense_intermediate
    if moe_intermediate <= 0:
        raise CheckpointError(f"{file}: missing field 'moe_intermediate_size' or 'intermediate_size'")
    sparse_step = cfg.get("decoder_sparse_step", default=1)
    mlp_only = set(cfg.get("mlp_only_layers", default=[], kind=list))
    # DeepSeek: the first first_k_dense_replace layers are dense, then every moe_layer_freq-th.
    first_dense = cfg.get("first_k_dense_replace", default=0)
    moe_freq = max(cfg.get("moe_layer_freq", default=1), 1)
    moe_layers = tuple(
        i not in mlp_only and (i + 1) % max(sparse_step, 1) == 0 and i >= first_dense
        and i % moe_freq == 0
        for i in range(num_layers)
    )
    if not all(moe_layers) and dense_intermediate <= 0:
        raise CheckpointError(f"{file}: dense layers need field 'intermediate_size'")
    window_on = raw.get("use_sliding_window", model_type == "mixtral")
    if window_on and raw.get("sliding_window"):
        raise CheckpointError(
            f"{file}: field 'sliding_window' = {raw['sliding_window']}: sliding-window attention "
            "is not supported"
        )
    dtype = raw.get("torch_dtype", raw.get("dtype", "float32"))
    bias = cfg.get("attention_bias", "qkv_bias", default=model_type == "qwen2_moe", kind=bool)
    rope_theta, yarn = _rope(cfg, model_type in _YARN_MODEL_TYPES)
    mla = _mla(cfg) if model_type in _MLA_MODEL_TYPES else None
    if model_type == "deepseek_v3" and raw.get("rope_interleave", True) is False:
        raise CheckpointError(f"{file}: field 'rope_interleave' = false is not supported (RoPE "
                              "runs on adjacent pairs, DeepSeek's layout)")
    if mla is not None:  # the cache holds one latent per token (num_key_value_heads is unused)
        num_kv_heads, head_dim = 1, mla.latent_dim
    shared = cfg.get("shared_expert_intermediate_size", default=0) or \
        cfg.get("n_shared_experts", default=0) * moe_intermediate
    return ModelSpec(
        model_type=model_type,
        path=str(model_dir),
        vocab_size=cfg.positive("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", default=1e-6, kind=(int, float))),
        rope_theta=rope_theta,
        max_position_embeddings=cfg.positive("max_position_embeddings", default=4096),
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=moe_intermediate,
        norm_topk_prob=cfg.get("norm_topk_prob", default=model_type in ("mixtral", "deepseek_v3"),
                               kind=bool),
        shared_expert_intermediate_size=shared,
        dense_intermediate_size=dense_intermediate,
        moe_layers=moe_layers,
        attention_bias=bias,
        clip_qkv=cfg.get("clip_qkv", default=None, kind=(int, float)),
        tie_word_embeddings=cfg.get("tie_word_embeddings", default=False, kind=bool),
        eos_token_ids=_eos_ids(raw, generation),
        bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
        checkpoint_dtype=dtype if dtype in _DTYPE_BYTES else "float32",
        mla=mla,
        yarn=yarn,
        router=_router(cfg, num_experts, model_type),
    )
