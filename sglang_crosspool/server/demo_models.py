"""Built-in demo models: tiny random-weight MoE checkpoints of three architectures.

Made on first use into `$SGLANG_CROSSPOOL_CACHE/demo-models` (default
`~/.cache/sglang_crosspool/demo-models`), with a progress bar, and reused afterwards. Each model
is written into a scratch folder and renamed into place, so an interrupted run leaves nothing
half-made behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# served name -> (architecture, seed)
DEMO_MODELS = {
    "qwen3-moe-demo": ("qwen3_moe", 0),
    "mixtral-demo": ("mixtral", 1),
    "olmoe-demo": ("olmoe", 2),
}
_VERSION = "v1"  # bump when the demo set or the checkpoint maker changes


def demo_dir() -> Path:
    root = os.environ.get("SGLANG_CROSSPOOL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "sglang_crosspool"
    return base / "demo-models" / _VERSION


def ensure_demo_models(progress: bool = True) -> dict[str, Path]:
    """Returns {served name: checkpoint folder}, making the missing ones."""
    root = demo_dir()
    paths = {name: root / name for name in DEMO_MODELS}
    missing = [name for name, p in paths.items() if not (p / "config.json").is_file()]
    if not missing:
        return paths
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from sglang_crosspool.testing.checkpoints import make_model

    root.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # one bar for the whole set, not one per shard
    bar = tqdm(missing, desc=f"making demo models in {root}", unit="model", disable=not progress)
    for name in bar:
        arch, seed = DEMO_MODELS[name]
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            make_model(scratch, arch, seed=seed)
            try:
                scratch.rename(paths[name])
            except OSError:  # made by a concurrent launcher meanwhile
                if not (paths[name] / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return paths
