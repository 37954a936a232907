"""OLMoE: RMSNorm on the whole q and k projections (not per head); optional q/k/v clipping."""

from sglang_crosspool.models.common import AttentionHalf, FFNHalf, rms_norm
from sglang_crosspool.models.registry import Architecture


class OlmoeAttention(AttentionHalf):
    qk_norm_keys = True

    def qk_norm_shapes(self):
        return (self.spec.q_size,), (self.spec.kv_size,)

    def qk_norm(self, layer, q, k, v):
        eps, clip = self.spec.rms_norm_eps, self.spec.clip_qkv
        q = rms_norm(q, layer.q_norm, eps)
        k = rms_norm(k, layer.k_norm, eps)
        if clip is not None:
            q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
        return q, k, v

    @property
    def bias_fields(self):
        return ("q", "k", "v", "o") if self.spec.attention_bias else ()


class OlmoeFFN(FFNHalf):
    pass


ARCH = Architecture("olmoe", OlmoeAttention, OlmoeFFN)
