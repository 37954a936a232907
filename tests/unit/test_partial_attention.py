"""Sequence-split math: attention over disjoint subsets of a sequence's keys, merged by
log-sum-exp, equals attention over all of them (GQA and MLA, decode and prefill rows)."""

import pytest
import torch

from sglang_crosspool.engine.partial_attention import (
    merge_partials,
    partial_attention,
    partial_latent_attention,
)


def _full_gqa(q, q_pos, keys, values, scale):
    groups = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, 1)
    v = values.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(keys.shape[0])
    scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)


def _subsets(m: int, parts: int, seed: int):
    """Disjoint random subsets of range(m), one of them possibly empty."""
    owner = torch.randint(0, parts, (m,), generator=torch.Generator().manual_seed(seed))
    return [torch.nonzero(owner == r).flatten() for r in range(parts)]


@pytest.mark.parametrize(("parts", "n", "m", "heads", "kv_heads"), [
    (2, 1, 37, 4, 2),  # decode row
    (3, 5, 40, 4, 1),  # prefill rows (causal by position), MQA
    (3, 1, 2, 8, 8),  # fewer keys than parts: some partials empty
])
def test_gqa_partials_merge_to_full_attention(parts, n, m, heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    d = 16
    q = torch.randn(n, heads, d, generator=gen)
    keys = torch.randn(m, kv_heads, d, generator=gen)
    values = torch.randn(m, kv_heads, d, generator=gen)
    q_pos = torch.arange(m - n, m)
    outs, lses = [], []
    for idx in _subsets(m, parts, seed=1):
        o, lse = partial_attention(q, q_pos, keys[idx], values[idx], idx, d**-0.5)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out, _full_gqa(q, q_pos, keys, values, d**-0.5),
                               atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


def test_mla_partials_merge_to_full_attention():
    gen = torch.Generator().manual_seed(2)
    n, m, heads, r, p = 3, 29, 4, 24, 8
    q = torch.randn(n, heads, r + p, generator=gen)
    latents = torch.randn(m, r + p, generator=gen)
    q_pos = torch.arange(m - n, m)
    scores = torch.einsum("qhd,kd->hqk", q, latents) * 0.2
    scores = scores.masked_fill(torch.arange(m)[None, None] > q_pos[None, :, None], -torch.inf)
    want = torch.einsum("hqk,kr->qhr", torch.softmax(scores, -1), latents[:, :r])
    parts = [partial_latent_attention(q, q_pos, latents[idx], idx, r, 0.2)
             for idx in _subsets(m, 3, seed=3)]
    out, _ = merge_partials(torch.stack([o for o, _ in parts]),
                            torch.stack([lse for _, lse in parts]))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_no_key_anywhere_gives_zero():
    q = torch.randn(2, 2, 8)
    o, lse = partial_attention(q, torch.tensor([0, 1]), q.new_zeros(0, 1, 8),
                               q.new_zeros(0, 1, 8), torch.zeros(0, dtype=torch.long), 1.0)
    out, merged = merge_partials(torch.stack([o, o]), torch.stack([lse, lse]))
    assert (out == 0).all() and torch.isinf(merged).all()


def test_query_chunks_match_one_chunk(monkeypatch):
    import sglang_crosspool.engine.partial_attention as pa

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(9, 2, 8, generator=gen), torch.randn(20, 2, 8, generator=gen),
               torch.randn(20, 2, 8, generator=gen))
    q_pos, k_pos = torch.arange(11, 20), torch.arange(20)
    whole = partial_attention(q, q_pos, k, v, k_pos, 0.3)
    monkeypatch.setattr(pa, "SCORE_ELEMENTS", 2 * 20 * 2)  # two queries per chunk
    chunked = pa.partial_attention(q, q_pos, k, v, k_pos, 0.3)
    torch.testing.assert_close(whole, chunked)
