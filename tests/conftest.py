"""Shared fixtures: tiny real checkpoints (made once per session) and their HF references."""

from __future__ import annotations

import pytest
import torch

from sglang_crosspool.testing.checkpoints import ARCHS, make_model

# Tiny models: one thread avoids thread-pool stalls on a 2-core machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """arch -> directory of a tiny random checkpoint (per-expert layout, one shard)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: str(make_model(root / arch, arch, size="tiny", seed=1)) for arch in ARCHS}


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    from sglang_crosspool.testing.checkpoints import hf_reference

    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = hf_reference(tiny_models[arch])
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def arch_paths(tiny_models) -> list[str]:
    """The tiny checkpoints in ARCHS order (served under their architecture names)."""
    return [tiny_models[a] for a in ARCHS]


@pytest.fixture(scope="session")
def monolithic_reference(arch_paths):
    """testing.multimodel's workload on a monolithic CPU engine: (outputs, stats)."""
    from sglang_crosspool.testing.multimodel import run_all

    return run_all(arch_paths, pool_mode="monolithic")
