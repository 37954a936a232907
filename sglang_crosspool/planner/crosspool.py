"""`crosspool` pool mode: a weights pool of FFN servers and a KV pool of attention devices.

In: `Inputs` and the models in priority order. Out: the `crosspool` `ModePlan`, with the
expert placement.

The N devices split into W weights-pool devices (one FFN server each, holding every served
model's FFN weights once, sharded by expert) and N - W KV-pool devices (every model's attention
side, TP x DP from its KV heads, plus one KV pool shared by all models). For each W from 1 to
N - 1, models are admitted in the order given while their experts can be placed and the KV
devices keep room for a block of each; the plan takes the W that admits the most models (by
priority), and among those the smallest W, so that the KV pool gets every other device.
KV devices come first (0 .. N-W-1), FFN servers after them.
"""

from __future__ import annotations

from sglang_crosspool.planner.common import (
    attention_per_device,
    device_row,
    fitted,
    mix_tokens,
    unfitted,
)
from sglang_crosspool.planner.figure import Figure, num, size, total
from sglang_crosspool.planner.kv import attention_parallel, pool_pages
from sglang_crosspool.planner.placement import assign, place
from sglang_crosspool.planner.schema import Inputs, ModelInfo, ModePlan


def _attention_on(models: list[ModelInfo], kv_devices: int, d: int) -> list[tuple[str, Figure]]:
    """Attention sides on KV device d (0-based) of kv_devices."""
    return [(f"{m.name} attention",
             attention_per_device(m, attention_parallel(m.num_kv_heads, kv_devices).tp_of(d)))
            for m in models]


def _admit(inputs: Inputs, models: list[ModelInfo], w: int):
    """Models admitted with w weights-pool devices, and why each other one was not."""
    n, usable, page = inputs.devices, int(inputs.usable_bytes), inputs.page_bytes
    admitted: list[ModelInfo] = []
    reasons: dict[str, str] = {}
    for info in models:
        trial = admitted + [info]
        attn = max(sum(int(f) for _, f in _attention_on(trial, n - w, d)) for d in range(n - w))
        pages = max(usable - attn, 0) // page
        block = max(2 * m.num_layers for m in trial)
        if assign(trial, w, usable) is None:
            ffn = sum(int(m.weights.ffn_side) for m in trial)
            reasons[info.name] = (f"FFN weights of the models so far with it, {size(ffn)}, do "
                                  f"not fit the {w} weights-pool device(s) of {size(usable)}")
        elif pages < block:
            reasons[info.name] = (f"attention sides would leave {num(pages)} KV pages per KV "
                                  f"device, fewer than one block ({block} pages)")
        else:
            admitted.append(info)
    return admitted, reasons


def crosspool_mode(inputs: Inputs, models: list[ModelInfo]) -> ModePlan:
    n, usable, page = inputs.devices, int(inputs.usable_bytes), inputs.page_bytes
    if n < 2:
        why = "crosspool needs at least 2 devices: one for the weights pool, one for the KV pool"
        return ModePlan("crosspool", (), (), tuple(unfitted(m, why) for m in models),
                        Figure(0, "no KV pool: 0 B"), Figure(0, "no KV pool: 0 tokens"), (), (),
                        why, None, (why,))
    trials = []
    for w in range(1, n):
        admitted, reasons = _admit(inputs, models, w)
        trials.append((w, admitted, reasons))
    names = [m.name for m in models]

    def score(trial):  # more models by priority first, then fewer weights-pool devices
        w, admitted, _ = trial
        return tuple(name in {m.name for m in admitted} for name in names), -w

    w, admitted, reasons = max(trials, key=score)
    # Larger W than the chosen one admit no more models and leave fewer KV devices.
    split = "; ".join(
        f"W={tw}: admits {', '.join(m.name for m in ta) or 'none'}"
        + (f" (not {', '.join(tr)})" if tr else "") for tw, ta, tr in trials if tw <= w)
    split += (f". Chosen: W={w} weights-pool device(s) and {n - w} KV-pool device(s), the "
              "fewest weights-pool devices that admit the most models in priority order")
    g = n - w
    kv_devices = tuple(range(g))
    weights_devices = tuple(range(g, n))
    placement = place(admitted, list(weights_devices), usable) if admitted else None
    held = [m.name for m in admitted]
    devices, pages = [], []
    for d in kv_devices:
        parts = _attention_on(admitted, g, d)
        attn = sum(int(f) for _, f in parts)
        pages.append(pool_pages(usable - attn, page, f"usable {num(usable)} - attention sides "
                                f"{num(attn)} ="))
        devices.append(device_row(d, "kv", held, parts, pages[d], usable, page))
    for server in placement.servers if placement else ():
        holds = [m.name for m in placement.models
                 if m.experts[server.server] or server.server in (m.shared_server, m.dense_server)]
        devices.append(device_row(server.device, "weights", holds,
                                  [("FFN experts", server.bytes)],
                                  Figure(0, "weights pool: no KV"), usable, page))
    rows = []
    for info in models:
        if info.name in reasons or not admitted:
            rows.append(unfitted(info, reasons.get(info.name, "no model fits")))
            continue
        par = attention_parallel(info.num_kv_heads, g)
        rows.append(fitted(info, inputs, kv_devices, par, pages))
    kv_bytes = total([(f"device {d}", devices[d].kv_bytes) for d in kv_devices])
    notes = ((f"the weights pool holds each FFN weight once, on {w} FFN server(s); their idle "
              "bytes are left for activations and transfer buffers"),
             (f"the KV pool's {g} device(s) hold only attention sides and one KV pool shared by "
              "every model; hidden states, not KV, cross between the pools every layer"))
    return ModePlan("crosspool", tuple(held), tuple(devices), tuple(rows), kv_bytes,
                    mix_tokens(admitted, int(kv_bytes)), weights_devices, kv_devices, split,
                    placement, notes)
