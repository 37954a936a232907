import pytest
import torch
from conftest import assert_close

pytest.importorskip("triton")

from crosspool_kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)

from sglang_crosspool.models.common import rms_norm as engine_rms_norm


@pytest.mark.parametrize(("shape", "dtype"), [
    ((3, 64), torch.float32), ((5, 100), torch.float32), ((2, 3, 48), torch.float16),
])
def test_rms_norm_matches_reference(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    out = rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rms_norm_ref(x, w, 1e-6), dtype)
    assert_close(out, engine_rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize(("shape", "dtype"), [((4, 96), torch.float32), ((3, 80), torch.float16)])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_add_rms_norm(shape, dtype, inplace, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    exp_out, exp_sum = fused_add_rms_norm_ref(x.clone(), r.clone(), w, 1e-5)
    xi, ri = x.clone(), r.clone()
    out, total = fused_add_rms_norm(xi, ri, w, 1e-5, inplace=inplace)
    assert torch.equal(total, exp_sum)  # the add rounds exactly as torch's
    assert_close(out, exp_out, dtype)
    if inplace:
        assert out.data_ptr() == xi.data_ptr() and total.data_ptr() == ri.data_ptr()
    else:
        assert torch.equal(xi, x) and torch.equal(ri, r)


def test_rms_norm_strided_rows(device):
    # Rows of a wider buffer (e.g. q of a fused qkv output) normalized over their last dim.
    buf = torch.randn(6, 80, device=device)
    x = buf[:, :64]
    w = torch.randn(64, device=device)
    assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), torch.float32)
