"""OLMoE: RMSNorm on the whole q and k projections (not per head); optional q/k/v clipping.

Under tensor parallelism a rank holds some heads only, so the norms' mean of squares is summed
over the ranks (one all-reduce for q and k together; a KV head kept by several ranks counted
once).
"""

import torch

from sglang_crosspool.models.common import AttentionHalf, FFNHalf, rms_norm
from sglang_crosspool.models.parallel import rows
from sglang_crosspool.models.registry import Architecture


class OlmoeAttention(AttentionHalf):
    qk_norm_keys = True

    def qk_norm_shapes(self):
        return (self.spec.q_size,), (self.spec.kv_size,)

    def qk_norm_parts(self):
        if not self.shard.sharded:
            return None, None
        return rows(self.heads.q_rows), rows(self.heads.kv_rows)

    def qk_norm(self, layer, q, k, v):
        eps, clip = self.spec.rms_norm_eps, self.spec.clip_qkv
        if self.group.world_size == 1:
            q = rms_norm(q, layer.q_norm, eps)
            k = rms_norm(k, layer.k_norm, eps)
        else:
            q, k = self._sharded_norms(layer, q, k, eps)
        if clip is not None:
            q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
        return q, k, v

    def _sharded_norms(self, layer, q, k, eps):
        s, hs = self.spec, self.heads
        qf, kf = q.float(), k.float()
        squares = torch.stack([qf.pow(2).sum(-1), kf.pow(2).sum(-1) / hs.kv_replicas], -1)
        squares = self.group.all_reduce(squares)
        q = qf * torch.rsqrt(squares[:, :1] / s.q_size + eps)
        k = kf * torch.rsqrt(squares[:, 1:] / s.kv_size + eps)
        return layer.q_norm * q.to(self.dtype), layer.k_norm * k.to(self.dtype)

    @property
    def bias_fields(self):
        return ("q", "k", "v", "o") if self.spec.attention_bias else ()


class OlmoeFFN(FFNHalf):
    pass


ARCH = Architecture("olmoe", OlmoeAttention, OlmoeFFN)
