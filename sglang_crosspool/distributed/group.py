"""`Group`: the collectives one model's ranks use; a one-rank identity and torch.distributed.

See the package docstring for the contract. Every collective must be called by every rank of
the group in the same order (lockstep); a rank that skips one leaves the others blocked until
the group's timeout.
"""

from __future__ import annotations

import datetime
import os
import pickle
from abc import ABC, abstractmethod

import torch


class Group(ABC):
    """The ranks running one model's forward together."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums t over the ranks, in place; returns t."""

    @abstractmethod
    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's t (same shape on every rank), concatenated along dim in rank order."""

    @abstractmethod
    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrites t with rank src's t, in place; returns t."""

    @abstractmethod
    def broadcast_object(self, obj=None, src: int = 0):
        """Rank src's obj (picklable, small: a control message), on every rank."""

    @abstractmethod
    def barrier(self) -> None:
        """Returns once every rank has called it."""

    def close(self) -> None:
        """Leaves the group (no collective may follow)."""


class SingleGroup(Group):
    """World size 1: every collective is the identity (in-process engines and TP 1)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device)

    def all_reduce(self, t):
        return t

    def all_gather(self, t, dim=0):
        return t

    def broadcast(self, t, src=0):
        return t

    def broadcast_object(self, obj=None, src=0):
        return obj

    def barrier(self):
        pass


class TorchGroup(Group):
    """Ranks joined by torch.distributed's default process group (gloo on CPU, NCCL on CUDA),
    plus a gloo group over the same ranks for small objects."""

    def __init__(self, rank: int, world_size: int, device: torch.device, cpu_group):
        import torch.distributed as dist

        self._dist = dist
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self._cpu_group = cpu_group  # None: the default group is gloo already
        self._symm = None  # (buffer, group name): all-reduces through symmetric memory

    def enable_symm_mem(self, max_bytes: int = 2 << 20) -> str | None:
        """Collective, at start-up (before any graph capture): all-reduces of bf16 tensors up
        to `max_bytes` go through a torch symmetric-memory buffer (two-shot, peer loads and
        stores over NVLink, multicast off) instead of NCCL; larger ones, and other dtypes,
        stay on NCCL. Returns None when on, else why not (then everything stays on NCCL)."""
        if self.device.type != "cuda":
            return "symmetric memory needs CUDA"
        try:
            import torch.distributed._symmetric_memory as symm_mem

            name = self._dist.group.WORLD.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older torch needs it
                symm_mem.enable_symm_mem_for_group(name)
            buf = symm_mem.empty(max_bytes // 2, dtype=torch.bfloat16, device=self.device)
            symm_mem.rendezvous(buf, name)
        except Exception as e:  # noqa: BLE001 - no symmetric memory here: NCCL it is
            return f"{type(e).__name__}: {e}"
        self._symm = (buf, name)
        return None

    def disable_symm_mem(self) -> None:
        """Back to NCCL for every all-reduce (when another rank could not enable it)."""
        self._symm = None

    def all_reduce(self, t):
        if self._symm is not None and t.dtype == torch.bfloat16 and t.is_contiguous():
            buf, name = self._symm
            n = t.numel()
            if n <= buf.numel() and n % (8 * self.world_size) == 0:  # 16-byte pieces a rank
                view = buf[:n]
                view.copy_(t.view(-1))
                torch.ops.symm_mem.two_shot_all_reduce_(view, "sum", name)
                t.view(-1).copy_(view)
                return t
        self._dist.all_reduce(t)
        return t

    def all_gather(self, t, dim=0):
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(parts, t)
        return torch.cat(parts, dim=dim)

    def broadcast(self, t, src=0):
        self._dist.broadcast(t, src)
        return t

    def broadcast_object(self, obj=None, src=0):
        # Length then bytes, over gloo: two CPU broadcasts, no device involved.
        group = self._cpu_group
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._dist.broadcast(size, src, group=group)
        if self.rank != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._dist.broadcast(payload, src, group=group)
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())

    def barrier(self):
        self._dist.barrier(group=self._cpu_group)

    def close(self):
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def init_group(rank: int, world_size: int, init_method: str | None = None,
               device: torch.device | str = "cpu", backend: str | None = None,
               timeout_s: float = 600.0, control_timeout_s: float | None = None) -> Group:
    """Joins ranks 0..world_size-1 (blocks until all have called it); a `SingleGroup` for one
    rank. `backend`: default gloo on CPU, nccl on CUDA. On CUDA, `device` becomes the current
    device first (NCCL and Triton launch on the current device).

    `timeout_s` bounds every tensor collective (a dead rank surfaces as an error after it).
    `control_timeout_s` gives `broadcast_object` its own gloo group with that timeout: a
    follower waiting for the next step may wait for hours while its server is idle."""
    device = torch.device(device)
    if world_size == 1:
        return SingleGroup(device)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    if init_method is None:
        raise ValueError("init_method: a group of several ranks needs a rendezvous address "
                         "(tcp://127.0.0.1:PORT)")
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group (one per "
                           "process: crosspool's dist/nccl FFN transports use it too)")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend nccl needs a CUDA device, got {device}")
    if backend == "nccl":
        # NOTE: NVLink multicast (NVLS) is kept off unless asked for: on shared machines a
        # program using it can put the host's GPUs out of service.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if device.type == "cuda":
        if device.index is None:
            raise ValueError("device: name the GPU of this rank, e.g. cuda:1")
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    cpu_group = None
    if backend != "gloo" or control_timeout_s is not None:
        control = datetime.timedelta(seconds=control_timeout_s or timeout_s)
        cpu_group = dist.new_group(backend="gloo", timeout=control)
    return TorchGroup(rank, world_size, device, cpu_group)
