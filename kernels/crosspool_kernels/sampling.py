"""Batched sampling: top-k / top-p / min-p filtering and inverse-CDF sampling, and greedy.

In: probs [B, V] (non-negative, need not sum to 1), uniform [B] in [0, 1), and per-row
top_k [B] (int; <= 0 or >= V: off), top_p [B] (float; >= 1: off), min_p [B] (float; <= 0:
off), each also accepted as a scalar or None. Out: token ids [B] (int64). Greedy: logits
[B, V] -> the first index of each row's maximum (as torch.argmax).

Semantics (threshold form; the reference implements exactly this):
- top-k keeps p >= the k-th largest value (ties at the boundary are all kept);
- top-p keeps, within that set, each p whose strictly larger kept values sum to at most
  top_p * (kept mass): the smallest prefix reaching top_p, plus ties of its last value;
- min-p keeps p >= min_p * max(p);
then token i is drawn with probability proportional to its kept p: the first index whose
running kept mass (in vocabulary order) exceeds uniform * total kept mass.

The kernel finds both thresholds without sorting: probabilities are non-negative floats, so
their bit patterns order like their values, and a search over the 32 bits, NUM_PIVOTS
candidates per pass over the row, lands exactly on the k-th largest value (and on the top-p
cut). One program per row; a pass is skipped when its filter is off.
"""

import torch

from crosspool_kernels._common import next_pow2, tl, triton
from crosspool_kernels.tuned import get_config

DEFAULT_CONFIG = {"BLOCK_V": 256, "LOG_PIVOTS": 4, "num_warps": 4}
_INF_BITS = 0x7F800000  # +inf as float32 bits: pivots above it would be NaNs or negatives


@triton.jit
def _bit_search(row_ptr, vocab, goal, floor,
                COUNT: tl.constexpr, BLOCK_V: tl.constexpr, LOG_PIVOTS: tl.constexpr):
    """Largest float bit pattern b with pred(b): COUNT: #{p >= b} >= goal; else (mass):
    sum{p > b, p >= floor} > goal. Both predicates are monotone in b and hold at b = 0."""
    NUM_PIVOTS: tl.constexpr = 1 << LOG_PIVOTS
    ROUNDS: tl.constexpr = 32 // LOG_PIVOTS
    j = tl.arange(0, NUM_PIVOTS)
    lo = tl.zeros([], tl.int64)
    for r in tl.static_range(ROUNDS):
        step: tl.constexpr = 1 << (32 - (r + 1) * LOG_PIVOTS)
        piv_bits = tl.minimum(lo + j.to(tl.int64) * step, 0x7F800000)
        piv = piv_bits.to(tl.int32).to(tl.float32, bitcast=True)
        acc = tl.zeros([NUM_PIVOTS], tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            p = tl.load(row_ptr + offs, mask=offs < vocab, other=-1.0).to(tl.float32)
            if COUNT:
                hit = p[None, :] >= piv[:, None]
                acc += tl.sum(hit.to(tl.float32), 1)
            else:
                hit = (p[None, :] > piv[:, None]) & (p[None, :] >= floor)
                acc += tl.sum(tl.where(hit, p[None, :], 0.0), 1)
        if COUNT:
            pred = acc >= goal
        else:
            pred = acc > goal
        best = tl.max(tl.where(pred, j, 0), 0)
        lo = lo + best.to(tl.int64) * step
    return lo


@triton.jit
def _sample_kernel(
    probs_ptr, u_ptr, topk_ptr, topp_ptr, minp_ptr, out_ptr, stride_b, vocab,
    BLOCK_V: tl.constexpr, LOG_PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = probs_ptr + row * stride_b
    top_k = tl.load(topk_ptr + row)
    top_p = tl.load(topp_ptr + row).to(tl.float32)
    min_p = tl.load(minp_ptr + row).to(tl.float32)
    u = tl.load(u_ptr + row).to(tl.float32)

    pmax = tl.zeros([], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(row_ptr + offs, mask=offs < vocab, other=0.0).to(tl.float32)
        pmax = tl.maximum(pmax, tl.max(p, 0))

    thr_k = tl.zeros([], tl.float32)
    if (top_k > 0) & (top_k < vocab):
        bits = _bit_search(row_ptr, vocab, top_k.to(tl.float32), 0.0,
                           True, BLOCK_V, LOG_PIVOTS)
        thr_k = bits.to(tl.int32).to(tl.float32, bitcast=True)
    thr = thr_k
    if top_p < 1.0:
        mass = tl.zeros([], tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            p = tl.load(row_ptr + offs, mask=offs < vocab, other=0.0).to(tl.float32)
            mass += tl.sum(tl.where(p >= thr_k, p, 0.0), 0)
        bits = _bit_search(row_ptr, vocab, top_p * mass, thr_k, False, BLOCK_V, LOG_PIVOTS)
        # Keep p > float(bits), i.e. p >= the next float up.
        thr_p = (bits + 1).to(tl.int32).to(tl.float32, bitcast=True)
        thr = tl.maximum(thr, thr_p)
    if min_p > 0.0:
        thr = tl.maximum(thr, min_p * pmax)

    total = tl.zeros([], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(row_ptr + offs, mask=offs < vocab, other=-1.0).to(tl.float32)
        total += tl.sum(tl.where(p >= thr, p, 0.0), 0)
    target = u * total
    running = tl.zeros([], tl.float32)
    found = tl.full([], 2147483647, tl.int32)
    last = tl.full([], -1, tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(row_ptr + offs, mask=offs < vocab, other=-1.0).to(tl.float32)
        keep = p >= thr
        kept = tl.where(keep, p, 0.0)
        cum = running + tl.cumsum(kept, 0)
        found = tl.minimum(found, tl.min(tl.where(keep & (cum > target), offs, 2147483647), 0))
        last = tl.maximum(last, tl.max(tl.where(keep, offs, -1), 0))
        running += tl.sum(kept, 0)
    # Rounding can leave target at or past the summed mass (u near 1): take the last kept.
    tl.store(out_ptr + row, tl.where(found < vocab, found, last).to(tl.int64))


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, stride_b, vocab, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.zeros([], tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + row * stride_b + offs, mask=offs < vocab,
                    other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        idx = tl.min(tl.where(x == m, offs, 2147483647), 0)
        better = m > best  # strictly: the first maximum wins, as torch.argmax
        best_idx = tl.where(better, idx, best_idx)
        best = tl.where(better, m, best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def _per_row(x, batch: int, device, dtype, off_value) -> torch.Tensor:
    if x is None:
        x = off_value
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).expand(batch).contiguous()
    return torch.full((batch,), x, device=device, dtype=dtype)


def top_k_top_p_sample(probs: torch.Tensor, uniform: torch.Tensor, top_k=None, top_p=None,
                       min_p=None, config: dict | None = None) -> torch.Tensor:
    """Draws one token per row of probs [B, V] after the filters; returns int64 ids [B]."""
    batch, vocab = probs.shape
    assert probs.stride(-1) == 1
    dev = probs.device
    out = torch.empty(batch, device=dev, dtype=torch.int64)
    if batch == 0:
        return out
    cfg = config or get_config("sampling", {}, dev, probs.dtype, DEFAULT_CONFIG, batch=batch)
    assert 32 % cfg["LOG_PIVOTS"] == 0
    _sample_kernel[(batch,)](
        probs, _per_row(uniform, batch, dev, torch.float32, 0.0),
        _per_row(top_k, batch, dev, torch.int32, 0), _per_row(top_p, batch, dev, torch.float32, 1.0),
        _per_row(min_p, batch, dev, torch.float32, 0.0), out, probs.stride(0), vocab,
        BLOCK_V=min(cfg["BLOCK_V"], next_pow2(vocab)), LOG_PIVOTS=cfg["LOG_PIVOTS"],
        num_warps=cfg["num_warps"],
    )
    return out


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension of logits [B, V] (first index among equal maxima)."""
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty(batch, device=logits.device, dtype=torch.int64)
    if batch:
        _argmax_kernel[(batch,)](logits, out, logits.stride(0), vocab,
                                 BLOCK_V=min(1024, next_pow2(vocab)), num_warps=4)
    return out


def filter_mask_ref(probs: torch.Tensor, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """[B, V] bool: the tokens that the top-k, top-p and min-p filters keep."""
    batch, vocab = probs.shape
    dev = probs.device
    p = probs.float()
    k = _per_row(top_k, batch, dev, torch.int64, 0)
    tp = _per_row(top_p, batch, dev, torch.float32, 1.0)
    mp = _per_row(min_p, batch, dev, torch.float32, 0.0)
    desc = torch.sort(p, dim=-1, descending=True).values
    kth = desc.gather(1, (k - 1).clamp(0, vocab - 1)[:, None])
    thr = torch.where(((k > 0) & (k < vocab))[:, None], kth, torch.zeros_like(kth))
    in_k = torch.where(p >= thr, p, torch.zeros_like(p))
    # Mass strictly above each value within the top-k set: total minus the ascending cumsum
    # up to and including that value's last tie.
    asc = torch.sort(in_k, dim=-1).values
    cum = torch.cumsum(asc, dim=-1)
    upto = torch.searchsorted(asc, in_k, right=True) - 1
    above = cum[:, -1:] - cum.gather(1, upto)
    keep = (p >= thr) & ((above <= (tp * cum[:, -1])[:, None]) | (tp >= 1.0)[:, None])
    return keep & (p >= (mp * p.max(dim=-1).values)[:, None])


def top_k_top_p_sample_ref(probs: torch.Tensor, uniform: torch.Tensor, top_k=None, top_p=None,
                           min_p=None, **_) -> torch.Tensor:
    batch, vocab = probs.shape
    p = probs.float()
    keep = filter_mask_ref(probs, top_k, top_p, min_p)
    kept = torch.where(keep, p, torch.zeros_like(p))
    running = torch.cumsum(kept, dim=-1)
    target = _per_row(uniform, batch, probs.device, torch.float32, 0.0)[:, None] * running[:, -1:]
    idx = torch.arange(vocab, device=probs.device).expand(batch, vocab)
    first = torch.where(keep & (running > target), idx, vocab).min(dim=-1).values
    last = torch.where(keep, idx, -1).max(dim=-1).values
    return torch.where(first < vocab, first, last)


def greedy_sample_ref(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)
