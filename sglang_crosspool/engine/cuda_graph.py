"""Decode steps as CUDA graphs: per model, per batch-size bucket, captured at start-up.

At small batch a decode step is hundreds of small kernels, and launching them from Python
costs more than running them. Here the CPU decides once per step (which sequences, which
slots) and the GPU runs the whole step as one graph replay:

    host lists -> one pinned buffer -> one upload into the static buffers -> replay -> logits

The batch is padded to the smallest bucket that holds it. Padding rows repeat row 0's block
table and context length, so every read stays inside mapped KV pages, and have slot -1, so
their K/V store is skipped; their logits are discarded. Steps that are not pure decode, that
exceed the largest bucket or whose block tables are wider than the capture are run eagerly.

`capture=False` runs the same padded static path without graphs: that is how CPU tests check
the padding and the buffer handling, and how `--disable-cuda-graph` can still be compared.

With FFN servers behind the p2p crossing the graph holds every layer's send and wait too, and
each replay is announced to the servers (`ffn.begin_step`), which replay their own graph of
the same plan. With `microbatches=2` a bucket of bs >= 2 rows is captured as two micro-batches
(rows [0, bs/2) and [bs/2, bs)) in the layer-wise pipeline order, so one micro-batch's
attention runs while the other's experts run on the FFN servers' GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists
from sglang_crosspool.engine.model_runner import MicroBatch, ModelRunner, pipelined_layers

log = logging.getLogger("sglang_crosspool.cuda_graph")


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, then of 16, and max_bs itself."""
    sizes = [b for b in (1, 2, 4) if b < max_bs]
    b = 8
    while b < max_bs:
        sizes.append(b)
        b += 8 if b < 64 else 16
    return sizes + [max_bs]


def capture_step(ffn, plan: tuple, body, device: torch.device, pool):
    """Captures one step: `body()` warmed up twice on a side stream (kernels compiled, the
    allocator settled), then recorded while the FFN servers capture `plan` alongside.
    Returns (graph, body's output, bytes the graph memory grew by)."""
    before = torch.cuda.memory_reserved(device)
    with torch.inference_mode():
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                ffn.begin_step(plan)
                body()
                ffn.end_step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with ffn.capture(plan), torch.cuda.graph(graph, pool=pool):
            out = body()
    torch.cuda.synchronize(device)
    return graph, out, torch.cuda.memory_reserved(device) - before


def replay_step(ffn, plan: tuple, graph, out, body):
    """One step announced to the FFN servers, then its graph replayed (its output `out`), or
    `body()` run when nothing was captured."""
    ffn.begin_step(plan, graph=graph is not None)
    if graph is None:
        return body()
    graph.replay()
    return out


class StaticBuffers:
    """The graph's inputs: int64 ids, positions, slots and block tables, and int32 context
    lengths, all views of one byte buffer so that a step is a single host-to-device copy."""

    def __init__(self, max_bs: int, max_blocks: int, device: torch.device):
        self.max_bs, self.max_blocks = max_bs, max_blocks
        n64 = max_bs * (3 + max_blocks)
        nbytes = 8 * n64 + 4 * max_bs
        pin = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.dev = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.host_views = self._views(self.host, n64)
        self.dev_views = self._views(self.dev, n64)

    def _views(self, buf: torch.Tensor, n64: int) -> dict[str, torch.Tensor]:
        b, w = self.max_bs, self.max_blocks
        longs = buf[: 8 * n64].view(torch.int64)
        return {
            "rows": longs[: 3 * b].view(3, b),  # ids, positions, slots
            "ids": longs[:b], "positions": longs[b : 2 * b], "slots": longs[2 * b : 3 * b],
            "tables": longs[3 * b :].view(b, w), "ctx": buf[8 * n64 :].view(torch.int32),
        }

    def fill(self, lists: StepLists, bs: int) -> list[int]:
        """Writes the step, padded to bs rows, into the pinned buffer and uploads it; returns
        the padded context lengths (the host copy, for backends that plan on the host)."""
        pad = bs - len(lists.ids)
        h = self.host_views
        ctx = lists.ctx_lens + lists.ctx_lens[:1] * pad
        h["rows"][:, :bs] = torch.tensor([lists.ids + [0] * pad,
                                          lists.positions + lists.positions[:1] * pad,
                                          lists.slots + [-1] * pad])
        h["ctx"][:bs] = torch.tensor(ctx)
        w = self.max_blocks
        table = [b for blocks in lists.tables + lists.tables[:1] * pad
                 for b in blocks + [0] * (w - len(blocks))]
        h["tables"][:bs] = torch.tensor(table).view(bs, w)
        self.dev.copy_(self.host, non_blocking=True)
        return ctx

    def forward_batch(self, bs: int, ctx_lens: list[int], num_real: int,
                      block_tokens: int, start: int = 0) -> ForwardBatch:
        """A ForwardBatch over the static buffers' rows [start, start + bs); `ctx_lens` is
        what `fill` returned for those rows."""
        d, rows = self.dev_views, slice(start, start + bs)
        return ForwardBatch(d["ids"][rows], d["positions"][rows], d["slots"][rows],
                            list(range(bs)), [1] * bs, ctx_lens, d["tables"][rows],
                            block_tokens, ctx_lens_t=d["ctx"][rows], num_real=num_real)


@dataclass
class _Captured:
    bs: int
    fbs: list[ForwardBatch]  # one per micro-batch, over consecutive rows
    plan: tuple  # per micro-batch (model, rows): what the FFN servers are told
    graph: object | None  # torch.cuda.CUDAGraph, None when not capturing
    logits: torch.Tensor | None  # the graph's output [bs, vocab] float32


class DecodeGraphs:
    """One model's captured decode steps."""

    def __init__(self, runner: ModelRunner, kv_pool, buckets: list[int], max_blocks: int,
                 capture: bool = True, pool=None, memory_budget: int | None = None,
                 microbatches: int = 1):
        self.runner = runner
        self.microbatches = microbatches if runner.backend.graph_microbatches else 1
        self.block_tokens = kv_pool.block_tokens(runner.name)
        self.device = runner.model.device if isinstance(runner.model.device, torch.device) \
            else torch.device(runner.model.device)
        self.buffers = StaticBuffers(max(buckets), max_blocks, self.device)
        self.capture = capture
        self.pool = pool
        self.memory_budget = memory_budget
        self.graphs: dict[int, _Captured] = {}
        self.memory_bytes = 0
        self.runs = 0
        self._capture_all(sorted(buckets, reverse=True))

    @property
    def max_bs(self) -> int:
        return max(self.graphs) if self.graphs else 0

    def fits(self, lists: StepLists) -> bool:
        return (lists.is_decode and len(lists.ids) <= self.max_bs
                and max(len(t) for t in lists.tables) <= self.buffers.max_blocks)

    @torch.inference_mode()
    def run(self, lists: StepLists, rows: list[int]) -> torch.Tensor:
        """The logits rows `rows` of one decode step (`fits(lists)` must hold)."""
        bs = min(b for b in self.graphs if b >= len(lists.ids))
        cap = self.graphs[bs]
        self._prepare(cap, self.buffers.fill(lists, bs), len(lists.ids))
        logits = replay_step(self.runner.ffn, cap.plan, cap.graph, cap.logits,
                             lambda: self._body(cap))
        self.runs += 1
        if rows == list(range(len(rows))):  # the usual decode step: a view, no upload
            return logits[: len(rows)]
        return logits[rows]

    def _prepare(self, cap: _Captured, ctx: list[int], num_real: int) -> None:
        start = 0
        for fb in cap.fbs:  # consecutive rows of the bucket
            fb.ctx_lens = ctx[start : start + fb.num_tokens]
            fb.num_real = max(0, min(num_real - start, fb.num_tokens))
            self.runner.backend.prepare_graph(fb)
            start += fb.num_tokens

    def _body(self, cap: _Captured) -> torch.Tensor:
        """The step a graph holds: every layer of the micro-batches, then the logits."""
        if len(cap.fbs) == 1:
            return self.runner.model.logits(self.runner.layers(cap.fbs[0]))
        mbs = [MicroBatch(self.runner, fb, None) for fb in cap.fbs]
        pipelined_layers(mbs)
        return self.runner.model.logits(torch.cat([mb.x for mb in mbs]))

    # -- capture ----------------------------------------------------------------------------

    def _capture_all(self, buckets: list[int]) -> None:
        for bs in buckets:
            self._capture_one(bs)

    def _capture_one(self, bs: int) -> None:
        # Captured on a 1-token context in block 0, the KV pool's guard block: always mapped,
        # never allocated; the store is skipped (slot -1), so nothing writes it.
        lists = StepLists([0], [0], [-1], [0], [1], [1], [[0]])
        ctx = self.buffers.fill(lists, bs)
        mbs = self.microbatches if bs >= 2 else 1
        edges = [bs * i // mbs for i in range(mbs + 1)]
        fbs = [self.buffers.forward_batch(hi - lo, ctx[lo:hi], 1 if lo == 0 else 0,
                                          self.block_tokens, start=lo)
               for lo, hi in zip(edges, edges[1:])]
        cap = _Captured(bs, fbs, tuple((self.runner.name, fb.num_tokens) for fb in fbs),
                        None, None)
        for fb in fbs:
            self.runner.backend.prepare_graph(fb)
        if not self.capture:
            self.graphs[bs] = cap
            return
        graph, logits, grown = capture_step(self.runner.ffn, cap.plan, lambda: self._body(cap),
                                            self.device, self.pool)
        if self.memory_budget is not None and self.memory_bytes + grown > self.memory_budget:
            log.warning("%s: decode graph for batch %d needs %d MiB, over the graph memory "
                        "budget; larger batches of this model run eagerly", self.runner.name,
                        bs, grown >> 20)
            del graph, logits
            return
        self.memory_bytes += grown
        cap.graph, cap.logits = graph, logits
        self.graphs[bs] = cap

    def stats(self) -> dict:
        return {"buckets": sorted(self.graphs), "captured": self.capture,
                "microbatches": self.microbatches,
                "memory_bytes": self.memory_bytes, "runs": self.runs}
