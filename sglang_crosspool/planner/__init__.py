"""KV planner: decides, offline, how GPU memory is split for serving many MoE models.

In: the models' config.json files (no weights), the devices (count, memory each), the dtype,
the traffic (per model: rate, mean and max context, max_running), mem_fraction_static and the
KV page size. Out: a `Plan` for each pool mode - `static`, `monolithic` and `crosspool` -
printed as tables with the arithmetic of every number, and written as JSON that
`launch --plan plan.json` reads back with `load_plan`. Pure Python: no torch import.

Files: `weights.py` (bytes per model, attention side vs FFN side), `kv.py` (attention TP x DP
from the KV heads, the paged KV block layout), `placement.py` (experts over FFN servers),
`static.py` / `monolithic.py` / `crosspool.py` (one pool mode each), `plan.py` (builds the
plan), `schema.py` (dataclasses, JSON), `report.py` (text), `cli.py`.

plan.json (version 1). A *Figure* is {"value": number, "how": "the arithmetic = value"};
launch reads `value`, people read `how`.

    version: 1
    inputs: {devices, device_memory_bytes, mem_fraction_static, usable_bytes: Figure,
             dtype, dtype_bytes, page_bytes, max_running_default}
    models: [ {name, path, model_type, num_layers, hidden_size, num_heads, num_kv_heads,
               head_dim, num_experts, top_k, moe_layers, dense_layers, has_shared_expert,
               max_position_embeddings,
               traffic: {rate, mean_context, max_context, max_running, cached_prefix},
               weights: {dtype, embedding, lm_head, attention, norms, router, attention_side,
                         routed_experts, shared_experts, dense_mlp, ffn_side, total,
                         expert_bytes, replicated_bytes, params_total, params_active,
                         active_bytes_per_token}   (all Figures, bytes unless params_*),
               kv_bytes_per_token: Figure} ]      models in priority order
    static | monolithic | crosspool: {
        mode, served: [model names that fit],
        devices: [ {index, role: static|monolithic|kv|weights, holds: [names],
                    weights_bytes, kv_bytes, kv_pages, idle_bytes: Figures} ],
        models: [ {name, fits, reason, devices: [device indices, in replica order],
                   parallel: {devices, replicas: [TP of each DP replica, over consecutive
                              devices of `devices`], how, waste_note} | null,
                   block_tokens, pages_per_block, kv_pages, longest_context, longest_served,
                   tokens_alone, requests_at_mean, virtual_pages: Figure | null,
                   reaches_max_context,
                   cache_floor_pages: Figure | null (the prefix cache's floor: the pages of
                   traffic's cached_prefix in whole blocks; absent in older plans)} ],
        total_kv_bytes, total_kv_tokens: Figure,
        weights_devices: [FFN server i runs on weights_devices[i]], kv_devices: [...],
        split: "why this many weights-pool devices" (crosspool),
        placement: {servers: [{server, device, bytes, load, items}],
                    models: [{name, experts: [[expert ids] per server],
                              shared_server, dense_server}], how} | null,
        notes: [...] }

What launch needs, per mode: `kv_devices` and each device's `kv_pages` (the physical KV
budget), per model `parallel.replicas`, `devices` and `cache_floor_pages`; for crosspool also
`weights_devices` and `placement.table()` (model -> per server, expert ids: the FFN servers'
format).
"""

from sglang_crosspool.planner.errors import PlanError
from sglang_crosspool.planner.figure import Figure, parse_size
from sglang_crosspool.planner.plan import build_plan
from sglang_crosspool.planner.report import render
from sglang_crosspool.planner.schema import MODES, ModePlan, Placement, Plan, load_plan, to_json

__all__ = [
    "MODES",
    "Figure",
    "ModePlan",
    "Placement",
    "Plan",
    "PlanError",
    "build_plan",
    "load_plan",
    "parse_size",
    "render",
    "to_json",
]
