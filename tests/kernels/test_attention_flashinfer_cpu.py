"""FlashInferAttention's bookkeeping on CPU, against a stand-in for the flashinfer module.

The stand-in implements the documented semantics of FlashInfer's paged wrappers in torch (NHD
pages, indptr / indices / last_page_len, causal aligned to the end of the KV, fixed buffers
under use_cuda_graph). So this checks what we hand FlashInfer - sub-page indices, lengths,
qo_indptr, one wrapper per in-flight batch, plans into the graph buffers - and where each
piece lives (host or device); tests/gpu/test_flashinfer_gpu.py checks the real kernels.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("triton")  # the backend stores K/V with the Triton kernel

from sglang_crosspool.engine import attention_flashinfer as fi_backend
from sglang_crosspool.engine.attention import TorchAttention, get_attention_backend
from sglang_crosspool.engine.forward_batch import ForwardBatch


class _Wrapper:
    plans = 0

    def __init__(self, workspace, layout, use_cuda_graph=False, **buffers):
        assert layout == "NHD"
        self.device = workspace.device
        self.graph = use_cuda_graph
        self.buffers = buffers

    def _common_plan(self, indptr, indices, last, heads, kv_heads, page_size, q_dtype, kv_dtype):
        # Our contract: what plan() reads on the host is on the host, the ids on the device.
        assert indptr.device.type == "cpu" and last.device.type == "cpu"
        assert indices.device == self.device
        assert indptr.dtype == indices.dtype == last.dtype == torch.int32
        assert heads % kv_heads == 0
        assert ((last >= 1) & (last <= page_size)).all() and len(indices) == int(indptr[-1])
        self.page_size, self.dtypes = page_size, (q_dtype, kv_dtype)
        if self.graph:
            b = self.buffers
            assert len(b["paged_kv_last_page_len_buffer"]) == len(last)  # fixed batch
            assert len(indices) <= len(b["paged_kv_indices_buffer"])
            b["paged_kv_indptr_buffer"].copy_(indptr)
            b["paged_kv_indices_buffer"][: len(indices)].copy_(indices)
            b["paged_kv_last_page_len_buffer"].copy_(last)
            self.tables = (b["paged_kv_indptr_buffer"], b["paged_kv_indices_buffer"],
                           b["paged_kv_last_page_len_buffer"])
        else:
            self.tables = (indptr.clone(), indices.clone(), last.clone())
        _Wrapper.plans += 1

    def run(self, q, paged_kv_cache, out=None):
        k, v = paged_kv_cache
        assert (q.dtype, k.dtype) == self.dtypes and k.shape[1] == self.page_size
        indptr, indices, last = (t.tolist() for t in self.tables)
        qo = self.qo_indptr()
        groups = q.shape[1] // k.shape[2]
        for i in range(len(last)):
            pages = indices[indptr[i] : indptr[i + 1]]
            n_kv = (len(pages) - 1) * self.page_size + last[i]
            keys = k[pages].flatten(0, 1)[:n_kv].repeat_interleave(groups, 1).float()
            vals = v[pages].flatten(0, 1)[:n_kv].repeat_interleave(groups, 1).float()
            qs = q[qo[i] : qo[i + 1]].float()
            scores = torch.einsum("qhd,khd->hqk", qs, keys) * self.sm_scale
            n_q = len(qs)
            mask = torch.arange(n_kv)[None, :] > torch.arange(n_kv - n_q, n_kv)[:, None]
            if self.causal:
                scores = scores.masked_fill(mask, float("-inf"))
            out[qo[i] : qo[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
        return out


class _Decode(_Wrapper):
    causal = False

    def plan(self, indptr, indices, last, heads, kv_heads, head_dim, page_size, *, sm_scale,
             q_data_type, kv_data_type):
        self._common_plan(indptr, indices, last, heads, kv_heads, page_size, q_data_type,
                          kv_data_type)
        self.sm_scale = sm_scale

    def qo_indptr(self):
        return list(range(len(self.tables[2]) + 1))


class _Prefill(_Wrapper):
    def __init__(self, workspace, layout, backend="auto"):
        super().__init__(workspace, layout)

    def plan(self, qo_indptr, indptr, indices, last, heads, kv_heads, head_dim, page_size, *,
             causal, sm_scale, q_data_type, kv_data_type):
        assert qo_indptr.device.type == "cpu"
        self._common_plan(indptr, indices, last, heads, kv_heads, page_size, q_data_type,
                          kv_data_type)
        self.qo, self.causal, self.sm_scale = qo_indptr.tolist(), causal, sm_scale

    def qo_indptr(self):
        return self.qo


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = _Decode
    module.BatchPrefillWithPagedKVCacheWrapper = _Prefill
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    monkeypatch.setattr(fi_backend, "WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(fi_backend, "_workspaces", {})
    # float32 keeps the comparison exact; the real kernels take fp16 / bf16 only.
    monkeypatch.setattr(fi_backend, "FLASHINFER_DTYPES", (torch.float32,))
    return module


def _fb(tables, q_lens, ctx_lens, bt, pad_to=None):
    """A ForwardBatch of sequences with these blocks; `pad_to` pads like cuda_graph.py does."""
    positions, slots, starts = [], [], []
    for table, n, ctx in zip(tables, q_lens, ctx_lens):
        starts.append(len(positions))
        for p in range(ctx - n, ctx):
            positions.append(p)
            slots.append(table[p // bt] * bt + p % bt)
    width = max(len(t) for t in tables)
    rows = [t + [0] * (width - len(t)) for t in tables]
    real = len(tables)
    ctx_lens, q_lens = list(ctx_lens), list(q_lens)
    if pad_to:
        pad = pad_to - real
        rows += [rows[0]] * pad
        positions += [positions[0]] * pad
        slots += [-1] * pad
        starts += list(range(real, pad_to))
        q_lens += [1] * pad
        ctx_lens += [ctx_lens[0]] * pad
    fb = ForwardBatch(torch.zeros(len(positions), dtype=torch.int64), torch.tensor(positions),
                      torch.tensor(slots), starts, q_lens, ctx_lens, torch.tensor(rows), bt)
    if pad_to:
        fb.ctx_lens_t = torch.tensor(ctx_lens, dtype=torch.int32)
        fb.num_real = real
    return fb


def _case(tables, q_lens, ctx_lens, bt, heads=4, kv_heads=2, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = (max(b for t in tables for b in t) + 2) * bt
    kc = torch.randn(slots, kv_heads, d, generator=gen)
    vc = torch.randn(slots, kv_heads, d, generator=gen)
    t = sum(q_lens)
    q = torch.randn(t, heads, d, generator=gen)
    k = torch.randn(t, kv_heads, d, generator=gen)
    v = torch.randn(t, kv_heads, d, generator=gen)
    return q, k, v, kc, vc


def _reference(q, k, v, kc, vc, fb, heads, kv_heads, d):
    ref = TorchAttention(heads, kv_heads, d)
    ref.prepare(fb)
    kc, vc = kc.clone(), vc.clone()
    return ref.forward(q, k, v, kc, vc, fb), kc, vc


CASES = [  # tables, q_lens, ctx_lens
    ([[3, 1], [0], [5, 2, 4]], [1, 1, 1], [20, 16, 33]),  # decode
    ([[3, 1], [0], [5, 2, 4]], [7, 1, 33], [20, 9, 33]),  # extend: prefix, decode row, prefill
]


@pytest.mark.parametrize(("bt", "heads", "kv_heads"), [(16, 4, 2), (64, 8, 1), (32, 2, 2)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_torch_backend(fake_flashinfer, bt, heads, kv_heads, case):
    tables, q_lens, ctx_lens = CASES[case]
    ctx_lens = [n * bt // 16 for n in ctx_lens]  # same shape of problem at every block size
    q_lens = [min(n, c) for n, c in zip(q_lens, ctx_lens)]
    fb = _fb(tables, q_lens, ctx_lens, bt)
    q, k, v, kc, vc = _case(tables, q_lens, ctx_lens, bt, heads, kv_heads)
    expected, kc_ref, vc_ref = _reference(q, k, v, kc, vc, fb, heads, kv_heads, 64)
    backend = get_attention_backend("flashinfer")(heads, kv_heads, 64, dtype=torch.float32)
    backend.prepare(fb)
    assert fb.attn_meta.page_tokens == 16  # 64-token blocks are read as 16-token pages
    out = backend.forward(q, k, v, kc, vc, fb)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    kind = _Decode if all(n == 1 for n in q_lens) else _Prefill
    assert isinstance(fb.attn_meta.wrapper, kind)


def test_micro_batches_in_flight_get_their_own_wrappers(fake_flashinfer):
    bt, heads, kv_heads, d = 16, 4, 2, 64
    backend = fi_backend.FlashInferAttention(heads, kv_heads, d, dtype=torch.float32)
    fbs = [_fb([[3, 1]], [1], [20], bt), _fb([[0], [5]], [1, 1], [9, 14], bt)]
    data = [_case([[3, 1], [0], [5]], fb.q_lens, fb.ctx_lens, bt, heads, kv_heads, seed=i)
            for i, fb in enumerate(fbs)]
    expected = [_reference(*x, fb, heads, kv_heads, d)[0] for x, fb in zip(data, fbs)]
    for fb in fbs:  # forward_pipelined prepares every micro-batch before the first layer
        backend.prepare(fb)
    assert fbs[0].attn_meta.wrapper is not fbs[1].attn_meta.wrapper
    for _layer in range(2):  # layers interleave; each uses its batch's plan
        for fb, (q, k, v, kc, vc), exp in zip(fbs, data, expected):
            torch.testing.assert_close(backend.forward(q, k, v, kc, vc, fb), exp,
                                       atol=1e-5, rtol=1e-5)
    first = fbs[0].attn_meta.wrapper
    del fbs, data, fb
    again = _fb([[3]], [1], [5], bt)
    backend.prepare(again)  # the batches are gone: their wrappers are lent again
    assert again.attn_meta.wrapper is first and len(backend._decode_pool.loans) == 2


def test_dtype_learned_at_the_first_forward(fake_flashinfer):
    bt, heads, kv_heads, d = 16, 4, 2, 64
    tables, q_lens, ctx_lens = [[2], [0, 1]], [3, 1], [3, 20]
    fb = _fb(tables, q_lens, ctx_lens, bt)
    q, k, v, kc, vc = _case(tables, q_lens, ctx_lens, bt, heads, kv_heads)
    expected, _, _ = _reference(q, k, v, kc, vc, fb, heads, kv_heads, d)
    backend = fi_backend.FlashInferAttention(heads, kv_heads, d)
    plans = _Wrapper.plans
    backend.prepare(fb)
    assert fb.attn_meta.pending is not None and _Wrapper.plans == plans
    torch.testing.assert_close(backend.forward(q, k, v, kc.clone(), vc.clone(), fb), expected,
                               atol=1e-5, rtol=1e-5)
    backend.forward(q, k, v, kc.clone(), vc.clone(), fb)
    assert _Wrapper.plans == plans + 1 and backend.dtype == torch.float32


@pytest.mark.parametrize("bt", [16, 32])
def test_graph_decode_plans_into_fixed_buffers(fake_flashinfer, bt):
    heads, kv_heads, d = 4, 2, 64
    backend = fi_backend.FlashInferAttention(heads, kv_heads, d, dtype=torch.float32)
    tables = [[3, 1, 6], [0], [5, 2]]
    static = _fb(tables, [1, 1, 1], [2 * bt + 1, 5, bt], bt, pad_to=4)
    q, k, v, kc, vc = _case(tables + [tables[0]], [1] * 4, static.ctx_lens, bt, heads, kv_heads)
    q[3] = q[0]  # the padding row asks what row 0 asks
    wrapper = None
    for step, ctx_lens in enumerate(([2 * bt + 1, 5, bt], [2 * bt + 2, 6, bt + 1])):
        # A new step: the same static tensors, written in place; only the real rows' host
        # context lengths are given (prepare_graph pads them like the device tensors).
        real = _fb(tables, [1, 1, 1], ctx_lens, bt)
        static.slot_mapping[:3] = real.slot_mapping
        static.positions[:3] = real.positions
        static.ctx_lens_t.copy_(torch.tensor(ctx_lens + ctx_lens[:1]))
        static.ctx_lens = list(ctx_lens)
        backend.prepare_graph(static)
        meta = static.attn_meta
        wrapper = wrapper or meta.wrapper
        assert meta.wrapper is wrapper  # one wrapper per bucket, planned again
        assert wrapper.buffers["paged_kv_indices_buffer"].numel() == 4 * 3 * bt // 16
        expected, kc_ref, vc_ref = _reference(q[:3], k[:3], v[:3], kc, vc, real, heads,
                                              kv_heads, d)
        out = backend.forward(q, k, v, kc, vc, static)
        torch.testing.assert_close(out[:3], expected, atol=1e-5, rtol=1e-5)
        # The padding row did not write the cache (slot -1); it attended as row 0 does.
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        torch.testing.assert_close(out[3], out[0])
        assert static.ctx_lens == ctx_lens  # not modified in place


def test_refuses_what_flashinfer_cannot_run(fake_flashinfer, monkeypatch):
    with pytest.raises(ValueError, match="head_dim 16"):
        fi_backend.FlashInferAttention(4, 2, 16)
    monkeypatch.setattr(fi_backend, "FLASHINFER_DTYPES", (torch.float16, torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        fi_backend.FlashInferAttention(4, 2, 64, dtype=torch.float32)


def test_one_page_a_block(fake_flashinfer, monkeypatch):
    monkeypatch.setattr(fi_backend.FlashInferAttention, "page_tokens", 0)
    tables, q_lens, ctx_lens = [[3, 1], [0], [5, 2, 4]], [7, 1, 33], [80, 36, 132]
    fb = _fb(tables, q_lens, ctx_lens, 64)
    q, k, v, kc, vc = _case(tables, q_lens, ctx_lens, 64)
    expected, _, _ = _reference(q, k, v, kc, vc, fb, 4, 2, 64)
    backend = fi_backend.FlashInferAttention(4, 2, 64, dtype=torch.float32)
    backend.prepare(fb)
    assert fb.attn_meta.page_tokens == 64
    torch.testing.assert_close(backend.forward(q, k, v, kc, vc, fb), expected, atol=1e-5,
                               rtol=1e-5)
