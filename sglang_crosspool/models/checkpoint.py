"""Lazy access to the tensors of a checkpoint: safetensors files, or random "dummy" weights.

In: a checkpoint directory. Out: tensors by name, read only when asked for, so that a process
holding one half of a model (attention or FFN) never reads the other half's bytes.

`open_checkpoint(path, load_format, device)` picks the reader (SGLang's `--load-format`):
`auto` / `safetensors` read the files (`CheckpointFiles`); `dummy` reads nothing but makes
each tensor up on the device (`DummyFiles`), so that real shapes run from config.json alone.
"""

from __future__ import annotations

import hashlib
import json
import math
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

    def get(self, key: str, shape: tuple[int, ...] | None = None,
            part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The tensor `key`; with `shape`, checks it and names the file on a mismatch. With
        `part` = (dim, start, stop), only that slice is read (a tensor-parallel rank's share;
        `shape` is still the whole tensor's)."""
        if key not in self._where:
            raise CheckpointError(f"{self.dir}: tensor '{key}' not found in the checkpoint")
        file = self._where[key]
        self.read_keys.add(key)
        if part is None:
            tensor = self._handle(file).get_tensor(key)
            full = tuple(tensor.shape)
        else:
            view = self._handle(file).get_slice(key)
            full = tuple(view.get_shape())
        if shape is not None and full != tuple(shape):
            raise CheckpointError(
                f"{file}: tensor '{key}' has shape {full}, config implies {shape}"
            )
        if part is not None:
            dim, start, stop = part
            tensor = view[(slice(None),) * dim + (slice(start, stop),)]
        return tensor

    def first(self, *keys: str, shape: tuple[int, ...] | None = None,
              part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The first of `keys` present (for names that differ across checkpoint versions)."""
        for key in keys:
            if key in self._where:
                return self.get(key, shape, part)
        raise CheckpointError(f"{self.dir}: none of the tensors {list(keys)} is in the checkpoint")


LOAD_FORMATS = ("auto", "safetensors", "dummy")
DUMMY_SEED = 0
# Tensor names a per-expert HF checkpoint never has: the model code would take the fused path.
_FUSED_EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")
_BIAS_STD = 0.02
# Projections that write into the residual stream (attention out, expert/MLP down).
_RESIDUAL_OUT_SUFFIXES = ("o_proj.weight", "down_proj.weight", "w2.weight")


class DummyFiles:
    """Random weights under a checkpoint's tensor names, made on `device` when asked for.

    Answers as a per-expert Hugging Face checkpoint of the folder's config.json would: every
    name is present except the fused expert tensors, and `lm_head.weight` when the config ties
    it to the embeddings. The caller gives each tensor's shape (the model code always does).

    Each tensor depends only on its name and shape, the config's layer count, `seed` and the
    device type: its seed is hashed from its name, so an attention worker, FFN servers holding
    any subset of the experts, and a monolithic engine all build the same weights.

    Scales keep a bf16 forward finite and the router's choices spread: norm weights are ones,
    biases N(0, 0.02), other weights N(0, 1/fan_in), so every projection keeps its input's
    scale; but embeddings are N(0, 1) and the projections back into the residual stream
    N(0, 1/(fan_in * 2 * layers)), so that the token's own embedding is not drowned by
    2 * layers unit-size updates. (With N(0, 1/fan_in) everywhere, deep layers saw nearly the
    same hidden state at every position: Qwen3-30B-A3B sent every token to the same few
    experts, and greedy decoding repeated one token.)

    NOTE: CPU and CUDA generators draw different numbers for one seed, so weights match across
    processes on the same device type only. An attention worker and an FFN server never read
    the same tensor, so a split across device types is still one consistent model.
    """

    def __init__(self, model_dir: str | Path, device=None, seed: int = DUMMY_SEED):
        self.dir = Path(model_dir)
        self.device = torch.device(device or "cpu")
        self.seed = seed
        self.read_keys: set[str] = set()  # what this process made, as CheckpointFiles records
        config = self.dir / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{config}: file not found (dummy weights need config.json)")
        raw = json.loads(config.read_text())
        self._tied = bool(raw.get("tie_word_embeddings", False))
        self._layers = max(1, int(raw.get("num_hidden_layers") or 1))

    def __contains__(self, key: str) -> bool:
        if key.endswith(_FUSED_EXPERT_SUFFIXES):
            return False
        return not (key == "lm_head.weight" and self._tied)

    def get(self, key: str, shape: tuple[int, ...] | None = None,
            part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """A tensor of `shape` for `key`, the same one on every call and in every process;
        `part` = (dim, start, stop): that slice of it (made whole, then cut, so that every
        tensor-parallel rank holds its share of the one model)."""
        if part is not None:
            dim, start, stop = part
            return self.get(key, shape).narrow(dim, start, stop - start).contiguous()
        if key not in self:
            raise CheckpointError(f"{self.dir}: tensor '{key}' not found in the checkpoint "
                                  "(dummy weights)")
        if shape is None:
            raise CheckpointError(f"{self.dir}: tensor '{key}': dummy weights need its shape")
        self.read_keys.add(key)
        shape = tuple(shape)
        if key.endswith("norm.weight"):  # input_layernorm, q_norm, model.norm, ...
            return torch.ones(shape, device=self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self._tensor_seed(key))
        out = torch.empty(shape, device=self.device)
        return out.normal_(0.0, self._std(key, shape), generator=generator)

    def first(self, *keys: str, shape: tuple[int, ...] | None = None,
              part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The first of `keys` present, as CheckpointFiles.first."""
        for key in keys:
            if key in self:
                return self.get(key, shape, part)
        raise CheckpointError(f"{self.dir}: none of the tensors {list(keys)} is in the checkpoint")

    def _std(self, key: str, shape: tuple[int, ...]) -> float:
        if key.endswith(".bias"):
            return _BIAS_STD
        if key.endswith("embed_tokens.weight"):
            return 1.0
        std = 1.0 / math.sqrt(shape[-1])  # fan_in: weights are [out, in]
        if key.endswith(_RESIDUAL_OUT_SUFFIXES):
            std /= math.sqrt(2 * self._layers)
        return std

    def _tensor_seed(self, key: str) -> int:
        # A stable 63-bit hash (not Python's hash(), which is salted per process).
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def open_checkpoint(path: str | Path, load_format: str = "auto",
                    device=None) -> CheckpointFiles | DummyFiles:
    """The tensors of checkpoint `path` as `load_format` says (SGLang's --load-format).

    auto, safetensors: the folder's safetensors files. dummy: random weights made on `device`
    (only config.json is read here; the tokenizer is loaded elsewhere).
    """
    if load_format in ("auto", "safetensors"):
        return CheckpointFiles(path)
    if load_format == "dummy":
        return DummyFiles(path, device)
    raise ValueError(f"load_format: {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
