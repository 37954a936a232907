import pytest
import torch

pytest.importorskip("triton")

from crosspool_kernels.sampling import (
    filter_mask_ref,
    greedy_sample,
    greedy_sample_ref,
    top_k_top_p_sample,
    top_k_top_p_sample_ref,
)

from sglang_crosspool.engine.sampler import filtered_probs
from sglang_crosspool.engine.sampling_params import SamplingParams

SMALL = {"BLOCK_V": 256, "CHUNK": 512, "LOG_PIVOTS": 4, "num_warps": 4}  # 2 chunks of V=1000
WIDE = {"BLOCK_V": 128, "CHUNK": 128, "LOG_PIVOTS": 8, "num_warps": 4}  # 256 pivots, 4 rounds


def _probs(batch, vocab, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, vocab, generator=gen) * 3, -1).to(device, dtype)


@pytest.mark.parametrize(("vocab", "dtype", "config"), [
    (1000, torch.float32, SMALL),  # vocab not a multiple of the block
    (300, torch.float16, None),  # default config (one chunk), half-precision probs
])
def test_sample_matches_reference(vocab, dtype, config, device):
    batch = 8
    probs = _probs(batch, vocab, 0, dtype, device)
    uniform = torch.rand(batch, generator=torch.Generator().manual_seed(1)).to(device)
    top_k = torch.tensor([0, 1, 5, 50, 0, 2000, 3, 20], device=device)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.8, 0.3, 1.0, 1.0, 0.6], device=device)
    min_p = torch.tensor([0, 0, 0, 0.05, 0, 0, 0.5, 0.1], device=device)
    out = top_k_top_p_sample(probs, uniform, top_k, top_p, min_p, config=config)
    ref = top_k_top_p_sample_ref(probs, uniform, top_k, top_p, min_p)
    assert out.dtype == torch.int64
    assert out.tolist() == ref.tolist()
    assert out[1] == probs[1].float().argmax()  # top_k = 1 is greedy


def test_sample_scalar_params_sweep(device):
    # One row, many uniforms: every draw is a kept token, and the draws walk the kept set in
    # vocabulary order exactly as the reference does (including u = 0 and u just below 1).
    probs = _probs(1, 257, 3, device=device).expand(8, 257).contiguous()
    uniform = torch.linspace(0, 0.999999, 8, device=device)
    out = top_k_top_p_sample(probs, uniform, top_k=40, top_p=0.7, config=WIDE)
    assert out.tolist() == top_k_top_p_sample_ref(probs, uniform, top_k=40, top_p=0.7).tolist()
    keep = filter_mask_ref(probs[:1], 40, 0.7)[0]
    assert keep[out].all() and out.tolist() == sorted(out.tolist())


def test_top_k_ties_are_kept(device):
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1]], device=device)
    keep = filter_mask_ref(probs, 1)
    assert keep.tolist() == [[False, True, False, True, False]]
    uniform = torch.tensor([0.75], device=device)  # past the first 0.3: the second tie
    assert top_k_top_p_sample(probs, uniform, top_k=1, config=SMALL).tolist() == [3]


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), [(5, 1.0, 0.0), (-1, 0.6, 0.0),
                                                       (20, 0.9, 0.02), (-1, 1.0, 0.1)])
def test_filters_match_engine_sampler(top_k, top_p, min_p):
    # Without ties the threshold form keeps exactly what the engine's sort-based filter keeps.
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(4)) * 2
    params = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)
    expected = filtered_probs(logits[0], params) > 0
    keep = filter_mask_ref(torch.softmax(logits, -1), max(top_k, 0), top_p, min_p)[0]
    assert torch.equal(keep, expected)


def test_greedy_matches_argmax(device):
    logits = torch.randn(5, 700, generator=torch.Generator().manual_seed(5)).to(device)
    logits[2, 10] = logits[2, 600] = 100.0  # ties: the first index wins
    logits[3, 699] = 100.0  # in the last, partial block
    out = greedy_sample(logits, config=SMALL)  # two chunks
    assert out.tolist() == greedy_sample_ref(logits).tolist()
    assert out[2] == 10
