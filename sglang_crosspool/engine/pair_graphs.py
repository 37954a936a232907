"""Two models' decode steps pipelined in one CUDA graph (`--pipeline-models`, crosspool p2p).

With every model's attention on one KV-pool GPU and every expert on the weights-pool GPU, a
step of one model leaves each GPU idle while the other works: attention waits for the experts,
the experts wait for the next layer's attention. Splitting one model's small batch into two
micro-batches fills that gap but reads every expert weight twice, which cost more than it
saved at 1k context and batch 1-64 (benchmark/results/p2p-2xh200/). Two *different* models' batches have
nothing to share: while the experts of model A's layer i run on the weights-pool GPU, model
B's layer-i attention runs on the KV-pool GPU, and no weight is read twice.

A pair graph holds both models' steps in the layer-wise pipeline order (`pipelined_layers`
over one micro-batch per model), captured per batch-size bucket with both batches padded to
the same bucket. Its inputs are the two models' own static buffers (those of their
single-model `DecodeGraphs`), so a step fills each as a single-model step would and replays
one graph; the FFN servers replay their graph of the same plan, ((A, bs), (B, bs)). Pairs are
captured for every two models of the worker that have decode graphs, in the worker's model
order, on the buckets both have up to PAIR_GRAPH_MAX_BS.

`capture=False` runs the same padded static path without graphs (CPU tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_crosspool.engine.cuda_graph import DecodeGraphs, capture_step, replay_step
from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists
from sglang_crosspool.engine.model_runner import MicroBatch, pipelined_layers

# Pairs are captured on batch buckets up to this: past it a step's weight reads are shared by
# more rows and one model's graph alone keeps both GPUs busier (and graphs cost memory).
PAIR_GRAPH_MAX_BS = 16


@dataclass
class _Pair:
    bs: int
    fbs: tuple[ForwardBatch, ForwardBatch]
    plan: tuple  # ((first model, bs), (second model, bs)): what the FFN servers are told
    graph: object | None
    logits: tuple[torch.Tensor, torch.Tensor] | None


class PairGraphs:
    """Decode steps of two models, `first` before `second` in the crossing order."""

    def __init__(self, first: DecodeGraphs, second: DecodeGraphs, buckets: list[int],
                 capture: bool = True, pool=None):
        self.first, self.second = first, second
        self.names = (first.runner.name, second.runner.name)
        self.capture = capture
        self.pool = pool
        self.graphs: dict[int, _Pair] = {}
        self.memory_bytes = 0
        self.runs = 0
        usable = [b for b in buckets if b <= min(first.buffers.max_bs, second.buffers.max_bs)]
        for bs in sorted(usable, reverse=True):
            self._capture_one(bs)

    @property
    def max_bs(self) -> int:
        return max(self.graphs) if self.graphs else 0

    def fits(self, a: StepLists, b: StepLists) -> bool:
        return (a.is_decode and b.is_decode and max(len(a.ids), len(b.ids)) <= self.max_bs
                and max(len(t) for t in a.tables) <= self.first.buffers.max_blocks
                and max(len(t) for t in b.tables) <= self.second.buffers.max_blocks)

    @torch.inference_mode()
    def run(self, a: StepLists, rows_a: list[int], b: StepLists,
            rows_b: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' logits rows of one pipelined decode step (`fits(a, b)` must hold)."""
        bs = min(size for size in self.graphs if size >= max(len(a.ids), len(b.ids)))
        pair = self.graphs[bs]
        for graphs, lists, fb in ((self.first, a, pair.fbs[0]), (self.second, b, pair.fbs[1])):
            fb.ctx_lens = graphs.buffers.fill(lists, bs)
            fb.num_real = len(lists.ids)
            graphs.runner.backend.prepare_graph(fb)
        logits = replay_step(self.first.runner.ffn, pair.plan, pair.graph, pair.logits,
                             lambda: self._body(pair))
        self.runs += 1
        return _rows(logits[0], rows_a), _rows(logits[1], rows_b)

    def _body(self, pair: _Pair) -> tuple[torch.Tensor, torch.Tensor]:
        mbs = [MicroBatch(self.first.runner, pair.fbs[0], None),
               MicroBatch(self.second.runner, pair.fbs[1], None)]
        pipelined_layers(mbs)
        return (self.first.runner.model.logits(mbs[0].x),
                self.second.runner.model.logits(mbs[1].x))

    def _capture_one(self, bs: int) -> None:
        # As DecodeGraphs does: a 1-token context in the guard block 0, stores skipped.
        lists = StepLists([0], [0], [-1], [0], [1], [1], [[0]])
        fbs = []
        for graphs in (self.first, self.second):
            ctx = graphs.buffers.fill(lists, bs)
            fb = graphs.buffers.forward_batch(bs, ctx, 1, graphs.block_tokens)
            graphs.runner.backend.prepare_graph(fb)
            fbs.append(fb)
        pair = _Pair(bs, tuple(fbs), ((self.names[0], bs), (self.names[1], bs)), None, None)
        if not self.capture:
            self.graphs[bs] = pair
            return
        graph, logits, grown = capture_step(self.first.runner.ffn, pair.plan,
                                            lambda: self._body(pair), self.first.device,
                                            self.pool)
        self.memory_bytes += grown
        pair.graph, pair.logits = graph, logits
        self.graphs[bs] = pair

    def stats(self) -> dict:
        return {"models": list(self.names), "buckets": sorted(self.graphs),
                "captured": self.capture, "memory_bytes": self.memory_bytes, "runs": self.runs}


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if rows == list(range(len(rows))):
        return logits[: len(rows)]
    return logits[rows]
