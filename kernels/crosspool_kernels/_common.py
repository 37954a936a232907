"""Shared helpers of the kernel files: the optional triton import, sizes, index tensors.

Kernel modules import `triton` and `tl` from here so that their torch references stay
importable where triton is not installed (the wrappers then raise when called).
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

    class _Missing:
        """Stands in for `triton` / `triton.language` so kernel definitions still parse."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            def build(f):
                def unavailable(*args, **kwargs):
                    raise RuntimeError("triton is not installed; use the torch reference")

                return unavailable

            return build(fn) if fn is not None else build

        def __getattr__(self, name):
            return None

    triton = tl = _Missing()


def _patch_interpreter_index() -> None:
    """NOTE: under TRITON_INTERPRET=1 with numpy >= 2.4, triton 3.6 turns a scalar tensor into
    a Python int with `int(ndarray)`, which numpy now refuses for its 1-element 1-d arrays, so
    any `range(start, end)` over loaded values fails. Rebind `__index__` to take the element.
    Only the interpreter is touched; compiled kernels never see this."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_crosspool_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._crosspool_fixed = True
    interpreter._patch_lang_tensor = patched


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_index()


def triton_usable(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of `device` (a GPU, or the interpreter)."""
    if not HAS_TRITON:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def index_tensor(x, device, dtype=torch.int32) -> torch.Tensor:
    """A per-sequence list or tensor (q_starts, q_lens, ctx_lens) as a tensor on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.tensor(list(x), device=device, dtype=dtype)


def host_max(x) -> int:
    """Max of a list, or of a tensor (NOTE: a device sync; pass lists or hints on hot paths)."""
    if isinstance(x, torch.Tensor):
        return int(x.max()) if x.numel() else 0
    return max(x, default=0)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise use TF32 on tensor cores; keep fp32 exact for references.
    return "ieee" if dtype == torch.float32 else "tf32"
