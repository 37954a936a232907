"""DeepSeek-V2: multi-head latent attention (MLA), YaRN rotary, dense first layers, shared
experts without a gate, softmax routing with greedy or group-limited top-k.

Attention half of a layer, in the absorbed form (kv_b_proj's key rows are folded into the
query and its value rows into the output, so attention runs on the cached latent itself):

    h -> q_proj, or q_a_proj -> RMSNorm -> q_b_proj      -> per head [q_nope | q_pe]
    h -> kv_a_proj_with_mqa                              -> [c_kv (r) | k_pe (p)]
    c_kv -> kv_a_layernorm;  q_pe, k_pe -> RoPE on adjacent pairs (YaRN tables)
    KV pool <- [c_kv | k_pe]                             r + p values per token and layer
    q_lat = q_nope @ W_uk (per head, r wide)
    o_lat = softmax([q_lat | q_pe] . [c_kv | k_pe] * scale) @ c_kv    (engine/attention_mla.py:
                                         torch, or on CUDA the Triton kernel mla_decode)
    o = o_proj(o_lat @ W_uv^T)

which equals transformers' form (keys and values decompressed through kv_b_proj) up to float
rounding. Under tensor parallelism a rank holds its heads' rows of q_proj (q_b_proj) and
kv_b_proj and its columns of o_proj; kv_a_proj and the latent cache are whole on every rank
(the latent is one "head": replicated tp_size times, which the KV report counts). Numerics follow transformers' DeepseekV2: RoPE in float32 on (x0, x1), (x2, x3), ...
pairs, cos/sin scaled by YaRN's attention factor, and the softmax scale multiplied by
mscale(factor, mscale_all_dim)^2.

Routing: softmax scores in float32; `group_limited_greedy` keeps the experts of the topk_group
groups with the best single score; weights are renormalized where norm_topk_prob is set (and
top_k > 1), else multiplied by routed_scaling_factor, as DeepSeek's own code does (transformers
ignores norm_topk_prob, which every published DeepSeek-V2 config sets to false).

DeepSeek-V3 (model_type deepseek_v3, the same layers) routes as transformers' DeepseekV3 does,
`noaux_tc`: sigmoid scores in float32; the per-layer e_score_correction_bias (kept in float32)
is added for the choice only: groups are ranked by the sum of their two best biased scores, the
topk_group best kept, top-k taken among their experts by biased score; the weights are the
unbiased scores of those experts, renormalized where norm_topk_prob is set, then always
multiplied by routed_scaling_factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_crosspool.models.common import AttentionHalf, FFNHalf, Routing, rms_norm
from sglang_crosspool.models.config import ModelSpec, YarnRope
from sglang_crosspool.models.registry import Architecture

_LORA_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm use RMSNorm's default, not the config's


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, yarn: YarnRope | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor that scales cos and sin."""
    wavelengths = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / wavelengths
    if yarn is None:
        return inv_freq, 1.0
    # YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp in between.
    def correction_dim(rotations: float) -> float:
        wavelength = yarn.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(wavelength) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate
    inv_freq = 1.0 / (yarn.factor * wavelengths) * (1 - keep) + inv_freq * keep
    if yarn.attention_factor is not None:
        factor = yarn.attention_factor
    elif yarn.mscale and yarn.mscale_all_dim:
        factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor,
                                                                     yarn.mscale_all_dim)
    else:
        factor = yarn_mscale(yarn.factor)
    return inv_freq, float(factor)


def softmax_scale(spec: ModelSpec) -> float:
    scale = spec.mla.qk_head_dim**-0.5
    if spec.yarn is not None and spec.yarn.mscale_all_dim:
        scale *= yarn_mscale(spec.yarn.factor, spec.yarn.mscale_all_dim) ** 2
    return scale


class PairRotary:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... in float32, as transformers' DeepseekV2
    does through complex numbers; tables for every position, computed once."""

    def __init__(self, dim: int, theta: float, yarn: YarnRope | None, max_positions: int,
                 device):
        inv_freq, factor = rope_frequencies(dim, theta, yarn)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos = (freqs.cos() * factor).to(device)
        self.sin = (freqs.sin() * factor).to(device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, dim]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        pairs = x.float().unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


@dataclass
class MLALayer:
    input_norm: torch.Tensor
    kv_a_w: torch.Tensor  # [r + p, hidden]
    kv_a_norm: torch.Tensor  # [r]
    w_uk: torch.Tensor  # [heads, nope, r]: kv_b_proj's key rows
    w_uv: torch.Tensor  # [heads, v, r]: kv_b_proj's value rows
    o_w: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor | None  # None for a dense layer
    q_w: torch.Tensor | None = None  # q_proj, where q_lora_rank is None
    q_a_w: torch.Tensor | None = None  # else q_a_proj -> q_a_layernorm -> q_b_proj
    q_a_norm: torch.Tensor | None = None
    q_b_w: torch.Tensor | None = None
    q_a_b: torch.Tensor | None = None  # biases, where attention_bias is set
    kv_a_b: torch.Tensor | None = None
    o_b: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None  # [E] float32: DeepSeek-V3's e_score_correction_bias


class DeepseekV2Attention(AttentionHalf):
    def __init__(self, spec: ModelSpec, files, device, dtype: torch.dtype, shard=None,
                 group=None):
        self._files = files  # the router bias is read in float32, not in the model's dtype
        super().__init__(spec, files, device, dtype, shard, group)

    def _rotary(self):
        s = self.spec
        return PairRotary(s.mla.qk_rope_head_dim, s.rope_theta, s.yarn,
                          s.max_position_embeddings, self.device)

    def attention_backend(self, backend):
        from sglang_crosspool.engine.attention_mla import make_latent_attention

        s = self.spec
        return make_latent_attention(backend, self.device, self.heads.heads, s.mla.latent_dim,
                                     s.mla.kv_lora_rank, softmax_scale(s), self.dtype)

    def _load_layer(self, i: int, load) -> MLALayer:
        s, m, p = self.spec, self.spec.mla, f"model.layers.{i}.self_attn."
        h, heads = s.hidden_size, s.num_heads
        first, local = self.heads.head_start, self.heads.heads

        def per_head(width: int, dim: int = 0):  # this rank's heads' rows (or columns)
            if not self.shard.sharded:
                return None
            return (dim, first * width, (first + local) * width)

        kv_b = load(p + "kv_b_proj.weight",
                    shape=(heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
                    part=per_head(m.qk_nope_head_dim + m.v_head_dim))
        w_uk, w_uv = kv_b.view(local, -1, m.kv_lora_rank).split(
            [m.qk_nope_head_dim, m.v_head_dim], dim=1)
        layer = MLALayer(
            input_norm=load(f"model.layers.{i}.input_layernorm.weight", shape=(h,)),
            kv_a_w=load(p + "kv_a_proj_with_mqa.weight", shape=(m.latent_dim, h)),
            kv_a_norm=load(p + "kv_a_layernorm.weight", shape=(m.kv_lora_rank,)),
            w_uk=w_uk.contiguous(),
            w_uv=w_uv.contiguous(),
            o_w=load(p + "o_proj.weight", shape=(h, heads * m.v_head_dim),
                     part=per_head(m.v_head_dim, dim=1)),
            post_norm=load(f"model.layers.{i}.post_attention_layernorm.weight", shape=(h,)),
            router=None,
        )
        q_out = heads * m.qk_head_dim
        if m.q_lora_rank is None:
            layer.q_w = load(p + "q_proj.weight", shape=(q_out, h),
                             part=per_head(m.qk_head_dim))
        else:
            layer.q_a_w = load(p + "q_a_proj.weight", shape=(m.q_lora_rank, h))
            layer.q_a_norm = load(p + "q_a_layernorm.weight", shape=(m.q_lora_rank,))
            layer.q_b_w = load(p + "q_b_proj.weight", shape=(q_out, m.q_lora_rank),
                               part=per_head(m.qk_head_dim))
        if s.attention_bias:
            if m.q_lora_rank is not None:
                layer.q_a_b = load(p + "q_a_proj.bias", shape=(m.q_lora_rank,))
            layer.kv_a_b = load(p + "kv_a_proj_with_mqa.bias", shape=(m.latent_dim,))
            layer.o_b = load(p + "o_proj.bias", shape=(h,))
        if s.moe_layers[i]:
            layer.router = load(f"model.layers.{i}.mlp.gate.weight", shape=(s.num_experts, h))
            if s.router.topk_method == "noaux_tc":
                layer.router_bias = self._files.get(
                    f"model.layers.{i}.mlp.gate.e_score_correction_bias",
                    shape=(s.num_experts,)).to(device=self.device, dtype=torch.float32)
        return layer

    def attention_block(self, i: int, x: torch.Tensor, batch, attn) -> tuple:
        """Layer i up to the FFN; `attn(i, q, latent, latent, batch)` caches the latents and
        returns each head's output in the latent space [T, heads * r]."""
        s, m, layer = self.spec, self.spec.mla, self.layers[i]
        heads, r = self.heads.heads, m.kv_lora_rank  # this rank's heads
        h = rms_norm(x, layer.input_norm, s.rms_norm_eps)
        if layer.q_w is not None:
            q = F.linear(h, layer.q_w)
        else:
            q_a = rms_norm(F.linear(h, layer.q_a_w, layer.q_a_b), layer.q_a_norm, _LORA_NORM_EPS)
            q = F.linear(q_a, layer.q_b_w)
        q_nope, q_pe = q.view(-1, heads, m.qk_head_dim).split(
            [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = F.linear(h, layer.kv_a_w, layer.kv_a_b).split([r, m.qk_rope_head_dim], -1)
        c_kv = rms_norm(c_kv, layer.kv_a_norm, _LORA_NORM_EPS)
        q_pe = self.rotary.apply(q_pe, batch.positions)
        k_pe = self.rotary.apply(k_pe.unsqueeze(1), batch.positions)
        latent = torch.cat([c_kv.unsqueeze(1), k_pe], dim=-1)  # [T, 1, r + p]
        q_lat = torch.einsum("thn,hnr->thr", q_nope, layer.w_uk)
        o_lat = attn(i, torch.cat([q_lat, q_pe], dim=-1), latent, latent, batch)
        o = torch.einsum("thr,hvr->thv", o_lat.view(-1, heads, r), layer.w_uv)
        o = self.o_proj(layer, o.reshape(o.shape[0], -1))
        x = x + o
        h = rms_norm(x, layer.post_norm, s.rms_norm_eps)
        return x, h, self.route(layer, h)

    def route(self, layer: MLALayer, h: torch.Tensor) -> Routing:
        if layer.router is None:
            return Routing(None, None)
        return Routing(*route_topk(F.linear(h.float(), layer.router.float()), self.spec,
                                   h.dtype, layer.router_bias))


def route_topk(logits: torch.Tensor, spec: ModelSpec, dtype: torch.dtype,
               bias: torch.Tensor | None = None):
    """(top-k ids, weights) from router logits [T, E] (see the module docstring); `bias` is
    the e_score_correction_bias of noaux_tc routing."""
    rs, k = spec.router, spec.top_k
    if rs.topk_method == "noaux_tc":
        return _route_noaux_tc(logits, spec, dtype, bias)
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if rs.topk_method == "group_limited_greedy":
        groups = scores.view(scores.shape[0], rs.n_group, -1)
        best = groups.amax(dim=-1).topk(rs.topk_group, dim=-1).indices
        keep = torch.zeros(groups.shape[:2], dtype=torch.bool, device=scores.device)
        keep.scatter_(1, best, True)
        scores = groups.masked_fill(~keep.unsqueeze(-1), 0.0).flatten(1)
    weights, ids = torch.topk(scores, k, dim=-1)
    if spec.norm_topk_prob and k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * rs.routed_scaling_factor
    return ids, weights.to(dtype)


def _route_noaux_tc(logits: torch.Tensor, spec: ModelSpec, dtype: torch.dtype,
                    bias: torch.Tensor | None):
    rs = spec.router
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias
    groups = choice.view(choice.shape[0], rs.n_group, -1)
    group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)
    best = group_scores.topk(rs.topk_group, dim=-1).indices
    keep = torch.zeros(groups.shape[:2], dtype=torch.bool, device=scores.device)
    keep.scatter_(1, best, True)
    choice = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, (weights * rs.routed_scaling_factor).to(dtype)


class DeepseekV2FFN(FFNHalf):
    shared_gated = False  # the shared experts' output is added as it is

    @property
    def shared_prefix(self):
        return "mlp.shared_experts." if self.spec.shared_expert_intermediate_size else None


ARCH = Architecture("deepseek_v2", DeepseekV2Attention, DeepseekV2FFN)
