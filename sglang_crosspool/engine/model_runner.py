"""Runs one model's forward pass for one step: attention half here, FFN via the executor."""

from __future__ import annotations

import torch

from sglang_crosspool.engine.attention import AttentionBackend
from sglang_crosspool.engine.forward_batch import ForwardBatch
from sglang_crosspool.ffn.executor import FFNExecutor
from sglang_crosspool.memory.kv_pool import ModelKV
from sglang_crosspool.models.common import AttentionHalf


class ModelRunner:
    def __init__(self, name: str, attn_half: AttentionHalf, kv: ModelKV,
                 backend: AttentionBackend, ffn: FFNExecutor):
        self.name = name
        self.model = attn_half
        self.kv = kv
        self.backend = backend
        self.ffn = ffn

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, rows: torch.Tensor) -> torch.Tensor:
        """Runs every layer over the batch; returns float32 logits of the hidden `rows`."""
        self.backend.prepare(fb)
        x = self.model.embed_tokens(fb.input_ids)
        for i in range(self.model.spec.num_layers):
            x, h, routing = self.model.attention_block(i, x, fb, self._attend)
            x = x + self.ffn.forward(self.name, i, h, routing)
        return self.model.logits(x[rows])

    def _attend(self, i: int, q, k, v, fb: ForwardBatch) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv.k[i], self.kv.v[i], fb)
