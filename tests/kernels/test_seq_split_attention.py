"""Sequence-split attention backends on R ranks run as threads in one process: each rank
stores only its pages' K/V and attends over them, the partials merge to attention over the
whole sequence (GQA torch path, MLA torch path, MLA decode through the Triton kernel with its
log-sum-exp, under the interpreter on CPU)."""

import threading

import pytest
import torch

pytest.importorskip("triton")

from crosspool_kernels.decode_attention import decode_attention
from crosspool_kernels.mla_decode import mla_decode

from sglang_crosspool.engine import seq_split
from sglang_crosspool.engine.attention import TorchAttention, TritonAttention
from sglang_crosspool.engine.attention_mla import LatentAttention, TritonLatentAttention
from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists
from sglang_crosspool.engine.partial_attention import (
    partial_attention,
    partial_latent_attention,
)
from sglang_crosspool.memory.kv_pool import KVPool
from sglang_crosspool.memory.kv_split import SplitKVPool
from sglang_crosspool.memory.page_backend import SimulatedPageBackend

HEADS, KV_HEADS, DIM = 4, 2, 8
RANK, ROPE = 24, 8
# NOTE: the Triton interpreter patches triton.language while a kernel runs, so two threads
# must not run kernels at once: kernel calls of the ranks' threads take this lock.
_INTERPRETER = threading.Lock()


@pytest.fixture(autouse=True)
def _one_kernel_at_a_time(monkeypatch):
    merge = seq_split.merge_state

    def locked_merge(*args):
        with _INTERPRETER:
            return merge(*args)

    monkeypatch.setattr(seq_split, "merge_state", locked_merge)


class ThreadGroup:
    """all_gather between threads of one process (the Group contract's part used here)."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world_size, self.shared = rank, world, shared

    def all_gather(self, t, dim=0):
        self.shared["parts"][self.rank] = t
        self.shared["barrier"].wait()
        out = torch.cat(self.shared["parts"], dim=dim)
        self.shared["barrier"].wait()
        return out


def _run_ranks(world: int, fn):
    shared = {"parts": [None] * world, "barrier": threading.Barrier(world, timeout=60)}
    results, errors = [None] * world, []

    def run(r):
        try:
            results[r] = fn(ThreadGroup(r, world, shared))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _step(pool: SplitKVPool, blocks, start: int, n: int, ctx: int) -> ForwardBatch:
    t = pool.block_tokens("m")
    positions = list(range(start, start + n))
    slots = [blocks[p // t] * t + p % t for p in positions]
    lists = StepLists([0] * n, positions, slots, [0], [n], [ctx], [list(blocks)])
    return ForwardBatch.from_lists(lists, t, "cpu")


def _pool(group, latent: bool) -> SplitKVPool:
    pool = SplitKVPool(KVPool(SimulatedPageBackend(256), 64), group.rank, group.world_size)
    heads, dim = (1, RANK + ROPE) if latent else (KV_HEADS, DIM)
    pool.add_model("m", 1, heads, dim, torch.float32, max_tokens=256, latent=latent)
    return pool


def _locked(backend):
    """The backend with its decode kernel taking the interpreter lock."""
    kernel = getattr(backend, "_kernel", None)
    if kernel is not None:
        def locked(*args, **kwargs):
            with _INTERPRETER:
                return kernel(*args, **kwargs)

        backend._kernel = locked
    return backend


@pytest.mark.parametrize(("world", "inner"), [(2, TorchAttention), (3, TritonAttention)])
def test_gqa_prefill_then_decode_matches_unsplit(world, inner):
    gen = torch.Generator().manual_seed(0)
    length = 23  # blocks of 4 tokens (256-byte pages): 6 blocks over the ranks
    q = torch.randn(length, HEADS, DIM, generator=gen)
    k = torch.randn(length, KV_HEADS, DIM, generator=gen)
    v = torch.randn(length, KV_HEADS, DIM, generator=gen)

    def rank_fn(group):
        pool = _pool(group, latent=False)
        blocks = pool.alloc_blocks("m", 6)
        backend = _locked(seq_split.wrap(inner(HEADS, KV_HEADS, DIM), group,
                                         pool.rank_slots("m")))
        kv = pool.models["m"]
        outs = []
        for start, n in ((0, 20), (20, 3)):  # a prefill, then decode-sized steps
            for s0 in ([start] if n == 20 else range(start, start + n)):
                m = n if n == 20 else 1
                fb = _step(pool, blocks, s0, m, s0 + m)
                backend.prepare(fb)
                outs.append(backend.forward(q[s0:s0 + m], k[s0:s0 + m], v[s0:s0 + m],
                                            kv.k[0], kv.v[0], fb))
        return torch.cat(outs), pool.stats()["ranks"]

    results = _run_ranks(world, rank_fn)
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) * DIM**-0.5
    pos = torch.arange(length)
    scores = scores.masked_fill(pos[None, None] > pos[None, :, None], -torch.inf)
    want = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v.repeat_interleave(2, 1))
    for out, ranks in results:
        torch.testing.assert_close(out, want.reshape(length, -1), atol=1e-5, rtol=1e-5)
        assert all(r["used_pages"] for r in ranks)  # every rank holds part of the request
    assert all(torch.equal(results[0][0], r[0]) for r in results)  # same bits on every rank


@pytest.mark.parametrize(("world", "inner"), [(2, LatentAttention), (3, TritonLatentAttention)])
def test_mla_prefill_then_decode_matches_unsplit(world, inner):
    gen = torch.Generator().manual_seed(1)
    length, scale = 13, 0.3  # latents of 32 floats: 2 tokens a 256-byte page, 7 blocks
    q = torch.randn(length, HEADS, RANK + ROPE, generator=gen)
    lat = torch.randn(length, 1, RANK + ROPE, generator=gen)

    def rank_fn(group):
        pool = _pool(group, latent=True)
        blocks = pool.alloc_blocks("m", 7)
        backend = _locked(seq_split.wrap(inner(HEADS, RANK + ROPE, RANK, scale), group,
                                         pool.rank_slots("m")))
        kv = pool.models["m"]
        outs = []
        fb = _step(pool, blocks, 0, 10, 10)
        backend.prepare(fb)
        outs.append(backend.forward(q[:10], lat[:10], lat[:10], kv.k[0], kv.k[0], fb))
        for p in range(10, length):
            fb = _step(pool, blocks, p, 1, p + 1)
            backend.prepare(fb)
            outs.append(backend.forward(q[p:p + 1], lat[p:p + 1], lat[p:p + 1], kv.k[0],
                                        kv.k[0], fb))
        return torch.cat(outs)

    pos = torch.arange(length)
    want, _ = partial_latent_attention(q, pos, lat[:, 0], pos, RANK, scale)
    for out in _run_ranks(world, rank_fn):
        torch.testing.assert_close(out, want.reshape(length, -1), atol=1e-5, rtol=1e-5)


def test_mla_decode_writes_log_sum_exp():
    gen = torch.Generator().manual_seed(2)
    block_tokens, lens = 4, [9, 0, 16]
    cache = torch.randn(12 * block_tokens, 1, RANK + ROPE, generator=gen)
    table = torch.tensor([[3, 1, 7, 0], [0, 0, 0, 0], [2, 4, 5, 6]])
    q = torch.randn(3, HEADS, RANK + ROPE, generator=gen)
    for splits in (1, 3):
        lse = torch.empty(3, HEADS)
        out = mla_decode(q, cache, table, lens, block_tokens, RANK, 0.2, num_splits=splits,
                         out=torch.empty(3, HEADS, RANK), lse_out=lse)
        for i, n in enumerate(lens):
            slots = (table[i, :, None] * block_tokens + torch.arange(block_tokens)).flatten()
            keys = cache[slots[:n], 0]
            want, want_lse = partial_latent_attention(q[i:i + 1], torch.tensor([n]), keys,
                                                      torch.arange(n), RANK, 0.2)
            torch.testing.assert_close(out[i], want[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[i], want_lse[0], atol=1e-5, rtol=1e-5)


def test_decode_attention_writes_log_sum_exp():
    gen = torch.Generator().manual_seed(3)
    block_tokens, lens = 4, [9, 0, 16]
    k = torch.randn(12 * block_tokens, KV_HEADS, DIM, generator=gen)
    v = torch.randn(12 * block_tokens, KV_HEADS, DIM, generator=gen)
    table = torch.tensor([[3, 1, 7, 0], [0, 0, 0, 0], [2, 4, 5, 6]])
    q = torch.randn(3, HEADS, DIM, generator=gen)
    for splits in (1, 3):
        lse = torch.empty(3, HEADS)
        out = decode_attention(q, k, v, table, lens, block_tokens, sm_scale=0.3,
                               num_splits=splits, out=torch.empty(3, HEADS, DIM), lse_out=lse)
        for i, n in enumerate(lens):
            slots = (table[i, :, None] * block_tokens + torch.arange(block_tokens)).flatten()
            want, want_lse = partial_attention(q[i:i + 1], torch.tensor([n]), k[slots[:n]],
                                               v[slots[:n]], torch.arange(n), 0.3)
            torch.testing.assert_close(out[i], want[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[i], want_lse[0], atol=1e-5, rtol=1e-5)
