"""`static` pool mode: each model gets its own fixed slice - full weights + worst-case KV.

In: `Inputs` and the models in priority order. Out: the `static` `ModePlan`.

A model's slice is its weights plus KV for max_running x max_context tokens, committed up
front. Models are taken in the order given (the operator's priority). A slice that fits on one
device goes onto the device where it fits most tightly (best fit), so that large free spaces
stay whole for later models; otherwise the model is spread over the k devices with the most
free memory, for the smallest k that fits (attention TP x DP from its KV heads, FFN split k
ways, each DP replica reserving KV for its ceil(max_running / DP) requests). Memory no slice
takes is idle: static never lends it to another model.
"""

from __future__ import annotations

from sglang_crosspool.planner.common import (
    attention_per_device,
    ceil_div,
    device_row,
    fitted,
    layout_for,
    unfitted,
)
from sglang_crosspool.planner.figure import Figure, num, size, total
from sglang_crosspool.planner.kv import attention_parallel, blocks_for
from sglang_crosspool.planner.schema import Inputs, ModelInfo, ModePlan


def static_mode(inputs: Inputs, models: list[ModelInfo]) -> ModePlan:
    n, usable, page = inputs.devices, int(inputs.usable_bytes), inputs.page_bytes
    free = [usable] * n
    weights: list[list[tuple[str, Figure]]] = [[] for _ in range(n)]
    slices: list[list[tuple[str, int]]] = [[] for _ in range(n)]  # (model, KV pages)
    rows = []
    for info in models:
        placed, tried = None, []
        for k in range(1, n + 1):
            par = attention_parallel(info.num_kv_heads, k)
            needs = [_slice(info, inputs, par, i, k) for i in range(k)]
            group = _group(free, [need for need, _, _, _ in needs])
            shape = "" if k == 1 else " (" + " + ".join(f"TP {t}" for t in par.replicas) + ")"
            tried.append(f"{k} device(s){shape}: up to {size(max(n for n, *_ in needs))} each")
            if group is not None:
                placed = (group, par, needs)
                break
        if placed is None:
            rows.append(unfitted(info, f"its slice needs {'; '.join(tried)}; the most free "
                                 f"device has {size(max(free))}"))
            continue
        group, par, needs = placed
        for d, (need, attn, ffn, pages) in zip(group, needs):
            free[d] -= need
            weights[d] += [(f"{info.name} attention", attn), (f"{info.name} FFN", ffn)]
            slices[d].append((info.name, int(pages)))
        rows.append(fitted(info, inputs, tuple(group), par, [p for *_, p in needs]))
    devices = []
    for d in range(n):
        count = sum(p for _, p in slices[d])
        kv = Figure(count, " + ".join(f"{name} {num(p)}" for name, p in slices[d]) +
                    f" = {num(count)} pages" if slices[d] else "no KV slices: 0 pages")
        devices.append(device_row(d, "static", [name for name, _ in slices[d]], weights[d], kv,
                                  usable, page))
    fits = [r for r in rows if r.fits]
    kv_bytes = total([(f"device {d.index}", d.kv_bytes) for d in devices])
    tokens = total([(r.name, r.tokens_alone) for r in fits], unit="tokens") if fits else \
        Figure(0, "no model fits: 0 tokens")
    notes = (("each slice is committed up front: weights + KV for max_running x max_context; "
              "memory outside the slices is idle and never lent to another model"),)
    return ModePlan("static", tuple(r.name for r in fits), tuple(devices), tuple(rows),
                    kv_bytes, tokens, (), tuple(sorted({d for r in fits for d in r.devices})),
                    "", None, notes)


def _slice(info: ModelInfo, inputs: Inputs, par, position: int, k: int):
    """Bytes the model's slice takes on the device at `position` of a k-device group:
    (total, attention Figure, FFN Figure, KV pages Figure)."""
    tp = par.tp_of(position)
    layout = layout_for(info, inputs, tp)
    t = info.traffic
    tokens = ceil_div(t.max_running, par.dp) * t.max_context
    blocks = blocks_for(tokens, layout)
    count = blocks * int(layout.pages_per_block)
    running = (f"ceil({t.max_running} max_running / DP {par.dp})" if par.dp > 1 else
               f"{t.max_running} max_running")
    pages = Figure(count, f"{running} x {num(t.max_context)} "
                   f"max_context = {num(tokens)} tokens / {num(int(layout.block_tokens))} "
                   f"tokens per block = {num(blocks)} blocks x {int(layout.pages_per_block)} "
                   f"pages = {num(count)} pages, committed")
    attn = attention_per_device(info, tp)
    whole = int(info.weights.ffn_side)
    share = ceil_div(whole, k)
    ffn = Figure(share, f"FFN side {num(whole)} / {k} devices = {size(share)}" if k > 1 else
                 f"FFN side {size(whole)}")
    return int(attn) + share + count * inputs.page_bytes, attn, ffn, pages


def _group(free: list[int], needs: list[int]) -> list[int] | None:
    """Devices for a slice needing needs[i] bytes on its i-th device, or None. One device:
    the tightest fit. Several: the most free devices, the largest need on the most free."""
    if len(needs) == 1:
        fits = [d for d in range(len(free)) if free[d] >= needs[0]]
        return [min(fits, key=lambda d: (free[d], d))] if fits else None
    most = sorted(range(len(free)), key=lambda d: (-free[d], d))[:len(needs)]
    order = sorted(range(len(needs)), key=lambda i: -needs[i])
    group = [0] * len(needs)
    for i, d in zip(order, most):
        if free[d] < needs[i]:
            return None
        group[i] = d
    return group
