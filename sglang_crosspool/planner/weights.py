"""Bytes of one model's weights, split the way the pools split them.

In: a `ModelSpec` (from config.json only) and a dtype. Out: `Weights`, whose figures carry
their arithmetic:
- attention side (KV-cache pool): embeddings, q/k/v/o (+ biases, q/k norms), RMSNorms,
  routers, lm_head (absent when tied to the embeddings);
- FFN side (weights pool): routed experts, shared experts with their gate, dense MLP layers;
- per-item bytes used by expert placement (one routed expert over all layers, the shared
  expert, the dense MLPs), parameter counts and active bytes per token.

Architectures differ only in small ways (biases, q/k norms, the shared-expert gate); they are
listed in `_ARCHS`. Others are refused by name with the reason, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_crosspool.models.config import ModelSpec
from sglang_crosspool.planner.errors import PlanError
from sglang_crosspool.planner.figure import Figure, num, product, size, total

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class _Arch:
    bias: tuple[str, ...]  # projections that carry a bias when config.attention_bias is set
    qk_norm: str  # "": none; "head": one head_dim vector each for q and k; "full": q_size, kv_size
    shared_gate: bool  # a sigmoid gate (hidden -> 1) in front of the shared expert


_ARCHS = {
    "qwen3_moe": _Arch(("q", "k", "v", "o"), "head", False),
    "qwen2_moe": _Arch(("q", "k", "v"), "", True),
    "olmoe": _Arch(("q", "k", "v", "o"), "full", False),
    "mixtral": _Arch((), "", False),
}

REFUSED = {
    "deepseek_v2": "multi-head latent attention (MLA) caches a compressed latent, not per-head "
    "K/V, and its experts use grouped routing; the planner has no MLA KV layout",
    "deepseek_v3": "multi-head latent attention (MLA) caches a compressed latent, not per-head "
    "K/V, and the checkpoint ships FP8 block-scaled weights; the planner has no MLA KV layout",
    "gpt_oss": "alternating sliding-window layers, attention sinks and MXFP4 experts are not "
    "modelled by the planner",
}


def check_supported(model_type: str, where: str) -> None:
    if model_type in REFUSED:
        raise PlanError(f"{where}: model_type {model_type!r} is not supported: "
                        f"{REFUSED[model_type]}")
    if model_type not in _ARCHS:
        raise PlanError(f"{where}: model_type {model_type!r} is not supported by the planner; "
                        f"supported: {', '.join(sorted(_ARCHS))}")


@dataclass(frozen=True)
class Weights:
    """Weight bytes of one model in one dtype. Attention side + FFN side = total."""

    dtype: str
    embedding: Figure
    lm_head: Figure
    attention: Figure  # q/k/v/o projections, their biases, q/k norms; all layers
    norms: Figure  # input/post-attention RMSNorms of every layer + the final norm
    router: Figure
    attention_side: Figure
    routed_experts: Figure
    shared_experts: Figure  # with their gate
    dense_mlp: Figure
    ffn_side: Figure
    total: Figure
    expert_bytes: Figure  # one routed expert, all MoE layers: the unit of placement
    replicated_bytes: Figure  # attention-side bytes every TP rank keeps whole (norms, router)
    params_total: Figure
    params_active: Figure  # per token: total minus the routed experts not chosen
    active_bytes_per_token: Figure


def model_weights(spec: ModelSpec, dtype: str, name: str) -> Weights:
    check_supported(spec.model_type, f"{spec.path}/config.json")
    arch = _ARCHS[spec.model_type]
    b = DTYPE_BYTES[dtype]
    h, L, d = spec.hidden_size, spec.num_layers, spec.head_dim
    a, g, v = spec.num_heads, spec.num_kv_heads, spec.vocab_size
    n_moe = sum(spec.moe_layers)
    n_dense = L - n_moe
    e, k = spec.num_experts, spec.top_k

    embedding = product((v, "vocab"), (h, "hidden"), (b, "B"))
    if spec.tie_word_embeddings:
        lm_head = Figure(0, "tied to the embedding: 0 B")
    else:
        lm_head = product((v, "vocab"), (h, "hidden"), (b, "B"))

    # Per layer: q (h x a*d), k and v (h x g*d each), o (a*d x h), plus biases and q/k norms.
    proj = h * a * d + 2 * h * g * d + a * d * h
    proj_how = f"({num(h)}x{num(a * d)} q + 2x{num(h)}x{num(g * d)} k,v + {num(a * d)}x{num(h)} o"
    extra = 0
    if spec.attention_bias and arch.bias:
        widths = {"q": a * d, "k": g * d, "v": g * d, "o": h}
        extra += sum(widths[p] for p in arch.bias)
        proj_how += f" + {'/'.join(arch.bias)} bias {num(sum(widths[p] for p in arch.bias))}"
    if arch.qk_norm == "head":
        extra += 2 * d
        proj_how += f" + q,k norm 2x{num(d)}"
    elif arch.qk_norm == "full":
        extra += (a + g) * d
        proj_how += f" + q,k norm {num(a * d)}+{num(g * d)}"
    per_layer = proj + extra
    attention = Figure(per_layer * L * b, f"{L} layers x {proj_how} = {num(per_layer)} params)"
                       f" x {b} B = {size(per_layer * L * b)}")
    norms = Figure((2 * L + 1) * h * b, f"(2 x {L} layers + 1 final) x {num(h)} hidden x {b} B"
                   f" = {size((2 * L + 1) * h * b)}")
    router = product((n_moe, "MoE layers"), (e, "experts"), (h, "hidden"), (b, "B"))
    attention_side = total([("embedding", embedding), ("lm_head", lm_head),
                            ("attention", attention), ("norms", norms), ("router", router)])

    i = spec.moe_intermediate_size
    routed = product((n_moe, "MoE layers"), (e, "experts"), (3, "(gate,up,down)"),
                     (h, "hidden"), (i, "moe_intermediate"), (b, "B"))
    expert = product((n_moe, "MoE layers"), (3, "(gate,up,down)"), (h, "hidden"),
                     (i, "moe_intermediate"), (b, "B"))
    s = spec.shared_expert_intermediate_size
    if s:
        gate = h if arch.shared_gate else 0
        shared_params = n_moe * (3 * h * s + gate)
        gate_how = f" + {num(h)} gate" if gate else ""
        shared = Figure(shared_params * b, f"{n_moe} MoE layers x (3 x {num(h)} hidden x "
                        f"{num(s)} shared_intermediate{gate_how}) x {b} B = "
                        f"{size(shared_params * b)}")
    else:
        shared = Figure(0, "no shared expert: 0 B")
    if n_dense:
        dense = product((n_dense, "dense layers"), (3, "(gate,up,down)"), (h, "hidden"),
                        (spec.dense_intermediate_size, "intermediate"), (b, "B"))
    else:
        dense = Figure(0, "no dense MLP layers: 0 B")
    ffn_side = total([("routed", routed), ("shared", shared), ("dense", dense)])
    whole = total([("attention side", attention_side), ("FFN side", ffn_side)])
    replicated = total([("norms", norms), ("router", router)])

    p_total = Figure(whole.value // b, f"{size(whole.value)} / {b} B = {num(whole.value // b)}"
                     " params")
    idle = routed.value // b * (e - k) // e  # routed experts a token does not visit
    p_active = Figure(p_total.value - idle, f"{num(p_total.value)} - routed "
                      f"{num(routed.value // b)} x ({e} - {k} top_k) / {e} experts = "
                      f"{num(p_total.value - idle)} params")
    active = Figure(p_active.value * b, f"{num(p_active.value)} params x {b} B = "
                    f"{size(p_active.value * b)}")
    return Weights(dtype, embedding, lm_head, attention, norms, router, attention_side, routed,
                   shared, dense, ffn_side, whole, expert, replicated, p_total, p_active, active)


def kv_bytes_per_token(spec: ModelSpec, dtype: str) -> Figure:
    """K and V of one token over all layers (what one token costs in the KV pool)."""
    fig = product((2, "(K,V)"), (spec.num_layers, "layers"), (spec.num_kv_heads, "kv_heads"),
                  (spec.head_dim, "head_dim"), (DTYPE_BYTES[dtype], "B"))
    assert fig.value == spec.kv_bytes_per_token(dtype)  # one formula, two places: keep equal
    return Figure(fig.value, fig.how + "/token")
