"""Starting ranks as processes: a rendezvous port, ranks 1..N-1 spawned, or all N for a test.

Every rank is a fresh interpreter (no forked CUDA context, no forked thread pools), so targets
and their arguments must be picklable (module-level functions of importable modules, plain
data). `start_ranks` starts them with `subprocess` (`python -m sglang_crosspool.distributed.spawn
NAME RANK WORLD ADDRESS`, the target and its arguments pickled on stdin), so that a daemonic
process, such as the server's scheduler process, can start ranks too (multiprocessing refuses
children to daemons); `run_ranks` uses multiprocessing's spawn (tests, benchmarks).
NOTE: started ranks are not killed with their parent: their owner stops them, and a target
should also leave when its parent is gone (engine/tensor_parallel.py watches for it).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import socket
import subprocess
import sys
import traceback

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on localhost now (the OS's pick; another process could take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def tcp_init_method(port: int | None = None) -> str:
    return f"tcp://{LOCALHOST}:{port or free_port()}"


class RankProcess:
    """A started rank, with the few methods of multiprocessing.Process its owner needs."""

    def __init__(self, popen: subprocess.Popen, name: str):
        self.popen = popen
        self.name = name

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()


def start_ranks(target, world_size: int, init_method: str, args: tuple = (),
                first: int = 1, name: str = "rank") -> list[RankProcess]:
    """Starts ranks first..world_size-1, each running target(rank, world_size, init_method,
    *args) in a new interpreter; returns them (the caller is usually rank 0)."""
    # sys.path first, so that the child can import the target's module before unpickling it.
    payload = pickle.dumps(list(sys.path)) + pickle.dumps((target, args))
    procs = []
    for rank in range(first, world_size):
        popen = subprocess.Popen(
            [sys.executable, "-m", "sglang_crosspool.distributed.spawn", name, str(rank),
             str(world_size), init_method], stdin=subprocess.PIPE)
        popen.stdin.write(payload)
        popen.stdin.close()
        procs.append(RankProcess(popen, f"{name}-{rank}"))
    return procs


def _rank_main(argv: list[str]) -> None:
    """A started rank: reads sys.path, then its target and arguments, from stdin."""
    _, rank, world_size, init_method = argv
    stream = sys.stdin.buffer
    sys.path[:] = pickle.load(stream)
    target, args = pickle.load(stream)
    target(int(rank), int(world_size), init_method, *args)


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


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
