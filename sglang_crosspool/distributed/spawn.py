"""Starting ranks as processes: a rendezvous port, ranks 1..N-1 spawned, or all N for a test.

Processes are started with the `spawn` method (a fresh interpreter: no forked CUDA context, no
forked thread pools), so targets and their arguments must be picklable (module-level
functions, plain data).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import traceback

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on localhost now (the OS's pick; another process could take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def tcp_init_method(port: int | None = None) -> str:
    return f"tcp://{LOCALHOST}:{port or free_port()}"


def start_ranks(target, world_size: int, init_method: str, args: tuple = (),
                first: int = 1, name: str = "rank") -> list[mp.Process]:
    """Starts ranks first..world_size-1, each running target(rank, world_size, init_method,
    *args) in a spawned daemon process; returns them (the caller is usually rank 0)."""
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(first, world_size):
        proc = ctx.Process(target=target, args=(rank, world_size, init_method, *args),
                           name=f"{name}-{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def _collect(fn, rank, world_size, init_method, args, results) -> None:
    try:
        results.put((rank, True, fn(rank, world_size, init_method, *args)))
    except BaseException:  # noqa: BLE001 - reported to the caller with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, args: tuple = (), timeout_s: float = 300.0) -> list:
    """Runs fn(rank, world_size, init_method, *args) on ranks 0..N-1, each its own spawned
    process, and returns their results in rank order; raises RuntimeError with the failing
    ranks' tracebacks (or on timeout). fn and its results must be picklable."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = tcp_init_method()
    procs = [ctx.Process(target=_collect, args=(fn, r, world_size, init_method, args, results),
                         name=f"rank-{r}", daemon=True) for r in range(world_size)]
    for proc in procs:
        proc.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"ranks timed out after {timeout_s} s; done: {sorted(out)}, "
                                   f"failed: {errors}") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others are likely blocked in a collective with the failed rank
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [out[r] for r in range(world_size)]
