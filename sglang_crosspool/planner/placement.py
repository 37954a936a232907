"""Expert placement: every model's FFN weights over the FFN servers of the weights pool.

In: the served models (weights, expert counts, request rates), the number of FFN servers and
the usable bytes of each. Out: a `Placement` - per model, the routed expert ids each server
holds (the same for every MoE layer: expert e of model m lives on one server for all layers),
where its shared expert and its dense MLP layers live - and per server its bytes and expected
load; or None when the weights do not fit.

Each expert is in exactly one server. Shared experts and dense MLPs go to server 0 first
(NOTE: the FFN servers hold them there - `ffn/remote.py`; the schema keeps a per-model server
so that this can change). Routed experts (one item per expert, over all its layers) are then
placed largest first, each onto the server with the smallest bytes/total_bytes +
load/total_load among those with room, so they balance around what server 0 already holds;
ties go to the lowest server index. Load is the request rate x the probability that a token uses the item in a
layer (top_k/num_experts for a routed expert, 1 for a shared expert or a dense MLP): with the
routing unknown offline, uniform routing is the assumption. Exact fractions keep ties exact, so
identical experts alternate across servers instead of drifting by float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from sglang_crosspool.planner.figure import Figure, num, size
from sglang_crosspool.planner.schema import ModelInfo, ModelPlacement, Placement, ServerLoad

_KINDS = ("routed", "shared", "dense")
SHARED_SERVER = 0  # where shared experts and dense MLPs live


@dataclass(frozen=True)
class _Item:
    bytes: int
    load: Fraction
    model: int
    kind: int  # index into _KINDS
    expert: int  # routed expert id; 0 otherwise


def _items(models: list[ModelInfo]) -> list[_Item]:
    items = []
    for m, info in enumerate(models):
        rate = Fraction(info.traffic.rate)
        w = info.weights
        if info.moe_layers:
            p = Fraction(info.top_k, info.num_experts)
            items += [_Item(int(w.expert_bytes), rate * p, m, 0, e)
                      for e in range(info.num_experts)]
        if int(w.shared_experts):
            items.append(_Item(int(w.shared_experts), rate, m, 1, 0))
        if int(w.dense_mlp):
            items.append(_Item(int(w.dense_mlp), rate, m, 2, 0))
    # Pinned items first, then largest first; the rest of the key only makes it deterministic.
    items.sort(key=lambda it: (it.kind == 0, -it.bytes, -it.load, it.model, it.kind, it.expert))
    return items


def assign(models: list[ModelInfo], servers: int, capacity: int) -> list[int] | None:
    """Server of each item of `_items(models)`, or None when some item finds no room."""
    items = _items(models)
    total_bytes = sum(it.bytes for it in items) or 1
    total_load = sum(it.load for it in items)
    used = [0] * servers
    load = [Fraction(0)] * servers
    where = []
    for it in items:
        best = None
        for s in range(servers) if it.kind == 0 else (SHARED_SERVER,):
            if used[s] + it.bytes > capacity:
                continue
            score = Fraction(used[s], total_bytes) + (load[s] / total_load if total_load else 0)
            if best is None or score < best[0]:
                best = (score, s)
        if best is None:
            return None
        used[best[1]] += it.bytes
        load[best[1]] += it.load
        where.append(best[1])
    return where


def place(models: list[ModelInfo], devices: list[int], capacity: int) -> Placement | None:
    """Placement of `models` onto FFN servers on `devices` (server i is devices[i])."""
    where = assign(models, len(devices), capacity)
    if where is None:
        return None
    items = _items(models)
    routed: list[list[list[int]]] = [[[] for _ in devices] for _ in models]
    special: list[dict[int, int]] = [{} for _ in models]
    for it, s in zip(items, where):
        if it.kind == 0:
            routed[it.model][s].append(it.expert)
        else:
            special[it.model][it.kind] = s
    placements = tuple(
        ModelPlacement(info.name, tuple(tuple(sorted(e)) for e in routed[m]),
                       special[m].get(1), special[m].get(2))
        for m, info in enumerate(models))
    servers = tuple(_server_load(s, d, models, items, where) for s, d in enumerate(devices))
    how = (f"shared experts and dense MLPs on server {SHARED_SERVER}; then {len(items)} items in "
           "all: routed experts (each over all MoE layers) placed largest first onto the server "
           f"with the least bytes/total + load/total that has room (capacity {size(capacity)} "
           "each)")
    return Placement(servers, placements, how)


def _server_load(s: int, device: int, models, items, where) -> ServerLoad:
    byte_parts, load_parts = [], []
    total_bytes, total_load, count = 0, Fraction(0), 0
    for m, info in enumerate(models):
        mine = [it for it, w in zip(items, where) if w == s and it.model == m]
        if not mine:
            continue
        count += len(mine)
        for kind in range(3):
            group = [it for it in mine if it.kind == kind]
            if not group:
                continue
            b = sum(it.bytes for it in group)
            total_bytes += b
            total_load += sum(it.load for it in group)
            label = f"{len(group)} experts" if kind == 0 else _KINDS[kind]
            byte_parts.append(f"{info.name} {label} {num(b)}")
            prob = f"{info.top_k}/{info.num_experts}" if kind == 0 else "1"
            count_txt = f"{len(group)} x " if kind == 0 else f"{_KINDS[kind]} "
            load_parts.append(f"{info.name} {count_txt}{num(info.traffic.rate)} req/s x {prob}")
    bytes_fig = Figure(total_bytes, " + ".join(byte_parts) + f" = {size(total_bytes)}"
                       if byte_parts else "empty: 0 B")
    value = float(total_load)
    load_fig = Figure(value, " + ".join(load_parts) + f" = {num(value)} (sum of rate x activation "
                      "probability)" if load_parts else "empty: 0")
    return ServerLoad(s, device, bytes_fig, load_fig, count)
