"""Builds the plan: models + devices + traffic -> the three pool modes, every number explained.

In: checkpoint directories (only config.json is read), device count and memory, dtype,
traffic (a file or a mapping), mem_fraction_static, the KV page size and the default
max_running. Out: a frozen `Plan` (see `schema.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sglang_crosspool.models.config import CheckpointError, load_spec, read_json
from sglang_crosspool.options import DEFAULT_PAGE_BYTES as PAGE_BYTES
from sglang_crosspool.planner.crosspool import crosspool_mode
from sglang_crosspool.planner.errors import PlanError
from sglang_crosspool.planner.figure import Figure, num, size
from sglang_crosspool.planner.monolithic import monolithic_mode
from sglang_crosspool.planner.schema import (
    MONOLITHIC_LAYOUTS,
    SCHEMA_VERSION,
    Inputs,
    ModelInfo,
    Plan,
)
from sglang_crosspool.planner.static import static_mode
from sglang_crosspool.planner.traffic import check_names, read_traffic_file, resolve_traffic
from sglang_crosspool.planner.weights import (
    DTYPE_BYTES,
    check_supported,
    kv_bytes_per_token,
    model_weights,
)

DEFAULT_PAGE_BYTES = PAGE_BYTES["cuda"]  # the planner plans GPUs
DEFAULT_MEM_FRACTION = 0.9  # like SGLang's mem_fraction_static: the rest is for activations
DEFAULT_MAX_RUNNING = 4


def build_plan(
    model_paths: list[str | Path],
    devices: int,
    device_memory_bytes: int,
    dtype: str = "bfloat16",
    traffic: str | Path | dict[str, dict[str, Any]] | None = None,
    mem_fraction_static: float = DEFAULT_MEM_FRACTION,
    page_bytes: int = DEFAULT_PAGE_BYTES,
    max_running: int = DEFAULT_MAX_RUNNING,
    served_names: list[str] | None = None,
    monolithic_layout: str = "packed",
) -> Plan:
    """Models are listed in priority order: where not all fit, earlier ones are kept."""
    if not model_paths:
        raise PlanError("give at least one --model-path")
    if devices < 1:
        raise PlanError(f"devices: must be >= 1, got {devices}")
    if device_memory_bytes <= 0 or page_bytes <= 0:
        raise PlanError("device memory and page size must be > 0")
    if not 0 < mem_fraction_static <= 1:
        raise PlanError(f"mem_fraction_static: must be in (0, 1], got {mem_fraction_static}")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype: {dtype!r} is not one of {', '.join(sorted(DTYPE_BYTES))}")
    if monolithic_layout not in MONOLITHIC_LAYOUTS:
        raise PlanError(f"monolithic_layout: {monolithic_layout!r} is not one of "
                        f"{', '.join(MONOLITHIC_LAYOUTS)}")
    if max_running < 1:
        raise PlanError(f"max_running: must be >= 1, got {max_running}")
    names = list(served_names) if served_names else [Path(p).name for p in model_paths]
    if len(names) != len(model_paths) or len(set(names)) != len(names):
        raise PlanError(f"served model names must be unique, one per model path: {names}")

    if traffic is None:
        raw, where = {}, "traffic defaults"
    elif isinstance(traffic, dict):
        raw, where = traffic, "traffic"
    else:
        raw, where = read_traffic_file(traffic), str(traffic)
    check_names(raw, names, where)

    models = tuple(_model_info(name, Path(p), dtype, raw, max_running, where)
                   for name, p in zip(names, model_paths))
    usable_value = int(device_memory_bytes * mem_fraction_static)
    usable = Figure(usable_value, f"{num(device_memory_bytes)} B x {mem_fraction_static} "
                    f"mem_fraction_static = {size(usable_value)}")
    inputs = Inputs(devices, device_memory_bytes, mem_fraction_static, usable, dtype,
                    DTYPE_BYTES[dtype], page_bytes, max_running, monolithic_layout)
    listed = list(models)
    return Plan(SCHEMA_VERSION, inputs, models, static_mode(inputs, listed),
                monolithic_mode(inputs, listed), crosspool_mode(inputs, listed))


def _model_info(name: str, path: Path, dtype: str, raw: dict, max_running: int,
                where: str) -> ModelInfo:
    config = path / "config.json"
    # Check the architecture before load_spec, so that e.g. DeepSeek's MLA is refused for
    # what it is rather than for whichever field load_spec happens to miss first.
    try:
        model_type = read_json(config).get("model_type") if path.is_dir() else None
        if isinstance(model_type, str):
            check_supported(model_type, str(config))
        spec = load_spec(path)
    except CheckpointError as e:
        raise PlanError(str(e)) from None
    weights = model_weights(spec, dtype, name)
    traffic = resolve_traffic(raw, name, spec.max_position_embeddings, max_running, where)
    n_moe = sum(spec.moe_layers)
    return ModelInfo(
        name=name, path=str(path), model_type=spec.model_type, num_layers=spec.num_layers,
        hidden_size=spec.hidden_size, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, num_experts=spec.num_experts, top_k=spec.top_k,
        moe_layers=n_moe, dense_layers=spec.num_layers - n_moe,
        has_shared_expert=spec.shared_expert_intermediate_size > 0,
        max_position_embeddings=spec.max_position_embeddings, traffic=traffic,
        weights=weights, kv_bytes_per_token=kv_bytes_per_token(spec, dtype))
