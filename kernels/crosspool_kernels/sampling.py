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

The kernels find both thresholds without sorting: probabilities are non-negative floats, so
their bit patterns order like their values, and a search over the 32 bits with NUM_PIVOTS
candidates per round lands exactly on the k-th largest value (and on the top-p cut). Each row
is split into chunks of about CHUNK tokens, one program each, so that one row fills many SMs;
a round is one launch whose programs first fold the previous round's per-chunk partials (every
program of a row computes the same fold) and then count their chunk against the new pivots.
Launches: 32 / LOG_PIVOTS rounds per search, two searches, then the kept mass per chunk and
the draw: a fixed sequence, so the whole thing can be captured in a CUDA graph. A round of a
filter that is off does no loads.
"""

import torch

from crosspool_kernels._common import cdiv, next_pow2, tl, triton
from crosspool_kernels.tuned import get_config

# H100, V=152k, top-k + top-p: 144 us at B=1, 214 at 16, 587 at 64 (16 pivots: 160, 232, 602;
# 256 pivots spill registers: milliseconds).
DEFAULT_CONFIG = {"BLOCK_V": 1024, "CHUNK": 4096, "LOG_PIVOTS": 2, "num_warps": 4}


@triton.jit
def _fold(part_ptr, lo_ptr, rnd, goal, num_chunks,
          COUNT: tl.constexpr, BLOCK_P: tl.constexpr, LOG_PIVOTS: tl.constexpr):
    """The bit pattern after round `rnd`: from its per-chunk partials [P, NUM_PIVOTS] and the
    round's base `lo`, the largest pivot whose predicate holds (count >= goal, mass > goal)."""
    NUM_PIVOTS: tl.constexpr = 1 << LOG_PIVOTS
    c = tl.arange(0, BLOCK_P)
    j = tl.arange(0, NUM_PIVOTS)
    part = tl.load(part_ptr + c[:, None] * NUM_PIVOTS + j[None, :],
                   mask=(c < num_chunks)[:, None], other=0.0)
    total = tl.sum(part, 0)
    if COUNT:
        pred = total >= goal
    else:
        pred = total > goal
    best = tl.max(tl.where(pred, j, 0), 0)
    step = tl.full([], 1, tl.int64) << (32 - (rnd + 1) * LOG_PIVOTS)
    return tl.load(lo_ptr) + best.to(tl.int64) * step


@triton.jit
def _as_float(bits):
    return tl.minimum(bits, 0x7F800000).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _round_kernel(
    probs_ptr, topk_ptr, topp_ptr, part_k_ptr, part_p_ptr, lo_k_ptr, lo_p_ptr,
    max_ptr, mass_ptr, thr_k_ptr,
    stride_b, vocab, chunk, num_chunks, rnd, num_rows,
    TOP_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
    LOG_PIVOTS: tl.constexpr,
):
    """One round of the top-k search (TOP_P False) or of the top-p search (True).

    Buffers: part_* [2, B, P, NUM_PIVOTS] and lo_* [2, B] alternate by round parity, so a
    launch reads only what the previous launch wrote."""
    NUM_PIVOTS: tl.constexpr = 1 << LOG_PIVOTS
    ROUNDS: tl.constexpr = 32 // LOG_PIVOTS
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    row_ptr = probs_ptr + row * stride_b
    top_k = tl.load(topk_ptr + row)
    use_k = (top_k > 0) & (top_k < vocab)
    begin = pid * chunk
    end = tl.minimum(begin + chunk, vocab)
    cur = rnd % 2
    prev = 1 - cur
    slab = num_rows * num_chunks * NUM_PIVOTS  # one parity's partials
    mine = row * num_chunks * NUM_PIVOTS
    if TOP_P:
        part_ptr = part_p_ptr
        lo_ptr = lo_p_ptr
        active = tl.load(topp_ptr + row) < 1.0
    else:
        part_ptr = part_k_ptr
        lo_ptr = lo_k_ptr
        active = use_k

    thr_k = tl.zeros([], tl.float32)
    goal = tl.zeros([], tl.float32)
    lo = tl.zeros([], tl.int64)
    if TOP_P:
        if rnd == 0:
            # Close the top-k search, record its threshold and this chunk's top-k mass.
            if use_k:
                last = (ROUNDS - 1) % 2
                bits = _fold(part_k_ptr + last * slab + mine, lo_k_ptr + last * num_rows + row,
                             ROUNDS - 1, top_k.to(tl.float32), num_chunks, True, BLOCK_P,
                             LOG_PIVOTS)
                thr_k = _as_float(bits)
            mass = tl.zeros([], tl.float32)
            for v0 in range(begin, end, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                p = tl.load(row_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
                mass += tl.sum(tl.where(p >= thr_k, p, 0.0), 0)
            tl.store(mass_ptr + row * num_chunks + pid, mass)
            tl.store(thr_k_ptr + row, thr_k)
        else:
            thr_k = tl.load(thr_k_ptr + row)
            c = tl.arange(0, BLOCK_P)
            masses = tl.load(mass_ptr + row * num_chunks + c, mask=c < num_chunks, other=0.0)
            goal = tl.load(topp_ptr + row).to(tl.float32) * tl.sum(masses, 0)
    else:
        goal = top_k.to(tl.float32)
        if rnd == 0:
            pmax = tl.zeros([], tl.float32)
            for v0 in range(begin, end, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                p = tl.load(row_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
                pmax = tl.maximum(pmax, tl.max(p, 0))
            tl.store(max_ptr + row * num_chunks + pid, pmax)
    if rnd > 0:
        lo = _fold(part_ptr + prev * slab + mine, lo_ptr + prev * num_rows + row, rnd - 1,
                   goal, num_chunks, not TOP_P, BLOCK_P, LOG_PIVOTS)
    if pid == 0:
        tl.store(lo_ptr + cur * num_rows + row, lo)

    j = tl.arange(0, NUM_PIVOTS)
    acc = tl.zeros([NUM_PIVOTS], tl.float32)
    if active:
        step = tl.full([], 1, tl.int64) << (32 - (rnd + 1) * LOG_PIVOTS)
        piv = _as_float(lo + j.to(tl.int64) * step)
        for v0 in range(begin, end, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            p = tl.load(row_ptr + offs, mask=offs < end, other=-1.0).to(tl.float32)
            if TOP_P:
                hit = (p[None, :] > piv[:, None]) & (p[None, :] >= thr_k)
                acc += tl.sum(tl.where(hit, p[None, :], 0.0), 1)
            else:
                acc += tl.sum((p[None, :] >= piv[:, None]).to(tl.float32), 1)
    tl.store(part_ptr + cur * slab + mine + pid * NUM_PIVOTS + j, acc)


@triton.jit
def _kept_mass_kernel(
    probs_ptr, topp_ptr, minp_ptr, part_p_ptr, lo_p_ptr, max_ptr, mass_ptr, thr_k_ptr,
    thr_ptr, kept_ptr, stride_b, vocab, chunk, num_chunks, num_rows,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, LOG_PIVOTS: tl.constexpr,
):
    """Closes the top-p search, combines the three filters into one threshold per row and
    sums the kept mass of this chunk."""
    NUM_PIVOTS: tl.constexpr = 1 << LOG_PIVOTS
    ROUNDS: tl.constexpr = 32 // LOG_PIVOTS
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    c = tl.arange(0, BLOCK_P)
    thr = tl.load(thr_k_ptr + row)
    top_p = tl.load(topp_ptr + row).to(tl.float32)
    if top_p < 1.0:
        masses = tl.load(mass_ptr + row * num_chunks + c, mask=c < num_chunks, other=0.0)
        last = (ROUNDS - 1) % 2
        bits = _fold(part_p_ptr + (last * num_rows + row) * num_chunks * NUM_PIVOTS,
                     lo_p_ptr + last * num_rows + row, ROUNDS - 1, top_p * tl.sum(masses, 0),
                     num_chunks, False, BLOCK_P, LOG_PIVOTS)
        thr = tl.maximum(thr, _as_float(bits + 1))  # keep p > float(bits)
    min_p = tl.load(minp_ptr + row).to(tl.float32)
    if min_p > 0.0:
        pmax = tl.max(tl.load(max_ptr + row * num_chunks + c, mask=c < num_chunks, other=0.0), 0)
        thr = tl.maximum(thr, min_p * pmax)
    if pid == 0:
        tl.store(thr_ptr + row, thr)
    begin = pid * chunk
    end = tl.minimum(begin + chunk, vocab)
    kept = tl.zeros([], tl.float32)
    for v0 in range(begin, end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(probs_ptr + row * stride_b + offs, mask=offs < end, other=-1.0)
        p = p.to(tl.float32)
        kept += tl.sum(tl.where(p >= thr, p, 0.0), 0)
    tl.store(kept_ptr + row * num_chunks + pid, kept)


@triton.jit
def _draw_kernel(
    probs_ptr, u_ptr, thr_ptr, kept_ptr, out_ptr, stride_b, vocab, chunk, num_chunks,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Inverse CDF over the kept mass: exactly one program of a row holds the target."""
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    c = tl.arange(0, BLOCK_P)
    kept = tl.load(kept_ptr + row * num_chunks + c, mask=c < num_chunks, other=0.0)
    # Every program computes the same cumsum, so the chunks' ranges tile [0, total) exactly.
    cum = tl.cumsum(kept, 0)
    total = tl.sum(tl.where(c == num_chunks - 1, cum, 0.0), 0)
    hi = tl.sum(tl.where(c == pid, cum, 0.0), 0)
    lo = tl.sum(tl.where(c == pid - 1, cum, 0.0), 0)
    last_nonempty = tl.max(tl.where((kept > 0.0) & (c < num_chunks), c, -1), 0)
    target = tl.load(u_ptr + row).to(tl.float32) * total
    holds = (lo <= target) & (target < hi)
    # Rounding can leave target at or past the total (u near 1): the last kept token wins.
    fallback = (target >= total) & (pid == tl.maximum(last_nonempty, 0))
    if holds | fallback:
        thr = tl.load(thr_ptr + row)
        begin = pid * chunk
        end = tl.minimum(begin + chunk, vocab)
        running = lo
        found = tl.full([], 2147483647, tl.int32)
        last = tl.full([], -1, tl.int32)
        for v0 in range(begin, end, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            p = tl.load(probs_ptr + row * stride_b + offs, mask=offs < end, other=-1.0)
            p = p.to(tl.float32)
            keep = p >= thr
            k = tl.where(keep, p, 0.0)
            run = running + tl.cumsum(k, 0)
            hit = keep & (run > target) & (k > 0.0)
            found = tl.minimum(found, tl.min(tl.where(hit, offs, 2147483647), 0))
            last = tl.maximum(last, tl.max(tl.where(keep & (k > 0.0), offs, -1), 0))
            running += tl.sum(k, 0)
        pick = tl.where(holds & (found < vocab), found, last)
        tl.store(out_ptr + row, tl.maximum(pick, 0).to(tl.int64))


@triton.jit
def _argmax_chunk_kernel(x_ptr, val_ptr, idx_ptr, stride_b, vocab, chunk, num_chunks,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    begin = pid * chunk
    end = tl.minimum(begin + chunk, vocab)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    for v0 in range(begin, end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + row * stride_b + offs, mask=offs < end,
                    other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        idx = tl.min(tl.where(x == m, offs, 2147483647), 0)
        better = m > best  # strictly: the first maximum wins, as torch.argmax
        best_idx = tl.where(better, idx, best_idx)
        best = tl.where(better, m, best)
    tl.store(val_ptr + row * num_chunks + pid, best)
    tl.store(idx_ptr + row * num_chunks + pid, best_idx)


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, num_chunks, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_P)
    mask = c < num_chunks
    val = tl.load(val_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_chunks + c, mask=mask, other=2147483647)
    m = tl.max(val, 0)
    best = tl.min(tl.where(val == m, idx, 2147483647), 0)
    tl.store(out_ptr + row, tl.where(best == 2147483647, 0, best).to(tl.int64))


def _chunks(vocab: int, cfg: dict) -> tuple[int, int, int]:
    """(chunk length, chunks per row, BLOCK_V): chunks are whole blocks."""
    block_v = min(cfg["BLOCK_V"], next_pow2(vocab))
    chunk = cdiv(min(cfg["CHUNK"], vocab), block_v) * block_v
    return chunk, cdiv(vocab, chunk), block_v


def _per_row(x, batch: int, device, dtype, off_value) -> torch.Tensor:
    if x is None:
        x = off_value
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).expand(batch).contiguous()
    return torch.full((batch,), x, device=device, dtype=dtype)


def top_k_top_p_sample(probs: torch.Tensor, uniform: torch.Tensor, top_k=None, top_p=None,
                       min_p=None, config: dict | None = None) -> torch.Tensor:
    """Draws one token per row of probs [B, V] after the filters; returns int64 ids [B].

    NOTE: per-row parameters given as Python lists or scalars are copied to the device here;
    under CUDA-graph capture pass them (and uniform) as device tensors.
    """
    batch, vocab = probs.shape
    assert probs.stride(-1) == 1
    dev = probs.device
    out = torch.zeros(batch, device=dev, dtype=torch.int64)
    if batch == 0:
        return out
    cfg = config or get_config("sampling", {}, dev, probs.dtype, DEFAULT_CONFIG, batch=batch)
    log_pivots = cfg["LOG_PIVOTS"]
    assert 32 % log_pivots == 0
    chunk, num_chunks, block_v = _chunks(vocab, cfg)
    pivots = 1 << log_pivots

    def buf(*shape, dtype=torch.float32):
        return torch.empty(shape, device=dev, dtype=dtype)

    part_k, part_p = buf(2, batch, num_chunks, pivots), buf(2, batch, num_chunks, pivots)
    lo_k, lo_p = buf(2, batch, dtype=torch.int64), buf(2, batch, dtype=torch.int64)
    chunk_max, chunk_mass, kept = (buf(batch, num_chunks) for _ in range(3))
    thr_k, thr = buf(batch), buf(batch)
    u = _per_row(uniform, batch, dev, torch.float32, 0.0)
    k = _per_row(top_k, batch, dev, torch.int32, 0)
    p = _per_row(top_p, batch, dev, torch.float32, 1.0)
    m = _per_row(min_p, batch, dev, torch.float32, 0.0)
    grid = (batch, num_chunks)
    sizes = {"BLOCK_P": next_pow2(num_chunks), "BLOCK_V": block_v}
    warps = cfg["num_warps"]
    for top_p_phase in (False, True):
        for rnd in range(32 // log_pivots):
            _round_kernel[grid](
                probs, k, p, part_k, part_p, lo_k, lo_p, chunk_max, chunk_mass, thr_k,
                probs.stride(0), vocab, chunk, num_chunks, rnd, batch,
                TOP_P=top_p_phase, LOG_PIVOTS=log_pivots, num_warps=warps, **sizes,
            )
    _kept_mass_kernel[grid](
        probs, p, m, part_p, lo_p, chunk_max, chunk_mass, thr_k, thr, kept,
        probs.stride(0), vocab, chunk, num_chunks, batch, LOG_PIVOTS=log_pivots,
        num_warps=warps, **sizes,
    )
    _draw_kernel[grid](probs, u, thr, kept, out, probs.stride(0), vocab, chunk, num_chunks,
                       num_warps=warps, **sizes)
    return out


def greedy_sample(logits: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """argmax over the last dimension of logits [B, V] (first index among equal maxima)."""
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty(batch, device=logits.device, dtype=torch.int64)
    if batch == 0:
        return out
    cfg = config or DEFAULT_CONFIG
    chunk, num_chunks, block_v = _chunks(vocab, cfg)
    vals = torch.empty(batch, num_chunks, device=logits.device, dtype=torch.float32)
    idx = torch.empty(batch, num_chunks, device=logits.device, dtype=torch.int32)
    _argmax_chunk_kernel[(batch, num_chunks)](logits, vals, idx, logits.stride(0), vocab, chunk,
                                              num_chunks, BLOCK_V=block_v, num_warps=4)
    _argmax_merge_kernel[(batch,)](vals, idx, out, num_chunks, BLOCK_P=next_pow2(num_chunks),
                                   num_warps=1)
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
