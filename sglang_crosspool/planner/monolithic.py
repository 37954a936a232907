"""`monolithic` pool mode (kvcached-style): weights and one elastic KV pool on every device.

In: `Inputs` (its `monolithic_layout`) and the models in priority order. Out: the
`monolithic` `ModePlan`.

Two layouts, as operators deploy it:
- `packed` (one SGLang instance per model, kvcached under them): each model's full weights on
  one device, models bin-packed over the devices by bytes and expected load (rate x
  mean_context); what a device's weights leave is one elastic KV pool shared by the models
  on it (virtual ranges, pages on demand). A request reaches its own device's pool only.
- `tp`: every served model runs on all N devices: its FFN sharded N ways, its attention TP x
  DP from its KV heads (each DP replica holds the attention side whole, split TP ways). A
  request's KV can only live on its own replica's TP devices, so the longest context one
  request reaches is that replica's share of the pool, not the whole pool.
Models are admitted in the order given while every device they use keeps room for at least
one KV block of each model there.
"""

from __future__ import annotations

from sglang_crosspool.planner.common import (
    attention_per_device,
    ceil_div,
    device_row,
    fitted,
    mix_tokens,
    unfitted,
)
from sglang_crosspool.planner.figure import Figure, num, size, total
from sglang_crosspool.planner.kv import attention_parallel, pool_pages
from sglang_crosspool.planner.schema import Inputs, ModelInfo, ModePlan


def _weights_on(models: list[ModelInfo], n: int, d: int) -> list[tuple[str, Figure]]:
    """Weights on device d when every model is spread over all n devices."""
    parts = []
    for info in models:
        tp = attention_parallel(info.num_kv_heads, n).tp_of(d)
        parts.append((f"{info.name} attention", attention_per_device(info, tp)))
        ffn = int(info.weights.ffn_side)
        share = ceil_div(ffn, n)
        how = f"FFN side {num(ffn)} / {n} devices = {size(share)}" if n > 1 else \
            f"FFN side {size(ffn)}"
        parts.append((f"{info.name} FFN", Figure(share, how)))
    return parts


def monolithic_mode(inputs: Inputs, models: list[ModelInfo]) -> ModePlan:
    if inputs.monolithic_layout == "packed":
        return _packed_mode(inputs, models)
    n, usable, page = inputs.devices, int(inputs.usable_bytes), inputs.page_bytes
    admitted: list[ModelInfo] = []
    reasons: dict[str, str] = {}
    for info in models:
        trial = admitted + [info]
        used = max(sum(int(f) for _, f in _weights_on(trial, n, d)) for d in range(n))
        pages = max(usable - used, 0) // page
        block = max(2 * m.num_layers for m in trial)
        if used > usable:
            reasons[info.name] = (f"weights would take {size(used)} on a device, more than the "
                                  f"{size(usable)} usable")
        elif pages < block:
            reasons[info.name] = (f"weights would leave {num(pages)} KV pages on a device, "
                                  f"fewer than one block ({block} pages)")
        else:
            admitted.append(info)
    names = [m.name for m in admitted]
    devices, pages = [], []
    for d in range(n):
        parts = _weights_on(admitted, n, d)
        used = sum(int(f) for _, f in parts)
        pages.append(pool_pages(usable - used, page, f"usable {num(usable)} - weights "
                                f"{num(used)} ="))
        devices.append(device_row(d, "monolithic", names, parts, pages[d], usable, page))
    rows = []
    for info in models:
        if info.name in reasons:
            rows.append(unfitted(info, reasons[info.name]))
            continue
        par = attention_parallel(info.num_kv_heads, n)
        rows.append(fitted(info, inputs, tuple(range(n)), par, pages))
    kv_bytes = total([(f"device {d.index}", d.kv_bytes) for d in devices])
    notes = ((f"every model is spread over all {n} devices; each device's memory after weights "
              "is one elastic KV pool shared by all models, but one request's KV stays on its "
              "replica's TP devices"),)
    return ModePlan("monolithic", tuple(names), tuple(devices), tuple(rows), kv_bytes,
                    mix_tokens(admitted, int(kv_bytes)), (), tuple(range(n)) if admitted else (),
                    "", None, notes)


def _packed_mode(inputs: Inputs, models: list[ModelInfo]) -> ModePlan:
    n, usable, page = inputs.devices, int(inputs.usable_bytes), inputs.page_bytes
    on: list[list[ModelInfo]] = [[] for _ in range(n)]
    reasons: dict[str, str] = {}

    def demand(m: ModelInfo) -> float:
        return float(m.traffic.rate) * m.traffic.mean_context

    whole_demand = sum(demand(m) for m in models) or 1.0
    for info in models:
        choices = []
        for d in range(n):
            trial = on[d] + [info]
            used = sum(int(m.weights.total) for m in trial)
            block = max(2 * m.num_layers for m in trial)
            if used <= usable and (usable - used) // page >= block:
                load = sum(demand(m) for m in trial) / whole_demand
                choices.append((used / usable + load, d))
        if not choices:
            reasons[info.name] = (f"its weights, {size(int(info.weights.total))}, with those "
                                  "already on each device leave no device room for them and "
                                  "one KV block of each model there")
            continue
        on[min(choices)[1]].append(info)
    devices, pages, where = [], [], {}
    for d in range(n):
        parts = [(f"{m.name} weights", m.weights.total) for m in on[d]]
        used = sum(int(f) for _, f in parts)
        pages.append(pool_pages(usable - used, page, f"usable {num(usable)} - weights "
                                f"{num(used)} ="))
        devices.append(device_row(d, "monolithic", [m.name for m in on[d]], parts, pages[d],
                                  usable, page))
        where.update((m.name, d) for m in on[d])
    rows = []
    for info in models:
        if info.name in reasons:
            rows.append(unfitted(info, reasons[info.name]))
            continue
        d = where[info.name]
        rows.append(fitted(info, inputs, (d,), attention_parallel(info.num_kv_heads, 1),
                           [pages[d]]))
    served = tuple(m.name for m in models if m.name in where)
    admitted = [m for m in models if m.name in where]
    kv_bytes = total([(f"device {d.index}", d.kv_bytes) for d in devices])
    used_devices = tuple(d for d in range(n) if on[d])
    notes = (("packed layout: each model whole on one device (bin-packed by weight bytes and "
              "expected load, rate x mean_context); each device's memory after weights is one "
              "elastic KV pool shared by the models on it, and a request reaches only its "
              "device's pool"),)
    return ModePlan("monolithic", served, tuple(devices), tuple(rows), kv_bytes,
                    mix_tokens(admitted, int(kv_bytes)), (), used_devices, "", None, notes)
