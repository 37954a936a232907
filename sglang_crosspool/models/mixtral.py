"""Mixtral: plain GQA attention; top-k weights always renormalized; experts named w1/w3/w2.

Original checkpoints keep the MoE block under `block_sparse_moe.`; transformers 5 writes `mlp.`.
"""

from sglang_crosspool.models.common import AttentionHalf, FFNHalf
from sglang_crosspool.models.registry import Architecture

_PREFIXES = ("block_sparse_moe.", "mlp.")


class MixtralAttention(AttentionHalf):
    moe_prefixes = _PREFIXES

    def renormalize(self) -> bool:
        return True


class MixtralFFN(FFNHalf):
    moe_prefixes = _PREFIXES
    expert_names = ("w1", "w3", "w2")


ARCH = Architecture("mixtral", MixtralAttention, MixtralFFN)
