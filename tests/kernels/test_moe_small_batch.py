"""The small-batch MoE path (grouped GEMVs over the chosen experts) against its torch reference
and the fused-MoE reference, under the interpreter: batch 1..8, several top-k, a subset of the
experts, with and without the (gated) shared expert, split-K on and off."""

import pytest
import torch
from conftest import assert_close

pytest.importorskip("triton")

from crosspool_kernels.fused_moe import fused_moe_ref
from crosspool_kernels.moe_small_batch import (
    AUTO_MAX_TOKENS,
    moe_small_batch,
    moe_small_batch_ref,
    split_k,
    use_small_batch,
)

TINY = {"BLOCK_N": 16, "BLOCK_K": 32, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": 16, "num_warps": 4}


def _inputs(tokens, experts, top_k, hidden, inter, dtype, device, shared=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    probs = torch.randn(tokens, experts, generator=gen).softmax(-1)
    weights, ids = torch.topk(probs, top_k)
    out = [t.to(device=device, dtype=dtype) for t in (h, w13, w2, weights)] + [ids.to(device)]
    if shared:
        s13 = torch.randn(2 * shared, hidden, generator=gen) / hidden**0.5
        s2 = torch.randn(hidden, shared, generator=gen) / shared**0.5
        gate = torch.randn(1, hidden, generator=gen) / hidden**0.5
        out += [t.to(device=device, dtype=dtype) for t in (s13, s2, gate)]
    return out


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter", "split", "dtype"), [
    (1, 8, 2, 64, 48, 1, torch.float32),  # Mixtral-like top-2, no split
    (3, 16, 8, 48, 40, 3, torch.float32),  # top-8, sizes not powers of two, split-K
    (8, 12, 4, 32, 32, 0, torch.float32),  # batch 8, automatic split
    (5, 8, 1, 64, 24, 2, torch.float16),
])
def test_matches_reference(tokens, experts, top_k, hidden, inter, split, dtype, device):
    h, w13, w2, weights, ids = _inputs(tokens, experts, top_k, hidden, inter, dtype, device)
    out = moe_small_batch(h, w13, w2, weights, ids, config={**TINY, "SPLIT_K": split})
    assert out.shape == h.shape and out.dtype == dtype
    assert_close(out, moe_small_batch_ref(h, w13, w2, weights, ids), dtype)
    assert_close(out, fused_moe_ref(h, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize(("tokens", "gated", "split"), [(1, True, 1), (4, True, 2),
                                                       (2, False, 0)])
def test_shared_expert_in_the_same_pass(tokens, gated, split, device):
    # Qwen1.5-MoE's layout: top-4 routed experts plus a wider shared expert behind a sigmoid
    # gate (DeepSeek's shared experts: no gate).
    h, w13, w2, weights, ids, s13, s2, gate = _inputs(tokens, 10, 4, 48, 24, torch.float32,
                                                      device, shared=56, seed=tokens)
    gate = gate if gated else None
    out = moe_small_batch(h, w13, w2, weights, ids, shared_w13=s13, shared_w2=s2,
                          shared_gate=gate, config={**TINY, "SPLIT_K": split})
    ref = moe_small_batch_ref(h, w13, w2, weights, ids, shared_w13=s13, shared_w2=s2,
                              shared_gate=gate)
    assert_close(out, ref, torch.float32)
    shared = torch.nn.functional.linear(h, s13).chunk(2, -1)
    shared = torch.nn.functional.linear(torch.nn.functional.silu(shared[0]) * shared[1], s2)
    if gated:
        shared = torch.sigmoid(h @ gate.T) * shared
    assert_close(out, fused_moe_ref(h, w13, w2, weights, ids) + shared, torch.float32)


def test_subset_of_experts_and_missing_pairs(device):
    # One FFN server's share: pairs routed elsewhere, and a negative id, contribute nothing.
    h, w13, w2, weights, ids = _inputs(6, 8, 2, 32, 24, torch.float32, device, seed=3)
    ids[0, 1] = -1
    owned = [1, 3, 4]
    local_index = torch.full((8,), -1, dtype=torch.int64, device=device)
    local_index[owned] = torch.arange(3, device=device)
    out = moe_small_batch(h, w13[owned], w2[owned], weights, ids, local_index=local_index,
                          config={**TINY, "SPLIT_K": 2})
    ref = fused_moe_ref(h, w13[owned], w2[owned], weights, ids, local_index=local_index)
    assert_close(out, ref, torch.float32)
    untouched = ~torch.isin(ids, torch.tensor(owned, device=device)).any(dim=1)
    assert torch.all(out[untouched] == 0)


def test_default_config(device):
    h, w13, w2, weights, ids = _inputs(2, 8, 2, 64, 32, torch.float32, device, seed=4)
    assert_close(moe_small_batch(h, w13, w2, weights, ids),
                 moe_small_batch_ref(h, w13, w2, weights, ids), torch.float32)


def test_split_k_choice():
    cfg = {"DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": 128, "SPLIT_K": 4}
    assert split_k(cfg, 1, 2048, 768, "cpu") == 3  # 6 blocks of K: 3 splits of 2, none empty
    assert split_k({**cfg, "SPLIT_K": 1}, 1, 2048, 768, "cpu") == 1
    assert split_k({**cfg, "SPLIT_K": 8}, 1, 2048, 100, "cpu") == 1  # one block of K
    assert split_k({**cfg, "SPLIT_K": 0}, 8, 2048, 768, "cpu") == 1  # enough programs already


def test_selection(monkeypatch):
    assert not use_small_batch("off", 1, "cpu")
    assert not use_small_batch("auto", 1, "cpu")  # auto: CUDA only
    assert not use_small_batch("auto", AUTO_MAX_TOKENS + 1, "cuda")  # and only where it won
    assert not use_small_batch("on", 9, "cpu")  # never above 8 tokens
    assert not use_small_batch("on", 0, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_small_batch("on", 8, "cpu")  # forced on CPU: the interpreter runs it


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_ffn_half_takes_the_path_when_forced(arch, tiny_models, device):
    # The engine's FFN half at batch 1..8: `on` (the kernels, shared expert included) against
    # `off` (the torch loop on CPU); above 8 tokens `on` keeps the other path.
    from sglang_crosspool.models.checkpoint import CheckpointFiles
    from sglang_crosspool.models.common import Routing
    from sglang_crosspool.models.registry import resolve

    spec, architecture = resolve(tiny_models[arch])
    files = CheckpointFiles(tiny_models[arch])
    halves = {mode: architecture.ffn_cls(spec, files, device, torch.float32, moe_small_batch=mode)
              for mode in ("on", "off")}
    layer = next(i for i, moe in enumerate(spec.moe_layers) if moe)
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 3, 8, 9):
        h = torch.randn(tokens, spec.hidden_size, generator=gen).to(device)
        probs = torch.randn(tokens, spec.num_experts, generator=gen).softmax(-1)
        weights, ids = torch.topk(probs, spec.top_k)
        routing = Routing(ids.to(device), weights.to(device))
        assert halves["on"]._small_batch(h) == (tokens <= 8)
        assert_close(halves["on"].forward(layer, h, routing),
                     halves["off"].forward(layer, h, routing), torch.float32)
        if arch == "qwen2_moe":
            assert halves["on"].layers[layer].shared_gate is not None  # the gated shared expert


def test_engine_decodes_the_same_tokens(tiny_models):
    # --moe-small-batch on (forced on CPU under the interpreter) against off, through the
    # engine: prefill (> 8 tokens) takes the old path, each decode step the new one.
    from sglang_crosspool import Engine

    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    prompts = [[5, 9, 2, 7, 11, 3, 8, 1, 4, 6, 10], [3, 1, 4]]
    outs = {}
    for mode in ("on", "off"):
        engine = Engine(tiny_models["qwen2_moe"], moe_small_batch=mode)
        assert engine.core.config.moe_small_batch == mode
        assert [h.moe_small_batch for h in engine.core.ffn.halves["qwen2_moe"]] == [mode]
        outs[mode] = [o["output_ids"] for o in engine.generate(input_ids=prompts,
                                                               sampling_params=params)]
        engine.shutdown()
    assert outs["on"] == outs["off"]
