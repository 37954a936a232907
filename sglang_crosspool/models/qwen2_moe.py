"""Qwen2-MoE (Qwen1.5-MoE): biased q/k/v projections, a shared expert behind a sigmoid gate."""

from sglang_crosspool.models.common import AttentionHalf, FFNHalf
from sglang_crosspool.models.registry import Architecture


class Qwen2MoeAttention(AttentionHalf):
    @property
    def bias_fields(self):
        return ("q", "k", "v") if self.spec.attention_bias else ()


class Qwen2MoeFFN(FFNHalf):
    @property
    def shared_prefix(self):
        return "mlp.shared_expert." if self.spec.shared_expert_intermediate_size else None


ARCH = Architecture("qwen2_moe", Qwen2MoeAttention, Qwen2MoeFFN)
