"""Architecture registry: `model_type` of config.json -> the module that implements it.

Modules are imported lazily, so adding an architecture is one new file plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from sglang_crosspool.models.config import CheckpointError, ModelSpec, load_spec

_MODULES = {
    "qwen3_moe": "sglang_crosspool.models.qwen3_moe",
    "qwen2_moe": "sglang_crosspool.models.qwen2_moe",
    "mixtral": "sglang_crosspool.models.mixtral",
    "olmoe": "sglang_crosspool.models.olmoe",
    "deepseek_v2": "sglang_crosspool.models.deepseek_v2",
    "deepseek_v3": "sglang_crosspool.models.deepseek_v2",  # V2's layers, V3's router
}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    attention_cls: type
    ffn_cls: type


def supported() -> list[str]:
    return sorted(_MODULES)


def get_architecture(model_type: str, where: str = "config.json") -> Architecture:
    if model_type not in _MODULES:
        raise CheckpointError(
            f"{where}: field 'model_type' = {model_type!r} is not supported; "
            f"supported: {', '.join(supported())}"
        )
    return importlib.import_module(_MODULES[model_type]).ARCH


def resolve(model_dir: str | Path) -> tuple[ModelSpec, Architecture]:
    """Reads a checkpoint's config and finds its architecture, with errors naming the file."""
    spec = load_spec(model_dir)
    return spec, get_architecture(spec.model_type, str(Path(model_dir) / "config.json"))
