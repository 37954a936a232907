"""Lazy access to the tensors of a safetensors checkpoint, single-file or sharded.

In: a checkpoint directory. Out: tensors by name, read only when asked for, so that a process
holding one half of a model (attention or FFN) never reads the other half's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from sglang_crosspool.models.config import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointFiles:
    """Maps tensor names to the safetensors file holding them."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self.read_keys: set[str] = set()  # what this process actually loaded, for audits
        index = self.dir / INDEX_FILE
        if index.exists():
            self._read_index(index)
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors file and no {INDEX_FILE}")
            for file in files:
                for key in self._handle(file).keys():
                    self._where[key] = file

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index, no 'weight_map' ({e})") from None
        for key, name in weight_map.items():
            file = self.dir / name
            if not file.exists():
                raise CheckpointError(f"{index}: tensor '{key}' points to missing file {name}")
            self._where[key] = file

    def _handle(self, file: Path):
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
        return self._open[file]

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `key`; with `shape`, checks it and names the file on a mismatch."""
        if key not in self._where:
            raise CheckpointError(f"{self.dir}: tensor '{key}' not found in the checkpoint")
        file = self._where[key]
        tensor = self._handle(file).get_tensor(key)
        self.read_keys.add(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{file}: tensor '{key}' has shape {tuple(tensor.shape)}, config implies {shape}"
            )
        return tensor

    def first(self, *keys: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The first of `keys` present (for names that differ across checkpoint versions)."""
        for key in keys:
            if key in self._where:
                return self.get(key, shape)
        raise CheckpointError(f"{self.dir}: none of the tensors {list(keys)} is in the checkpoint")
