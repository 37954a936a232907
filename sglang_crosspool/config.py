"""Engine configuration: built once from user options, frozen, shared read-only by every part.

Derived values (context length per model, KV budget in pages) are computed here, in `build`,
and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_crosspool.models.config import ModelSpec
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.options import FFN_TRANSPORTS, POOL_MODES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelEntry:
    name: str  # served model name
    path: str
    spec: ModelSpec
    context_length: int


@dataclass(frozen=True)
class EngineConfig:
    models: tuple[ModelEntry, ...]
    device: str
    dtype: str
    max_running_requests: int
    chunked_prefill_size: int
    kv_page_bytes: int | None  # None: the backend's default (4 KiB on CPU, 2 MiB on CUDA)
    kv_pages: int | None  # physical KV budget in pages; None: from kv_budget_bytes
    kv_budget_bytes: int
    attention_backend: str
    random_seed: int
    pool_mode: str  # static | monolithic | crosspool
    ffn_servers: int  # crosspool: processes in the weights pool
    ffn_transport: str  # crosspool: local | shm | dist
    ffn_device: str  # crosspool: where FFN servers put their weights
    dist_backend: str  # for ffn_transport="dist": gloo (CPU) or nccl (GPU)
    pipeline_microbatches: int  # micro-batches in flight per step (layer-wise pipeline)
    ffn_placement: tuple | None  # ((model, ((expert ids of server 0), ...)), ...) or None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def model(self, name: str) -> ModelEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    @classmethod
    def build(
        cls,
        model_path: str | list[str],
        served_model_name: str | list[str] | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        context_length: int | None = None,
        max_running_requests: int = 64,
        chunked_prefill_size: int = 512,
        kv_page_bytes: int | None = None,
        kv_pages: int | None = None,
        kv_budget_bytes: int = 256 << 20,
        attention_backend: str = "torch",
        random_seed: int = 0,
        pool_mode: str = "monolithic",
        ffn_servers: int = 1,
        ffn_transport: str = "local",
        ffn_device: str | None = None,
        dist_backend: str | None = None,
        pipeline_microbatches: int = 1,
        ffn_placement=None,
    ) -> EngineConfig:
        paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path)
        if not paths:
            raise ValueError("model_path: give at least one checkpoint directory")
        names = _served_names(paths, served_model_name)
        entries = []
        for name, path in zip(names, paths):
            spec, _ = resolve(path)
            ctx = min(context_length or spec.max_position_embeddings, spec.max_position_embeddings)
            entries.append(ModelEntry(name, str(path), spec, ctx))
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
        for key, value in (("max_running_requests", max_running_requests),
                           ("chunked_prefill_size", chunked_prefill_size)):
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        _choice("pool_mode", pool_mode, POOL_MODES)
        _choice("ffn_transport", ffn_transport, FFN_TRANSPORTS)
        for key, value in (("ffn_servers", ffn_servers),
                           ("pipeline_microbatches", pipeline_microbatches)):
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        dist_backend = dist_backend or ("gloo" if device == "cpu" else "nccl")
        return cls(tuple(entries), device, dtype, max_running_requests, chunked_prefill_size,
                   kv_page_bytes, kv_pages, kv_budget_bytes, attention_backend, random_seed,
                   pool_mode, ffn_servers, ffn_transport, ffn_device or device, dist_backend,
                   pipeline_microbatches, _placement(ffn_placement, names, ffn_servers))




def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _served_names(paths: list, names) -> list[str]:
    if names is None:
        names = [Path(p).name for p in paths]
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    if len(names) != len(paths):
        raise ValueError(f"served_model_name: {len(names)} names for {len(paths)} models")
    if len(set(names)) != len(names):
        raise ValueError(f"served_model_name: names must be unique, got {names}")
    return names


def _placement(placement, names: list[str], servers: int) -> tuple | None:
    """Checks a given expert placement (e.g. from a plan) against the served models."""
    if placement is None:
        return None
    table = dict(placement)
    for name in names:
        if name not in table:
            raise ValueError(f"ffn_placement: no placement for model {name!r}")
        if len(table[name]) != servers:
            raise ValueError(f"ffn_placement: model {name!r} is placed on {len(table[name])} "
                             f"servers, ffn_servers is {servers}")
    return tuple((name, tuple(tuple(s) for s in table[name])) for name in names)
