"""Runs models' forward passes for one step: attention here, FFN through the executor.

`forward` runs one batch layer by layer. `forward_pipelined` runs several micro-batches (of
one model or several) in the layer-wise pipeline order of `crosspool_scheduler.pipeline`: a
micro-batch's FFN is submitted, then other micro-batches run attention before it is waited
for, so the transfer and the FFN servers' work hide behind attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from crosspool_scheduler.pipeline import ATTENTION, SUBMIT, Timeline, layer_pipeline

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
        self.backend = attn_half.attention_backend(backend)
        self.ffn = ffn

    @property
    def num_layers(self) -> int:
        return self.model.spec.num_layers

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, rows: torch.Tensor) -> torch.Tensor:
        """Runs every layer over the batch; returns float32 logits of the hidden `rows`."""
        self.backend.prepare(fb)
        return self.model.logits(self.layers(fb)[rows])

    def layers(self, fb: ForwardBatch) -> torch.Tensor:
        """Embedding and every layer over a prepared batch; returns the hidden states. This is
        also what a decode CUDA graph captures (no host synchronisation inside)."""
        x = self.model.embed_tokens(fb.input_ids)
        for i in range(self.num_layers):
            x, h, routing = self.model.attention_block(i, x, fb, self._attend)
            x = self.ffn.forward_residual(self.name, i, x, h, routing)
        return x

    def _attend(self, i: int, q, k, v, fb: ForwardBatch) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv.k[i], self.kv.v[i], fb)


@dataclass
class MicroBatch:
    runner: ModelRunner
    fb: ForwardBatch
    rows: torch.Tensor
    x: torch.Tensor | None = None
    h: torch.Tensor | None = None
    routing: object = None
    handle: object = None


@torch.inference_mode()
def forward_pipelined(mbs: list[MicroBatch], timeline: Timeline | None = None):
    """Runs micro-batches in the layer-wise pipeline; returns each one's logits rows."""
    for mb in mbs:
        mb.runner.backend.prepare(mb.fb)
    pipelined_layers(mbs, timeline)
    return [mb.runner.model.logits(mb.x[mb.rows]) for mb in mbs]


def pipelined_layers(mbs: list[MicroBatch], timeline: Timeline | None = None) -> None:
    """Embedding and every layer of prepared micro-batches in the pipeline order; leaves each
    one's hidden states in `mb.x`. Also what a pipelined decode graph captures."""
    for mb in mbs:
        mb.x = mb.runner.model.embed_tokens(mb.fb.input_ids)
    for op in layer_pipeline([mb.runner.num_layers for mb in mbs]):
        mb = mbs[op.mb]
        start = time.perf_counter()
        if op.kind == ATTENTION:
            mb.x, mb.h, mb.routing = mb.runner.model.attention_block(
                op.layer, mb.x, mb.fb, mb.runner._attend)
        elif op.kind == SUBMIT:
            mb.handle = mb.runner.ffn.submit(mb.runner.name, op.layer, mb.h, mb.routing)
        else:
            mb.x = mb.runner.ffn.wait_residual(mb.handle, mb.x)
            mb.handle = None
        if timeline is not None:
            timeline.add(op, start, time.perf_counter())
