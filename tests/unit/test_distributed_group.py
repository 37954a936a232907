"""The rank group's collectives over gloo (2 spawned processes) and its one-rank identity."""

from __future__ import annotations

import torch

from sglang_crosspool.distributed import SingleGroup, init_group
from sglang_crosspool.distributed.spawn import run_ranks


def _collectives(rank: int, world: int, init_method: str) -> dict:
    group = init_group(rank, world, init_method)
    try:
        summed = group.all_reduce(torch.full((3,), float(rank + 1)))
        gathered = group.all_gather(torch.full((1, 2), float(rank)), dim=0)
        row = group.all_gather(torch.full((2, 1), float(rank)), dim=1)
        sent = group.broadcast(torch.arange(4.0) if rank == 0 else torch.zeros(4))
        obj = group.broadcast_object({"step": 7, "ids": [1, 2]} if rank == 0 else None)
        group.barrier()
        return {"sum": summed.tolist(), "gather": gathered.tolist(), "row": row.tolist(),
                "bcast": sent.tolist(), "obj": obj}
    finally:
        group.close()


def test_single_group_is_identity():
    group = SingleGroup()
    t = torch.ones(2)
    assert group.all_reduce(t) is t and group.all_gather(t) is t and group.broadcast(t) is t
    assert group.broadcast_object({"a": 1}) == {"a": 1}
    assert (group.rank, group.world_size, group.is_first) == (0, 1, True)


def test_gloo_collectives_two_ranks():
    out = run_ranks(_collectives, 2, timeout_s=120)
    for r in out:
        assert r["sum"] == [3.0, 3.0, 3.0]
        assert r["gather"] == [[0.0, 0.0], [1.0, 1.0]]
        assert r["row"] == [[0.0, 1.0], [0.0, 1.0]]
        assert r["bcast"] == [0.0, 1.0, 2.0, 3.0]
        assert r["obj"] == {"step": 7, "ids": [1, 2]}
