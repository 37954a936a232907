"""What a standalone benchmark script needs before its first import of triton or of the
repository's packages: the interpreter on CPU, and the three package roots on sys.path."""

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
