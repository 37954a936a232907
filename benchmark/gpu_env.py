"""What the standalone GPU benchmark scripts share: before their first import of triton or of
the repository's packages, the interpreter on CPU and the three package roots on sys.path;
then timing by CUDA events."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_paths(device: str) -> None:
    if device == "cpu":  # must precede the first import of triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for sub in ("", "scheduler", "kernels"):
        path = str(ROOT / sub) if sub else str(ROOT)
        if path not in sys.path:
            sys.path.insert(0, path)


def cuda_ms(fn, n: int) -> float:
    """Mean milliseconds per call of fn over n calls, by CUDA events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n
