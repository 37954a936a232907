"""Qwen3-MoE: per-head RMSNorm on q and k before RoPE; softmax top-k router."""

from sglang_crosspool.models.common import AttentionHalf, FFNHalf, rms_norm
from sglang_crosspool.models.registry import Architecture


class Qwen3MoeAttention(AttentionHalf):
    qk_norm_keys = True

    def qk_norm(self, layer, q, k, v):
        s, hs = self.spec, self.heads  # this rank's heads (all of them at TP 1)
        q = rms_norm(q.view(-1, hs.heads, s.head_dim), layer.q_norm, s.rms_norm_eps)
        k = rms_norm(k.view(-1, hs.kv_heads, s.head_dim), layer.k_norm, s.rms_norm_eps)
        return q, k, v

    @property
    def bias_fields(self):
        return ("q", "k", "v", "o") if self.spec.attention_bias else ()


class Qwen3MoeFFN(FFNHalf):
    pass


ARCH = Architecture("qwen3_moe", Qwen3MoeAttention, Qwen3MoeFFN)
