"""The attention-backend registry and `auto`: one list of names, resolved once per device."""

from __future__ import annotations

import pytest
import torch

from sglang_crosspool.config import EngineConfig
from sglang_crosspool.engine import attention
from sglang_crosspool.engine.attention import (
    TorchAttention,
    get_attention_backend,
    resolve_attention_backend,
)
from sglang_crosspool.options import ATTENTION_BACKENDS
from sglang_crosspool.server_args import ServerArgs


def test_registry_names_are_the_options():
    assert set(attention._BACKENDS) | {"auto"} == set(ATTENTION_BACKENDS)


def test_auto_resolves_per_device(monkeypatch):
    assert resolve_attention_backend("auto", "cpu") == "torch"
    assert get_attention_backend("auto", "cpu") is TorchAttention
    for importable, expected in (({"flashinfer", "triton"}, "flashinfer"),
                                 ({"triton"}, "triton"), (set(), "torch")):
        monkeypatch.setattr(attention, "_imports", lambda m, ok=importable: m in ok)
        assert resolve_attention_backend("auto", "cuda:0") == expected
    # FlashInfer only where its kernels take the dtype and every model's head size.
    monkeypatch.setattr(attention, "_imports", lambda m: True)
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, [128, 64]) == "flashinfer"
    assert resolve_attention_backend("auto", "cuda", torch.float32, [128]) == "triton"
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, [128, 16]) == "triton"
    assert resolve_attention_backend("triton", "cpu") == "triton"  # an explicit name stays
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("flash", "cpu")
    with pytest.raises(ValueError, match="device"):
        get_attention_backend("auto")


def test_engine_config_holds_the_resolved_backend(tiny_models):
    path = tiny_models["qwen3_moe"]
    assert EngineConfig.build(path).attention_backend == "torch"  # auto on CPU
    assert EngineConfig.build(path, attention_backend="triton").attention_backend == "triton"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig.build(path, attention_backend="flash")
    args = ServerArgs.from_cli(["--model-path", path])
    assert args.attention_backend == "auto"
    assert args.engine_config().attention_backend == "torch"
