"""The Triton merge of attention partials against its torch reference (interpreter on CPU)."""

import pytest
import torch

pytest.importorskip("triton")

from crosspool_kernels.merge_state import merge_state, merge_state_ref


@pytest.mark.parametrize(("parts", "lead", "dim"), [(2, (3, 4), 16), (3, (5, 2), 40)])
def test_merge_state_matches_reference(parts, lead, dim, device):
    gen = torch.Generator().manual_seed(0)
    outs = torch.randn(parts, *lead, dim, generator=gen).to(device)
    lses = (torch.randn(parts, *lead, generator=gen) * 3).to(device)
    lses[0, 0] = float("-inf")  # an empty partial
    lses[:, -1, -1] = float("-inf")  # a row with no key anywhere
    out, lse = merge_state(outs, lses)
    want_out, want_lse = merge_state_ref(outs, lses)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert (out[-1, -1] == 0).all()
