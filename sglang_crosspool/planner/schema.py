"""The plan as frozen dataclasses, and its JSON form (see the package docstring for the schema).

In: values computed by `plan.build_plan`, or a plan.json file. Out: `Plan`; `to_json(plan)`
and `load_plan(path)` convert both ways losslessly (every `Figure` keeps its arithmetic).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from sglang_crosspool.planner.errors import PlanError
from sglang_crosspool.planner.figure import Figure
from sglang_crosspool.planner.kv import AttentionParallel
from sglang_crosspool.planner.traffic import Traffic
from sglang_crosspool.planner.weights import Weights

SCHEMA_VERSION = 1
MODES = ("static", "monolithic", "crosspool")
MONOLITHIC_LAYOUTS = ("packed", "tp")


@dataclass(frozen=True)
class Inputs:
    devices: int
    device_memory_bytes: int
    mem_fraction_static: float
    usable_bytes: Figure  # per device: memory x mem_fraction_static
    dtype: str  # weights and KV
    dtype_bytes: int
    page_bytes: int
    max_running_default: int
    monolithic_layout: str = "packed"  # packed: a model per device; tp: all over all devices


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_layers: int
    dense_layers: int
    has_shared_expert: bool
    max_position_embeddings: int
    traffic: Traffic
    weights: Weights
    kv_bytes_per_token: Figure


@dataclass(frozen=True)
class DeviceUse:
    index: int
    role: str  # static | monolithic | weights | kv
    holds: tuple[str, ...]  # models with bytes here
    weights_bytes: Figure
    kv_bytes: Figure  # the KV pool's pages (static: the models' fixed KV slices)
    kv_pages: Figure
    idle_bytes: Figure  # usable bytes neither weights nor KV pages


@dataclass(frozen=True)
class ModelKV:
    """One model in one pool mode. Figures are None when the model does not fit."""

    name: str
    fits: bool
    reason: str  # why it does not fit ('' when it does)
    devices: tuple[int, ...]  # where its attention and KV live
    parallel: AttentionParallel | None
    block_tokens: Figure | None
    pages_per_block: Figure | None
    kv_pages: Figure | None  # per device, what one request of this model can map
    longest_context: Figure | None  # memory bound, one request alone on its replica
    longest_served: Figure | None  # also capped by max_position_embeddings
    reaches_max_context: bool  # longest_served >= traffic max_context
    tokens_alone: Figure | None  # over all replicas, if the KV memory held only this model
    requests_at_mean: Figure | None  # tokens_alone / mean_context
    virtual_pages: Figure | None  # per device virtual reservation (nothing committed)
    # The prefix cache's floor for the model: pages of its cached_prefix tokens, which other
    # models' requests cannot evict (launch --plan passes it to the engine).
    cache_floor_pages: Figure | None = None


@dataclass(frozen=True)
class ServerLoad:
    server: int
    device: int
    bytes: Figure
    load: Figure  # expected expert activations: sum of rate x activation probability
    items: int


@dataclass(frozen=True)
class ModelPlacement:
    name: str
    experts: tuple[tuple[int, ...], ...]  # per FFN server: routed expert ids, all MoE layers
    shared_server: int | None  # the server holding the shared expert (and its gate)
    dense_server: int | None  # the server holding the dense MLP layers


@dataclass(frozen=True)
class Placement:
    servers: tuple[ServerLoad, ...]
    models: tuple[ModelPlacement, ...]
    how: str

    def model(self, name: str) -> ModelPlacement:
        return next(m for m in self.models if m.name == name)

    def table(self) -> dict[str, list[list[int]]]:
        """model -> per FFN server, its routed expert ids (the FFN servers' placement form)."""
        return {m.name: [list(e) for e in m.experts] for m in self.models}


@dataclass(frozen=True)
class ModePlan:
    mode: str
    served: tuple[str, ...]
    devices: tuple[DeviceUse, ...]
    models: tuple[ModelKV, ...]
    total_kv_bytes: Figure
    total_kv_tokens: Figure  # static: sum of slices; shared pools: at the traffic mix
    weights_devices: tuple[int, ...]  # crosspool: the weights pool (FFN servers)
    kv_devices: tuple[int, ...]  # devices holding KV
    split: str  # crosspool: why this many weights-pool devices
    placement: Placement | None
    notes: tuple[str, ...]

    def model(self, name: str) -> ModelKV:
        return next(m for m in self.models if m.name == name)


@dataclass(frozen=True)
class Plan:
    version: int
    inputs: Inputs
    models: tuple[ModelInfo, ...]
    static: ModePlan
    monolithic: ModePlan
    crosspool: ModePlan

    def mode(self, name: str) -> ModePlan:
        if name not in MODES:
            raise KeyError(f"pool mode {name!r}: one of {', '.join(MODES)}")
        return getattr(self, name)

    def model(self, name: str) -> ModelInfo:
        return next(m for m in self.models if m.name == name)


def to_json(plan: Plan) -> str:
    return json.dumps(dataclasses.asdict(plan), indent=1)


def load_plan(path: str | Path) -> Plan:
    """Reads a plan.json written by `python -m sglang_crosspool.plan --out`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise PlanError(f"{path}: cannot read the plan ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("version") != SCHEMA_VERSION:
        raise PlanError(f"{path}: not a version-{SCHEMA_VERSION} plan "
                        f"(version {data.get('version') if isinstance(data, dict) else None!r})")
    try:
        return _build(Plan, data)
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{path}: malformed plan ({type(e).__name__}: {e})") from None


def _build(tp, value):
    """Rebuilds a value of type `tp` from its `dataclasses.asdict` form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in args[:-1]:
            try:
                return _build(arg, value)
            except (KeyError, TypeError, ValueError):
                continue
        return _build(args[-1], value)
    if origin is tuple:
        return tuple(_build(typing.get_args(tp)[0], v) for v in value)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = {f.name for f in dataclasses.fields(tp)}
        missing = {f.name for f in dataclasses.fields(tp) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING} - set(value)
        if missing:
            raise KeyError(f"{tp.__name__} lacks {', '.join(sorted(missing))}")
        return tp(**{name: _build(hints[name], value[name]) for name in fields if name in value})
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and (not isinstance(value, tp) or
                                          (tp is int and isinstance(value, bool))):
        raise TypeError(f"expected {tp.__name__}, got {value!r}")
    return value
