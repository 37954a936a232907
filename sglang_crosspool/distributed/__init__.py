"""Rank machinery: one model's forward run by N processes in lockstep (TP, EP, sequence split).

In: a rank, a world size and a rendezvous address (`tcp://127.0.0.1:PORT`), or nothing (one
process). Out: a `Group`, the only object model code and runtimes talk to for collectives:

    group.rank, group.world_size, group.device
    group.all_reduce(t)            sum over ranks, in place (returns t)
    group.all_gather(t, dim=0)     every rank's t, concatenated along dim in rank order
    group.broadcast(t, src=0)      t from rank src, in place
    group.broadcast_object(obj)    a small picklable object from rank src (control messages)
    group.barrier()

Two implementations:
- `SingleGroup` (world size 1): every collective is the identity. Model code always holds a
  group, so the TP-1 path is the same code as TP-N, and in-process engines and tests need no
  torch.distributed at all.
- `TorchGroup`: torch.distributed, gloo on CPU, NCCL on CUDA. Tensor collectives run on the
  device backend; `broadcast_object` always runs on a gloo group over the same ranks (as
  SGLang's CPU group), so control messages never touch the GPU stream.

Processes: `spawn.free_port()` picks a rendezvous port, `spawn.start_ranks()` starts ranks
1..N-1 as fresh (spawned) processes running a target with `(rank, world_size, init_method,
*args)`, and `spawn.run_ranks()` runs a function on every rank and collects results (tests,
benchmarks). Rank 0 is usually the caller itself: it calls `init_group(0, ...)` after starting
the others, and the group forms once all have joined.

Who uses it: `models/parallel.py` shards weights by `group.rank` (attention heads, KV heads,
intermediate dims, expert slices) and reduces partial outputs with `all_reduce`;
`engine/tensor_parallel.py` runs rank 0's scheduler and engine step, broadcasting each step's
inputs to follower ranks that run the same forward. A sequence split of attention over the same
ranks can build on the same group (`all_gather` of partial attention outputs).

NOTE: `init_group` uses torch.distributed's default process group: one group per process.
Crosspool's `dist`/`nccl` FFN transports use the default group too, so they cannot be combined
with a TorchGroup in one process (the engine refuses that combination).
"""

from sglang_crosspool.distributed.group import Group, SingleGroup, TorchGroup, init_group

__all__ = ["Group", "SingleGroup", "TorchGroup", "init_group"]
