"""FlashInfer attention backend (flashinfer-python 0.5.3; CUDA only, kernels JIT-built on first use).

Layout. A layer's caches are [slots, KVH, d] with slot = block * block_tokens + offset, so
`cache.view(-1, P, KVH, d)` is FlashInfer's NHD paged layout for any page size P dividing
block_tokens: block b is pages b*r .. b*r + r-1 (r = block_tokens / P). We use P = 16 (the
gcd with block_tokens), not P = block_tokens (2048 and more on CUDA): FlashInfer splits long
contexts over thread blocks in whole pages, and a 2048-token page would leave a small decode
batch with a few thread blocks. A sequence with c tokens has ceil(c / P) pages; the last
holds c - (pages - 1) * P. K and V are separate tensors, passed as the (k, v) tuple.

What is planned where:
- prepare(fb), once per eager step: page counts, indptr and last-page lengths from the host
  list fb.ctx_lens; the page ids are gathered on the device from fb.block_tables (one small
  upload of per-row counts; the output sizes are known on the host, so nothing waits). Then
  plan() of a wrapper lent to this batch: the decode wrapper when every q_len is 1, else the
  paged prefill wrapper, causal, qo_indptr from fb.q_starts / q_lens (FlashInfer aligns the
  queries to the end of the KV: query i of n sees keys <= ctx - n + i, as ours). Each
  in-flight batch gets its own wrapper (a pool; a wrapper returns to it when its batch is
  gone), since micro-batches of one model are all prepared before their layers interleave.
- prepare_graph(fb), before capture and before every replay: the same, into the bucket's
  decode wrapper, created once with use_cuda_graph=True and fixed indptr / indices /
  last_page_len buffers for (bucket, fb.block_tables.shape[1] blocks a row). Padding rows
  repeat row 0, so they are planned as valid sequences.
- forward(), every layer: store_kv (Triton; negative slots, i.e. graph padding, skipped), then
  wrapper.run(q, (k_pages, v_pages)). One plan serves all layers of the step.

What syncs: nothing waits for the GPU. plan() wants indptr / last_page_len on the host, which
we hand it as host tensors (its `.to("cpu")` is then free); it computes the split schedule
on the CPU, writes it to the wrapper's pinned buffer and queues an async copy. The small
host-to-device copies are from pageable memory (the driver stages them; no stream sync).
If the dtype is unknown at prepare (constructed without `dtype`), the plan waits for the first
layer's forward, which learns it from q; under graph capture that is an error, so pass dtype
or run one eager forward first (cuda_graph.py's warm-up does).

NOTE: plan() of a wrapper overwrites its pinned buffer while the previous plan's async copy
may still be queued; safe because a wrapper is re-planned only once its batch is gone (eager)
or the previous replay was consumed (graphs), and every step ends with a host read of logits.
NOTE: the 512 MiB float workspace (split-KV partials) is shared by all wrappers on a device;
that relies on their runs being ordered on one stream. 128 MiB overflowed on an H200 when
planning a Qwen3-30B-A3B-shaped prefill (32 query heads).
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch

from sglang_crosspool.engine.attention import (
    FLASHINFER_DTYPES,
    FLASHINFER_HEAD_DIMS,
    AttentionBackend,
)
from sglang_crosspool.engine.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

WORKSPACE_BYTES = 512 << 20
_workspaces: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    """The float workspace of every FlashInfer wrapper on `device` (zeroed before first use)."""
    if device not in _workspaces:
        _workspaces[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[device]


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in FLASHINFER_DTYPES:
        raise ValueError(f"attention backend 'flashinfer': dtype {dtype} is not one of "
                         f"{FLASHINFER_DTYPES}; use triton")
    return dtype


@dataclass
class _PageTable:
    """One step's paged layout in FlashInfer's terms."""

    indptr: torch.Tensor  # [B+1] int32, host
    indices: torch.Tensor  # [indptr[-1]] int32, device
    last_page_len: torch.Tensor  # [B] int32, host
    page_tokens: int


@dataclass
class FlashInferMeta:
    """fb.attn_meta of this backend."""

    wrapper: object
    page_tokens: int
    pending: object = None  # plan(q_dtype, kv_dtype) still to run, when the dtype was unknown


class _Loan:
    def __init__(self, wrapper):
        self.wrapper = wrapper
        self.owner = None  # weakref to the batch it is lent to

    def free_for(self, fb: ForwardBatch) -> bool:
        # Identity, not ==: a ForwardBatch compares its tensors field by field.
        owner = self.owner() if self.owner is not None else None
        return owner is None or owner is fb


class _WrapperPool:
    """Wrappers of one kind, each lent to one in-flight ForwardBatch until that batch is gone."""

    LIMIT = 8  # past this many batches alive at once, the longest-held wrapper is taken back

    def __init__(self, make):
        self.make = make
        self.loans: list[_Loan] = []  # least recently lent first

    def lend(self, fb: ForwardBatch):
        loan = next((x for x in self.loans if x.free_for(fb)), None)
        if loan is None and len(self.loans) < self.LIMIT:
            loan = _Loan(self.make())
        elif loan is None:
            logger.warning("flashinfer: over %d batches of one model alive at once; taking "
                           "back the wrapper of the oldest", self.LIMIT)
            loan = self.loans[0]
        self.loans = [x for x in self.loans if x is not loan] + [loan]
        loan.owner = weakref.ref(fb)
        return loan.wrapper


class FlashInferAttention(AttentionBackend):
    """FlashInfer's paged decode and prefill wrappers over the KV pool's block layout."""

    supports_graphs = True
    page_tokens = 16  # FlashInfer's page size: gcd(this, block_tokens); 0: one page a block
    prefill_backend = "fa2"  # "auto" would pick fa3 on Hopper (and a 64 MiB index buffer each)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype | None = None):
        super().__init__(num_heads, num_kv_heads, head_dim, dtype)
        if head_dim not in FLASHINFER_HEAD_DIMS:
            raise ValueError(f"attention backend 'flashinfer': head_dim {head_dim} is not one of "
                             f"{FLASHINFER_HEAD_DIMS}; use triton")
        if dtype is not None:
            _check_dtype(dtype)
        try:
            import flashinfer
        except Exception as e:
            raise ValueError(f"attention backend 'flashinfer': cannot import flashinfer ({e})") \
                from e
        from crosspool_kernels import KERNELS

        self._fi = flashinfer
        self._store = KERNELS["store_kv"].triton
        if self._store is None:
            raise ValueError("attention backend 'flashinfer': triton (for the KV store) is not "
                             "installed")
        # The CUDA-core decode kernel is built for group sizes 1, 2, 3, 4 and 8 and wastes
        # lanes on large groups; the tensor-core (prefill) kernel takes any group.
        self._tensor_core_decode = num_heads // num_kv_heads > 4
        self._device: torch.device | None = None
        self._decode_pool = _WrapperPool(self._make_decode)
        self._prefill_pool = _WrapperPool(self._make_prefill)
        self._graph_wrappers: dict[tuple[int, int], object] = {}  # (bucket, pages) -> wrapper

    # -- wrappers ---------------------------------------------------------------------------

    def _make_decode(self):
        return self._fi.BatchDecodeWithPagedKVCacheWrapper(
            _workspace(self._device), "NHD", use_tensor_cores=self._tensor_core_decode)

    def _make_prefill(self):
        return self._fi.BatchPrefillWithPagedKVCacheWrapper(
            _workspace(self._device), "NHD", backend=self.prefill_backend)

    def _make_graph_decode(self, batch: int, max_pages: int):
        i32 = {"dtype": torch.int32, "device": self._device}
        return self._fi.BatchDecodeWithPagedKVCacheWrapper(
            _workspace(self._device), "NHD", use_cuda_graph=True,
            use_tensor_cores=self._tensor_core_decode,
            paged_kv_indptr_buffer=torch.zeros(batch + 1, **i32),
            paged_kv_indices_buffer=torch.zeros(max_pages, **i32),
            paged_kv_last_page_len_buffer=torch.zeros(batch, **i32))

    # -- per step ---------------------------------------------------------------------------

    def prepare(self, fb: ForwardBatch) -> None:
        self._device = fb.block_tables.device
        table = self._page_table(fb, fb.ctx_lens)
        if all(n == 1 for n in fb.q_lens):
            wrapper = self._decode_pool.lend(fb)
            plan = self._decode_plan(wrapper, table)
        else:
            wrapper = self._prefill_pool.lend(fb)
            plan = self._prefill_plan(wrapper, table, fb)
        fb.attn_meta = self._planned(wrapper, table, plan)

    def prepare_graph(self, fb: ForwardBatch) -> None:
        """Needs the host copy of the context lengths in fb.ctx_lens: all rows of the bucket,
        or the real rows only (padding repeats row 0), current for this replay."""
        self._device = fb.block_tables.device
        batch, width = fb.block_tables.shape
        ctx = list(fb.ctx_lens or [])
        if not 0 < len(ctx) <= batch:
            ctx = fb.ctx_lens_t.tolist()  # NOTE: a device sync; cuda_graph.py gives the list
        ctx += ctx[:1] * (batch - len(ctx))
        table = self._page_table(fb, ctx)
        key = (batch, batch * width * (fb.block_tokens // table.page_tokens))
        wrapper = self._graph_wrappers.get(key)
        if wrapper is None:
            wrapper = self._graph_wrappers[key] = self._make_graph_decode(*key)
        fb.attn_meta = self._planned(wrapper, table, self._decode_plan(wrapper, table))

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        meta: FlashInferMeta = fb.attn_meta
        self._store(k, v, k_cache, v_cache, fb.slot_mapping)
        if meta.pending is not None:
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("flashinfer: planning needs the dtype before graph capture; "
                                   "construct the backend with dtype=... or run one eager "
                                   "forward first")
            self.dtype = _check_dtype(q.dtype)
            meta.pending(q.dtype, k_cache.dtype)
            meta.pending = None
        p = meta.page_tokens
        pages = (k_cache.view(-1, p, self.num_kv_heads, self.head_dim),
                 v_cache.view(-1, p, self.num_kv_heads, self.head_dim))
        out = q.new_empty(q.shape)
        meta.wrapper.run(q, pages, out=out)
        return out.view(q.shape[0], -1)

    # -- planning ---------------------------------------------------------------------------

    def _planned(self, wrapper, table: _PageTable, plan) -> FlashInferMeta:
        if self.dtype is None:
            return FlashInferMeta(wrapper, table.page_tokens, pending=plan)
        plan(self.dtype, self.dtype)
        return FlashInferMeta(wrapper, table.page_tokens)

    def _page_table(self, fb: ForwardBatch, ctx_lens: list[int]) -> _PageTable:
        """Rows' FlashInfer pages: page j of row i is sub-page j % r of block
        block_tables[i, j // r]; counts and lengths on the host, the ids gathered on the
        device without a sync."""
        block_tokens = fb.block_tokens
        p = math.gcd(block_tokens, self.page_tokens)
        r = block_tokens // p
        counts = [-(-n // p) for n in ctx_lens]
        indptr = [0]
        for c in counts:
            indptr.append(indptr[-1] + c)
        last = [n - (c - 1) * p for n, c in zip(ctx_lens, counts)]
        total = indptr[-1]
        device = fb.block_tables.device
        host = torch.tensor(counts + indptr[:-1], dtype=torch.int64)
        counts_d, starts_d = host.to(device, non_blocking=True).split(len(counts))
        rows = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_d,
                                       output_size=total)
        j = torch.arange(total, device=device) - starts_d[rows]  # page number within the row
        blocks = fb.block_tables[rows, torch.div(j, r, rounding_mode="floor")]
        indices = (blocks * r + j % r).to(torch.int32)
        return _PageTable(torch.tensor(indptr, dtype=torch.int32), indices,
                          torch.tensor(last, dtype=torch.int32), p)

    def _decode_plan(self, wrapper, table: _PageTable):
        def plan(q_dtype, kv_dtype):
            wrapper.plan(table.indptr, table.indices, table.last_page_len, self.num_heads,
                         self.num_kv_heads, self.head_dim, table.page_tokens,
                         sm_scale=self.scale, q_data_type=q_dtype, kv_data_type=kv_dtype)
        return plan

    def _prefill_plan(self, wrapper, table: _PageTable, fb: ForwardBatch):
        qo_indptr = [0]
        for start, n in zip(fb.q_starts, fb.q_lens):
            if start != qo_indptr[-1]:
                raise ValueError("flashinfer: the sequences' tokens must be contiguous and in "
                                 f"order (q_starts {fb.q_starts}, q_lens {fb.q_lens})")
            qo_indptr.append(start + n)
        qo = torch.tensor(qo_indptr, dtype=torch.int32)

        def plan(q_dtype, kv_dtype):
            wrapper.plan(qo, table.indptr, table.indices, table.last_page_len, self.num_heads,
                         self.num_kv_heads, self.head_dim, table.page_tokens, causal=True,
                         sm_scale=self.scale, q_data_type=q_dtype, kv_data_type=kv_dtype)
        return plan
