"""The crossing's kernels: peer stores with per-row release flags, and bounded acquire waits.

The protocol that uses them (who writes which buffer and flag, when) is described in
`sglang_crosspool/transport/p2p.py`; these kernels only move bytes and flip flags.

- send_rows: rows [T, H] (+ top-k ids and weights [T, K]) -> the same rows of a destination
  area, usually a peer GPU's buffer; then, per row, the row's flag in the destination's memory
  is set to the sender's own counter for that row plus one (store-release, system scope).
- wait_rows: per row, spins until the row's flag reaches the receiver's own counter plus one
  (load-acquire, system scope), then advances the counter. Bounded: after `timeout_ns`
  (GPU global timer; under the interpreter, `max_spins` polls) or once the error word is set,
  it stops and, if it was the one that timed out, writes its `code` into the error word, and
  into the peer's (`peer_err`) too, so that the sender learns its data was never taken.
- wait_sum: wait_rows over S senders (one per FFN server), then out = x + sum of the S
  partial rows (float32 accumulation, one rounding), the residual add of the layer fused in.

Counters only grow and both ends advance theirs once per row per crossing, so flags are never
reset and a captured graph replays without host involvement. After an error the counters are
out of step: the link is then broken for good (the engine stops using it).

Every kernel has a torch reference with the same semantics for CPU tensors, which may live in
shared memory between processes: that is the CPU twin the protocol tests run.
"""

from __future__ import annotations

import time

import torch

from crosspool_kernels._common import HAS_TRITON, next_pow2, tl, triton

ERR_NONE = 0
ERR_TIMEOUT = 1  # codes below 100 are the receiver's own; 100 + j: waiting on FFN server j
ERR_PEER_BASE = 100
ERR_FAILED = 1000  # a peer reports that its forward raised; 1000 + server id
ERR_STALLED = 2000  # FFN server j waited in vain for the attention worker's inputs: 2000 + j


def _use_timer(device: torch.device) -> bool:
    return device.type == "cuda"


if HAS_TRITON:
    from triton.language.extra import cuda as _tl_cuda

    @triton.jit
    def _now(USE_TIMER: tl.constexpr):
        if USE_TIMER:
            return _tl_cuda.globaltimer()
        return tl.zeros((), tl.int64)

    @triton.jit
    def _spin(flag_ptr, want, err_ptr, code, timeout_ns, max_spins, USE_TIMER: tl.constexpr,
              peer_err_ptr, HAS_PEER: tl.constexpr):
        """Polls one flag until it reaches `want`, the error word is set, or time runs out."""
        v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        e = tl.load(err_ptr, volatile=True)
        t0 = _now(USE_TIMER)
        n = 0
        late = n < 0
        while (v < want) & (e == 0) & (late == 0):
            v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
            e = tl.load(err_ptr, volatile=True)
            n += 1
            if USE_TIMER:
                late = (_now(USE_TIMER) - t0) > timeout_ns
            else:
                late = n > max_spins
        if (v < want) & (e == 0):
            tl.atomic_cas(err_ptr, 0, code, sem="relaxed", scope="sys")
            if HAS_PEER:
                tl.atomic_cas(peer_err_ptr, 0, code, sem="relaxed", scope="sys")

    @triton.jit
    def _send_rows_kernel(
        h_ptr, ids_ptr, w_ptr, dst_h, dst_ids, dst_w, dst_flags, counts, stride_h, H, K,
        HAS_ROUTING: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0)
        for start in range(0, H, BLOCK_H):
            offs = start + tl.arange(0, BLOCK_H)
            m = offs < H
            tl.store(dst_h + row * H + offs, tl.load(h_ptr + row * stride_h + offs, mask=m),
                     mask=m)
        if HAS_ROUTING:
            k = tl.arange(0, BLOCK_K)
            mk = k < K
            tl.store(dst_ids + row * K + k, tl.load(ids_ptr + row * K + k, mask=mk), mask=mk)
            tl.store(dst_w + row * K + k, tl.load(w_ptr + row * K + k, mask=mk), mask=mk)
        # Every thread's stores are done before the flag is released.
        tl.debug_barrier()
        c = tl.load(counts + row) + 1
        tl.store(counts + row, c)
        tl.atomic_xchg(dst_flags + row, c, sem="release", scope="sys")

    @triton.jit
    def _wait_rows_kernel(flags, counts, err_ptr, peer_err_ptr, code, timeout_ns, max_spins,
                          USE_TIMER: tl.constexpr, HAS_PEER: tl.constexpr):
        row = tl.program_id(0)
        want = tl.load(counts + row) + 1
        _spin(flags + row, want, err_ptr, code, timeout_ns, max_spins, USE_TIMER, peer_err_ptr,
              HAS_PEER)
        tl.store(counts + row, want)

    @triton.jit
    def _wait_sum_kernel(
        x_ptr, parts_ptr, out_ptr, flags, counts, err_ptr, stride_x, stride_part, stride_flag,
        H, timeout_ns, max_spins,
        S: tl.constexpr, HAS_X: tl.constexpr, USE_TIMER: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0)
        for j in tl.static_range(S):
            want = tl.load(counts + j * stride_flag + row) + 1
            _spin(flags + j * stride_flag + row, want, err_ptr, 100 + j, timeout_ns, max_spins,
                  USE_TIMER, err_ptr, False)
            tl.store(counts + j * stride_flag + row, want)
        tl.debug_barrier()
        for start in range(0, H, BLOCK_H):
            offs = start + tl.arange(0, BLOCK_H)
            m = offs < H
            if HAS_X:
                acc = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
            else:
                acc = tl.zeros([BLOCK_H], tl.float32)
            for j in tl.static_range(S):
                part = tl.load(parts_ptr + j * stride_part + row * H + offs, mask=m, other=0.0,
                               cache_modifier=".cg")
                acc += part.to(tl.float32)
            tl.store(out_ptr + row * H + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def _block_h(h: int) -> int:
    return min(next_pow2(h), 1024)


def send_rows(h: torch.Tensor, ids: torch.Tensor | None, w: torch.Tensor | None,
              dst_h: torch.Tensor, dst_ids: torch.Tensor, dst_w: torch.Tensor,
              dst_flags: torch.Tensor, counts: torch.Tensor) -> None:
    """Stores h [T, H] (and ids, w [T, K]) as the flat prefixes of dst_h / dst_ids / dst_w,
    then releases dst_flags[:T] (one flag per row) with this side's counters + 1."""
    t, hidden = h.shape
    if t == 0:
        return
    assert h.stride(-1) == 1
    k = 0 if ids is None else ids.shape[1]
    _send_rows_kernel[(t,)](
        h, ids if k else h, w if k else h, dst_h, dst_ids, dst_w, dst_flags, counts,
        h.stride(0), hidden, k, HAS_ROUTING=k > 0, BLOCK_H=_block_h(hidden),
        BLOCK_K=next_pow2(max(k, 1)), num_warps=4)


def wait_rows(num_rows: int, flags: torch.Tensor, counts: torch.Tensor, err: torch.Tensor,
              code: int, timeout_ns: int, max_spins: int = 1 << 20,
              peer_err: torch.Tensor | None = None) -> None:
    """Waits until flags[:num_rows] reach counts + 1 (then advances counts), or an error; a
    timeout also writes `code` into `peer_err`."""
    if num_rows == 0:
        return
    _wait_rows_kernel[(num_rows,)](flags, counts, err, err if peer_err is None else peer_err,
                                   code, timeout_ns, max_spins,
                                   USE_TIMER=_use_timer(flags.device),
                                   HAS_PEER=peer_err is not None, num_warps=1)


def wait_sum(x: torch.Tensor | None, parts: torch.Tensor, out: torch.Tensor,
             flags: torch.Tensor, counts: torch.Tensor, err: torch.Tensor, num_rows: int,
             hidden: int, timeout_ns: int, max_spins: int = 1 << 20) -> torch.Tensor:
    """out[:T] = x + sum_j parts[j] rows, once flags[j, :T] reach counts[j] + 1 for every j.

    parts [S, >= T*H] flat per sender; flags, counts [S, >= T]."""
    if num_rows == 0:
        return out
    servers = parts.shape[0]
    _wait_sum_kernel[(num_rows,)](
        x if x is not None else out, parts, out, flags, counts, err,
        x.stride(0) if x is not None else 0, parts.stride(0), flags.stride(0), hidden,
        timeout_ns, max_spins, S=servers, HAS_X=x is not None,
        USE_TIMER=_use_timer(flags.device), BLOCK_H=_block_h(hidden), num_warps=4)
    return out


# -- torch references: the same semantics for CPU tensors (shared memory between processes) ---

def send_rows_ref(h, ids, w, dst_h, dst_ids, dst_w, dst_flags, counts) -> None:
    t, hidden = h.shape
    if t == 0:
        return
    dst_h[: t * hidden].copy_(h.reshape(-1))
    if ids is not None:
        k = ids.shape[1]
        dst_ids[: t * k].copy_(ids.reshape(-1))
        dst_w[: t * k].copy_(w.reshape(-1))
    # NOTE: the data is in place before any flag moves (a plain store order on the host).
    counts[:t] += 1
    dst_flags[:t].copy_(counts[:t])


def _spin_ref(ready, err: torch.Tensor, code: int, timeout_ns: int,
              peer_err: torch.Tensor | None = None) -> bool:
    """Polls `ready()` with a growing sleep (the CPU twin runs on few cores) until it holds,
    the error word is set or time runs out; sets the error word on its own timeout."""
    deadline = time.monotonic() + timeout_ns / 1e9
    pause = 0.0
    while not ready():
        if int(err[0]) != 0:
            return False
        if time.monotonic() > deadline:
            if int(err[0]) == 0:
                err[0] = code
                if peer_err is not None and int(peer_err[0]) == 0:
                    peer_err[0] = code
            return False
        time.sleep(pause)
        pause = min(max(pause * 2, 1e-5), 1e-3)
    return True


def wait_rows_ref(num_rows, flags, counts, err, code, timeout_ns, max_spins=None,
                  peer_err=None) -> None:
    if num_rows == 0:
        return
    want = counts[:num_rows] + 1
    _spin_ref(lambda: bool((flags[:num_rows] >= want).all()), err, code, timeout_ns, peer_err)
    counts[:num_rows] = want


def wait_sum_ref(x, parts, out, flags, counts, err, num_rows, hidden, timeout_ns,
                 max_spins=None):
    if num_rows == 0:
        return out
    n = num_rows * hidden
    for j in range(parts.shape[0]):
        want = counts[j, :num_rows] + 1
        _spin_ref(lambda: bool((flags[j, :num_rows] >= want).all()), err,  # noqa: B023
                  ERR_PEER_BASE + j, timeout_ns)
        counts[j, :num_rows] = want
    acc = torch.zeros(num_rows, hidden, dtype=torch.float32, device=out.device)
    if x is not None:
        acc += x[:num_rows].float()
    for j in range(parts.shape[0]):
        acc += parts[j, :n].view(num_rows, hidden).float()
    out[:num_rows].copy_(acc.to(out.dtype))
    return out
