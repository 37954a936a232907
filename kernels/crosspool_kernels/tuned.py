"""Tuned launch configs: JSON files under `configs/`, named by kernel, shape, device and dtype.

A file is `{kernel}_{k}={v}_..._device={device}_dtype={dtype}.json` and holds either one config
(`{"BLOCK_N": 64, "num_warps": 4}`) or configs per batch bucket (`{"1": {...}, "64": {...}}`),
from which the bucket nearest to the batch is taken. Whatever a file lacks comes from the
kernel's default, so a missing file is never an error. `tune.py` writes these files.
"""

import functools
import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index).replace(" ", "_")
    return device.type


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_filename(kernel: str, shape: dict, device, dtype: torch.dtype) -> str:
    parts = [kernel, *(f"{k}={v}" for k, v in shape.items())]
    parts += [f"device={device_name(device)}", f"dtype={dtype_name(dtype)}"]
    return "_".join(parts) + ".json"


def _config_dirs() -> list[Path]:
    extra = os.environ.get("CROSSPOOL_KERNEL_CONFIG_DIR")
    return ([Path(extra)] if extra else []) + [CONFIG_DIR]


@functools.lru_cache(maxsize=256)
def _load(filename: str) -> dict | None:
    for directory in _config_dirs():
        path = directory / filename
        if path.is_file():
            with open(path) as f:
                return json.load(f)
    return None


def get_config(
    kernel: str, shape: dict, device, dtype: torch.dtype, default: dict, batch: int | None = None
) -> dict:
    """The tuned config for this kernel and shape, over `default`; `batch` picks a bucket."""
    found = _load(config_filename(kernel, shape, device, dtype))
    if not found:
        return dict(default)
    if all(k.isdigit() for k in found):
        key = min(found, key=lambda k: abs(int(k) - (batch or 1)))
        found = found[key]
    return {**default, **found}


def clear_cache() -> None:
    _load.cache_clear()
