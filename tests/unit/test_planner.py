"""KV planner: four real configs on 2 and 8 GPUs of 80 and 141 GB, checked against figures
worked out by hand below from the config.json numbers; the CLI end to end; clear errors.

Conventions the hand arithmetic follows (the planner's, documented in its modules): GB is
10^9 B; usable memory per GPU = memory x 0.9 (mem_fraction_static); bf16 = 2 B; KV pages of
2 MiB; a KV block is one page per layer for K and one for V, on each TP rank of a replica;
models are admitted in the order given (Qwen3, Qwen1.5, OLMoE, Mixtral); static reserves
4 (max_running) x max_context (= max_position_embeddings) tokens per model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from sglang_crosspool.planner import PlanError, build_plan, load_plan, to_json
from sglang_crosspool.planner.figure import Figure, parse_size

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests" / "data" / "model-configs"
QWEN3, QWEN15, OLMOE, MIXTRAL = ORDER = [
    "Qwen3-30B-A3B", "Qwen1.5-MoE-A2.7B", "OLMoE-1B-7B-0924", "Mixtral-8x7B-v0.1"]
B = 2  # bf16
PAGE = 2 * 1024 * 1024  # 2,097,152 B
U80 = 80 * 10**9 * 9 // 10  # 72,000,000,000 B usable of an 80 GB GPU
U141 = 141 * 10**9 * 9 // 10  # 126,900,000,000 B usable of a 141 GB GPU

# ---- Weights, by hand from each config.json --------------------------------------------------
# Qwen3-30B-A3B: hidden 2048, 48 layers, 32 heads / 4 kv_heads x head_dim 128, vocab 151936
# (untied), 128 experts top-8 of width 768, q_norm/k_norm of head_dim per layer, no bias.
Q3_ATTN_LAYER = 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 32 * 128 * 2048 + 2 * 128  # 18,874,624
Q3 = {
    "expert": 48 * 3 * 2048 * 768 * B,  # 452,984,832: one expert over all 48 layers
    "ffn": 48 * 128 * 3 * 2048 * 768 * B,  # 57,982,058,496
    "embed": 151936 * 2048 * B,  # 622,329,856, and as much again for the untied lm_head
    "attention": 48 * Q3_ATTN_LAYER * B,  # 1,811,963,904
    "replicated": ((2 * 48 + 1) * 2048 + 48 * 128 * 2048) * B,  # norms + router = 25,563,136
    "kv": 2 * 48 * 4 * 128 * B,  # 98,304 B per token
    "layers": 48, "kv_heads": 4, "experts": 128, "top_k": 8,
    "max_pos": 40960, "public_b": 30.5, "active_b": 3.3,
}
# Qwen1.5-MoE-A2.7B: hidden 2048, 24 layers, 16 heads / 16 kv_heads x 128, vocab 151936,
# 60 experts top-4 of width 1408, a shared expert of width 5632 behind a (2048 -> 1) gate,
# q/k/v biases.
Q15_ATTN_LAYER = 4 * 2048 * 2048 + 3 * 2048  # 16,783,360
Q15 = {
    "expert": 24 * 3 * 2048 * 1408 * B,  # 415,236,096
    "ffn": (24 * 60 * 3 * 2048 * 1408 + 24 * (3 * 2048 * 5632 + 2048)) * B,  # 26,575,208,448
    "shared": 24 * (3 * 2048 * 5632 + 2048) * B,  # 1,661,042,688
    "embed": 151936 * 2048 * B,
    "attention": 24 * Q15_ATTN_LAYER * B,  # 805,601,280
    "replicated": ((2 * 24 + 1) * 2048 + 24 * 60 * 2048) * B,  # 6,098,944
    "kv": 2 * 24 * 16 * 128 * B,  # 196,608
    "layers": 24, "kv_heads": 16, "experts": 60, "top_k": 4,
    "max_pos": 8192, "public_b": 14.3, "active_b": 2.7,
}
# OLMoE-1B-7B-0924: hidden 2048, 16 layers, 16 heads / 16 kv_heads x 128, vocab 50304,
# 64 experts top-8 of width 1024, q_norm (2048) and k_norm (2048) per layer.
OL_ATTN_LAYER = 4 * 2048 * 2048 + 2048 + 2048  # 16,781,312
OL = {
    "expert": 16 * 3 * 2048 * 1024 * B,  # 201,326,592
    "ffn": 16 * 64 * 3 * 2048 * 1024 * B,  # 12,884,901,888
    "embed": 50304 * 2048 * B,  # 206,045,184
    "attention": 16 * OL_ATTN_LAYER * B,  # 537,001,984
    "replicated": ((2 * 16 + 1) * 2048 + 16 * 64 * 2048) * B,  # 4,329,472
    "kv": 2 * 16 * 16 * 128 * B,  # 131,072
    "layers": 16, "kv_heads": 16, "experts": 64, "top_k": 8,
    "max_pos": 4096, "public_b": 6.9, "active_b": 1.3,
}
# Mixtral-8x7B-v0.1: hidden 4096, 32 layers, 32 heads / 8 kv_heads x 128, vocab 32000,
# 8 experts top-2 of width 14336.
MX_ATTN_LAYER = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096  # 41,943,040
MX = {
    "expert": 32 * 3 * 4096 * 14336 * B,  # 11,274,289,152
    "ffn": 32 * 8 * 3 * 4096 * 14336 * B,  # 90,194,313,216
    "embed": 32000 * 4096 * B,  # 262,144,000
    "attention": 32 * MX_ATTN_LAYER * B,  # 2,684,354,560
    "replicated": ((2 * 32 + 1) * 4096 + 32 * 8 * 4096) * B,  # 2,629,632
    "kv": 2 * 32 * 8 * 128 * B,  # 131,072
    "layers": 32, "kv_heads": 8, "experts": 8, "top_k": 2,
    "max_pos": 32768, "public_b": 46.7, "active_b": 12.9,
}
HAND = {QWEN3: Q3, QWEN15: Q15, OLMOE: OL, MIXTRAL: MX}
for _h in HAND.values():
    # attention side = embedding + lm_head (untied in all four) + attention + norms + router
    _h["side"] = 2 * _h["embed"] + _h["attention"] + _h["replicated"]
    _h["total"] = _h["side"] + _h["ffn"]


def tp_share(name: str, tp: int) -> int:
    """Attention-side bytes on one TP rank: norms and router whole, the rest split tp ways
    (every split below is exact)."""
    h = HAND[name]
    assert (h["side"] - h["replicated"]) % tp == 0
    return (h["side"] - h["replicated"]) // tp + h["replicated"]


def block_tokens(name: str, tp: int) -> int:
    """Tokens per block: a 2 MiB page / (kv_heads/tp x 128 head_dim x 2 B)."""
    return PAGE // (HAND[name]["kv_heads"] // tp * 128 * B)


def tokens(name: str, pages: int, tp: int) -> int:
    """Tokens `pages` pages per device hold: whole blocks of 2 x layers pages."""
    return pages // (2 * HAND[name]["layers"]) * block_tokens(name, tp)


def plan(devices: int, memory: str, names=ORDER, **kw):
    """The TP layout of monolithic, unless told: the hand figures below are worked out for it."""
    kw.setdefault("monolithic_layout", "tp")
    return build_plan([CONFIGS / n for n in names], devices, parse_size(memory), **kw)


@pytest.fixture(scope="module")
def plans():
    return {(n, m): plan(n, m) for n in (2, 8) for m in ("80GB", "141GB")}


# ---- Weights ---------------------------------------------------------------------------------

def test_hand_figures_are_the_expected_literals():
    # The arithmetic above, evaluated once by hand, so that a slip in it shows up here too.
    assert (Q3["ffn"], Q3["side"], Q3["kv"]) == (57_982_058_496, 3_082_186_752, 98_304)
    assert (Q15["ffn"], Q15["side"], Q15["kv"]) == (26_575_208_448, 2_056_359_936, 196_608)
    assert (OL["ffn"], OL["side"], OL["kv"]) == (12_884_901_888, 953_421_824, 131_072)
    assert (MX["ffn"], MX["side"], MX["kv"]) == (90_194_313_216, 3_211_272_192, 131_072)
    assert MX["expert"] == 11_274_289_152 and Q3["expert"] == 452_984_832


@pytest.mark.parametrize("name", ORDER)
def test_weights_split_by_pool_match_hand_arithmetic(plans, name):
    h, w = HAND[name], plans[(2, "141GB")].model(name).weights
    assert w.ffn_side.value == h["ffn"]
    assert w.expert_bytes.value == h["expert"]
    assert w.shared_experts.value == h.get("shared", 0)
    assert w.embedding.value == w.lm_head.value == h["embed"]
    assert w.attention.value == h["attention"]
    assert w.replicated_bytes.value == h["replicated"]
    assert w.attention_side.value == h["side"]
    assert w.total.value == h["total"]
    assert plans[(2, "141GB")].model(name).kv_bytes_per_token.value == h["kv"]


@pytest.mark.parametrize("name", ORDER)
def test_parameter_counts_match_published_sizes(plans, name):
    h, w = HAND[name], plans[(2, "141GB")].model(name).weights
    assert w.params_total.value == h["total"] // B
    # Published: Mixtral 46.7B (12.9B active), Qwen3-30B-A3B 30.5B (3.3B), OLMoE 6.9B (1.3B),
    # Qwen1.5-MoE-A2.7B 14.3B (2.7B). Within 2%.
    assert w.params_total.value / 1e9 == pytest.approx(h["public_b"], rel=0.02)
    assert w.params_active.value / 1e9 == pytest.approx(h["active_b"], rel=0.02)
    # active = total - routed experts a token skips: routed x (E - k) / E
    routed = h["ffn"] - h.get("shared", 0)
    skipped = routed // B * (h["experts"] - h["top_k"]) // h["experts"]
    assert w.params_active.value == h["total"] // B - skipped


def test_figures_carry_their_arithmetic(plans):
    p = plans[(2, "141GB")]
    assert p.model(QWEN3).kv_bytes_per_token.how == (
        "2 (K,V) x 48 layers x 4 kv_heads x 128 head_dim x 2 B = 98,304 B/token")
    assert p.model(MIXTRAL).weights.routed_experts.how == (
        "32 MoE layers x 8 experts x 3 (gate,up,down) x 4,096 hidden x 14,336 "
        "moe_intermediate x 2 B = 90,194,313,216 B (90.19 GB)")
    # Every Figure anywhere in every plan states its result in its arithmetic.
    for pl in plans.values():
        for fig in _figures(pl):
            assert fig.how, fig
            if isinstance(fig.value, int) and fig.value >= 1000:
                assert f"{fig.value:,}" in fig.how, fig


def _figures(obj):
    if isinstance(obj, Figure):
        yield obj
    elif isinstance(obj, tuple):
        for item in obj:
            yield from _figures(item)
    elif hasattr(obj, "__dataclass_fields__"):
        for field in obj.__dataclass_fields__:
            yield from _figures(getattr(obj, field))


# ---- static ----------------------------------------------------------------------------------

def _static_slice(name: str) -> int:
    """Weights + KV for 4 x max_context tokens on one device (TP 1)."""
    h = HAND[name]
    blocks = -(-4 * h["max_pos"] // block_tokens(name, 1))
    return h["total"] + blocks * 2 * h["layers"] * PAGE


def test_static_on_2x141_every_model_fits_in_its_own_slice(plans):
    # Slices: Qwen3 61,064,245,248 + 80 blocks x 96 pages x 2 MiB = 77,170,372,608;
    # Qwen1.5 28,631,568,384 + 64 x 48 pages = 35,074,019,328; OLMoE 13,838,323,712 +
    # 32 x 32 pages = 15,985,807,360; Mixtral 93,405,585,408 + 128 x 64 pages = 110,585,454,592.
    assert _static_slice(QWEN3) == 77_170_372_608 and _static_slice(MIXTRAL) == 110_585_454_592
    # Best fit in order: Qwen3 -> GPU 0 (49,729,627,392 left); Qwen1.5 fits there too
    # (14,655,608,064 left); OLMoE does not (15.99 GB > 14.66 GB) -> GPU 1; Mixtral fits GPU 1
    # with 126.9 - 15.99 - 110.59 = 0.33 GB to spare.
    s = plans[(2, "141GB")].static
    assert s.served == tuple(ORDER)
    assert [s.model(n).devices for n in ORDER] == [(0,), (0,), (1,), (1,)]
    assert s.devices[0].idle_bytes.value == U141 - _static_slice(QWEN3) - _static_slice(QWEN15)
    assert s.devices[1].idle_bytes.value == U141 - _static_slice(OLMOE) - _static_slice(MIXTRAL)
    assert s.devices[1].idle_bytes.value == 328_738_048
    # A request can use its model's whole slice, 4 x max_context, and nothing more.
    assert [s.model(n).longest_context.value for n in ORDER] == [163_840, 32_768, 16_384,
                                                                 131_072]
    assert s.total_kv_tokens.value == 163_840 + 32_768 + 16_384 + 131_072


def test_static_on_2x80_mixtral_does_not_fit(plans):
    s = plans[(2, "80GB")].static
    # Qwen3's slice (77.17 GB) exceeds one GPU's 72 GB, so it spans both at TP 2: per GPU
    # 1,553,874,944 attention + 28,991,029,248 FFN + 40 blocks x 96 pages x 2 MiB KV.
    q3 = tp_share(QWEN3, 2) + Q3["ffn"] // 2 + 40 * 96 * PAGE
    assert q3 == 38_597_967_872
    # Qwen1.5 (35.07 GB) no longer fits the 33.4 GB left on either GPU: TP 2 as well.
    q15 = tp_share(QWEN15, 2) + Q15["ffn"] // 2 + 32 * 48 * PAGE
    ol = tp_share(OLMOE, 2) + OL["ffn"] // 2 + 16 * 32 * PAGE
    left = U80 - q3 - q15 - ol
    assert left == 7_866_904_576
    # Mixtral would need 55,294,042,112 B on each GPU at TP 2.
    assert tp_share(MIXTRAL, 2) + MX["ffn"] // 2 + 64 * 64 * PAGE == 55_294_042_112
    assert s.served == (QWEN3, QWEN15, OLMOE)
    assert not s.model(MIXTRAL).fits and "55,294,042,112" in s.model(MIXTRAL).reason
    assert [s.model(n).devices for n in s.served] == [(0, 1)] * 3
    assert all(d.idle_bytes.value == left for d in s.devices)
    assert [s.model(n).longest_context.value for n in s.served] == [163_840, 32_768, 16_384]


def test_static_on_8x80_spreads_the_big_slices(plans):
    s = plans[(8, "80GB")].static
    # Qwen3 -> GPUs 0,1 (TP 2); Qwen1.5 (35.07 GB) fits neither (33.4 GB left) -> GPU 2;
    # OLMoE (15.99 GB) fits tightest on GPU 0; Mixtral (55.29 GB per GPU at TP 2) -> GPUs 3,4.
    assert s.served == tuple(ORDER)
    assert [s.model(n).devices for n in ORDER] == [(0, 1), (2,), (0,), (3, 4)]
    assert [d.index for d in s.devices if not d.holds] == [5, 6, 7]


def test_static_on_8x141_leaves_six_gpus_idle(plans):
    s = plans[(8, "141GB")].static
    assert [s.model(n).devices for n in ORDER] == [(0,), (0,), (1,), (1,)]
    assert all(d.idle_bytes.value == U141 for d in s.devices[2:])


# ---- monolithic ------------------------------------------------------------------------------

def test_monolithic_on_2x141_one_elastic_pool_per_gpu(plans):
    m = plans[(2, "141GB")].monolithic
    # Every model on both GPUs at TP 2 (4, 16, 16 and 8 KV heads all divide by 2), FFN halved.
    per_gpu = sum(tp_share(n, 2) + HAND[n]["ffn"] // 2 for n in ORDER)
    assert per_gpu == 98_489_171_968
    pages = (U141 - per_gpu) // PAGE
    assert pages == 13_547
    assert all(d.kv_pages.value == pages and d.weights_bytes.value == per_gpu
               for d in m.devices)
    # One request reaches the whole pool of its TP-2 replica (both GPUs).
    expected = {QWEN3: tokens(QWEN3, pages, 2), QWEN15: tokens(QWEN15, pages, 2),
                OLMOE: tokens(OLMOE, pages, 2), MIXTRAL: tokens(MIXTRAL, pages, 2)}
    assert expected == {QWEN3: 577_536, QWEN15: 288_768, OLMOE: 433_152, MIXTRAL: 432_128}
    assert {n: m.model(n).longest_context.value for n in ORDER} == expected


def test_monolithic_on_2x80_mixtral_does_not_fit(plans):
    m = plans[(2, "80GB")].monolithic
    three = sum(tp_share(n, 2) + HAND[n]["ffn"] // 2 for n in (QWEN3, QWEN15, OLMOE))
    assert three + tp_share(MIXTRAL, 2) + MX["ffn"] // 2 > U80  # 98.49 GB > 72 GB
    pages = (U80 - three) // PAGE
    assert pages == 9_639
    assert m.served == (QWEN3, QWEN15, OLMOE)
    assert [m.model(n).longest_context.value for n in m.served] == [
        tokens(QWEN3, pages, 2), tokens(QWEN15, pages, 2), tokens(OLMOE, pages, 2)]


@pytest.mark.parametrize("memory,usable,pages", [("80GB", U80, 22_395),
                                                 ("141GB", U141, 48_573)])
def test_monolithic_on_8_gpus_kv_heads_cap_one_request(plans, memory, usable, pages):
    m = plans[(8, memory)].monolithic
    # Qwen3 has 4 KV heads: two TP-4 replicas; the others run TP 8. FFN split 8 ways.
    per_gpu = (tp_share(QWEN3, 4) + tp_share(QWEN15, 8) + tp_share(OLMOE, 8)
               + tp_share(MIXTRAL, 8) + sum(HAND[n]["ffn"] // 8 for n in ORDER))
    assert per_gpu == 25_033_336_832
    assert (usable - per_gpu) // PAGE == pages
    q3 = m.model(QWEN3)
    assert q3.parallel.replicas == (4, 4)
    assert "50% of KV memory wasted" in q3.parallel.waste_note  # what TP 8 would cost
    # A Qwen3 request reaches only its replica: half of the 8 GPUs' pools.
    assert q3.longest_context.value == tokens(QWEN3, pages, 4)
    assert q3.tokens_alone.value == 2 * tokens(QWEN3, pages, 4)
    assert m.model(MIXTRAL).longest_context.value == tokens(MIXTRAL, pages, 8)
    assert m.model(OLMOE).longest_context.value == tokens(OLMOE, pages, 8)


# ---- crosspool -------------------------------------------------------------------------------

def test_crosspool_on_2x141_one_weights_gpu_one_kv_gpu(plans):
    c = plans[(2, "141GB")].crosspool
    # One FFN server holds Qwen3 + Qwen1.5 + OLMoE FFNs: 97,442,168,832 B <= 126.9 GB;
    # Mixtral's 90.19 GB more does not fit, and 2 GPUs leave no room for a second server.
    assert Q3["ffn"] + Q15["ffn"] + OL["ffn"] == 97_442_168_832
    assert Q3["ffn"] + Q15["ffn"] + OL["ffn"] + MX["ffn"] > U141
    assert (c.kv_devices, c.weights_devices) == ((0,), (1,))
    assert c.served == (QWEN3, QWEN15, OLMOE) and not c.model(MIXTRAL).fits
    # The KV GPU holds only attention sides, so its pool is nearly the whole GPU.
    pages = (U141 - Q3["side"] - Q15["side"] - OL["side"]) // PAGE
    assert pages == 57_605
    assert c.devices[0].kv_pages.value == pages
    assert c.devices[1].idle_bytes.value == U141 - 97_442_168_832
    assert [c.model(n).longest_context.value for n in c.served] == [
        tokens(QWEN3, pages, 1), tokens(QWEN15, pages, 1), tokens(OLMOE, pages, 1)]
    assert c.model(QWEN3).longest_context.value == 1_228_800
    assert c.model(QWEN3).virtual_pages.value == 4 * 40960 // 2048 * 96  # reserved, virtual


def test_crosspool_on_2x80_admits_by_priority(plans):
    c = plans[(2, "80GB")].crosspool
    # 72 GB FFN server: Qwen3 57.98 GB in; + Qwen1.5 = 84.56 GB out; + OLMoE = 70.87 GB in.
    assert Q3["ffn"] + Q15["ffn"] > U80 >= Q3["ffn"] + OL["ffn"]
    assert c.served == (QWEN3, OLMOE)
    pages = (U80 - Q3["side"] - OL["side"]) // PAGE
    assert pages == 32_407
    assert c.model(QWEN3).longest_context.value == tokens(QWEN3, pages, 1) == 690_176


def test_crosspool_on_8x141_two_ffn_servers_six_kv_gpus(plans):
    c = plans[(8, "141GB")].crosspool
    # All four FFNs: 187,636,482,048 B > one server (126.9 GB) <= two: W = 2, KV pool 6 GPUs.
    assert sum(HAND[n]["ffn"] for n in ORDER) == 187_636_482_048
    assert (c.kv_devices, c.weights_devices) == ((0, 1, 2, 3, 4, 5), (6, 7))
    assert c.served == tuple(ORDER)
    # 6 GPUs: a TP-4 replica on GPUs 0-3 and a TP-2 replica on 4-5 (4 | 4, 8 and 16 heads).
    assert all(c.model(n).parallel.replicas == (4, 2) for n in ORDER)
    tp4 = (U141 - sum(tp_share(n, 4) for n in ORDER)) // PAGE
    tp2 = (U141 - sum(tp_share(n, 2) for n in ORDER)) // PAGE
    assert (tp4, tp2) == (59_387, 58_283)
    assert [d.kv_pages.value for d in c.devices[:6]] == [tp4] * 4 + [tp2] * 2
    q3 = c.model(QWEN3)
    assert q3.longest_context.value == tokens(QWEN3, tp4, 4) == 5_062_656
    assert q3.tokens_alone.value == tokens(QWEN3, tp4, 4) + tokens(QWEN3, tp2, 2)
    assert c.model(MIXTRAL).longest_context.value == tokens(MIXTRAL, tp4, 4)


def test_crosspool_on_8x80_three_ffn_servers(plans):
    c = plans[(8, "80GB")].crosspool
    # 187.64 GB of FFN: > 2 x 72 GB, <= 3 x 72 GB. KV pool: 5 GPUs = TP 4 + TP 1.
    assert 2 * U80 < sum(HAND[n]["ffn"] for n in ORDER) <= 3 * U80
    assert c.weights_devices == (5, 6, 7) and c.served == tuple(ORDER)
    assert c.model(QWEN3).parallel.replicas == (4, 1)
    tp4 = (U80 - sum(tp_share(n, 4) for n in ORDER)) // PAGE
    tp1 = (U80 - sum(HAND[n]["side"] for n in ORDER)) // PAGE
    assert (tp4, tp1) == (33_209, 29_896)
    assert c.model(QWEN3).longest_context.value == tokens(QWEN3, tp4, 4)
    assert c.model(QWEN3).tokens_alone.value == tokens(QWEN3, tp4, 4) + tokens(QWEN3, tp1, 1)
    assert all(int(s.bytes) <= U80 for s in c.placement.servers)


def test_longest_context_per_mode_on_2x141(plans):
    """The comparison the planner exists for: one request's reach, per pool mode."""
    p = plans[(2, "141GB")]
    reach = {n: tuple(p.mode(mode).model(n).longest_context.value
                      if p.mode(mode).model(n).fits else None
                      for mode in ("static", "monolithic", "crosspool")) for n in ORDER}
    assert reach == {
        QWEN3: (163_840, 577_536, 1_228_800),
        QWEN15: (32_768, 288_768, 614_400),
        OLMOE: (16_384, 433_152, 921_600),
        MIXTRAL: (131_072, 432_128, None),  # crosspool on 2 GPUs cannot hold Mixtral's FFN
    }
    # Capped by the model's own limit, every served request can reach its max context.
    for mode in ("static", "monolithic", "crosspool"):
        for kv in p.mode(mode).models:
            assert not kv.fits or (kv.reaches_max_context and
                                   kv.longest_served.value == HAND[kv.name]["max_pos"])


# ---- expert placement ------------------------------------------------------------------------

def test_placement_mixtral_alone_alternates_experts():
    c = plan(8, "80GB", names=[MIXTRAL]).crosspool
    # 90.19 GB of experts need 2 servers of 72 GB; 8 equal experts alternate, 4 each.
    assert c.weights_devices == (6, 7)
    assert c.placement.table() == {MIXTRAL: [[0, 2, 4, 6], [1, 3, 5, 7]]}
    assert [s.bytes.value for s in c.placement.servers] == [4 * MX["expert"]] * 2
    assert [s.load.value for s in c.placement.servers] == [4 * 2 / 8] * 2


def test_placement_of_four_models_on_two_servers_by_hand(plans):
    c = plans[(8, "141GB")].crosspool
    p = c.placement
    # By hand: B = 187,636,482,048 B in all, L = 2 + 8 + (4 + 1 shared) + 8 = 23 (rate 1 x
    # top_k per model, 1 for the shared expert). The shared expert (1.66 GB, load 1) goes to
    # server 0 first. Mixtral's 8 experts (largest) alternate 4/4. Server 0 then leads by
    # gap = 1,661,042,688/B + 1/L; a Qwen3 expert weighs q = 452,984,832/B + (1/16)/L, so
    # server 1 takes ceil(gap/q) = 11 of them (0-10), then the other 117 alternate from server 0
    # (59 to server 0: 11, 13, ..., 127; 58 to server 1). Qwen1.5 and OLMoE experts then
    # alternate evenly.
    big_b, big_l = 187_636_482_048, Fraction(23)
    gap = Fraction(Q15["shared"], big_b) + 1 / big_l
    q = Fraction(Q3["expert"], big_b) + Fraction(1, 16) / big_l
    assert -(-gap // q) == 11
    table = p.table()
    assert table[QWEN3][0] == list(range(11, 128, 2))
    assert table[QWEN3][1] == list(range(11)) + list(range(12, 128, 2))
    assert [len(e) for e in table[QWEN15]] == [30, 30]
    assert [len(e) for e in table[OLMOE]] == [32, 32]
    assert [len(e) for e in table[MIXTRAL]] == [4, 4]
    assert p.model(QWEN15).shared_server == 0
    bytes0 = 4 * MX["expert"] + Q15["shared"] + 59 * Q3["expert"] + 30 * Q15["expert"] \
        + 32 * OL["expert"]
    assert p.servers[0].bytes.value == bytes0 == 92_383_838_208
    assert p.servers[1].bytes.value == sum(HAND[n]["ffn"] for n in ORDER) - bytes0
    assert p.servers[0].load.value == 4 * 2 / 8 + 1 + 59 * 8 / 128 + 30 * 4 / 60 + 32 * 8 / 64


def test_every_expert_lives_on_exactly_one_server(plans):
    for pl in plans.values():
        p = pl.crosspool.placement
        for name in pl.crosspool.served:
            ids = sorted(e for server in p.table()[name] for e in server)
            assert ids == list(range(HAND[name]["experts"]))
        assert sum(s.bytes.value for s in p.servers) == sum(
            HAND[n]["ffn"] for n in pl.crosspool.served)


# ---- traffic ---------------------------------------------------------------------------------

def test_traffic_file_sets_slices_and_the_mix(tmp_path):
    traffic = tmp_path / "traffic.yaml"
    traffic.write_text("default: {max_running: 2}\n"
                       f"{QWEN3}: {{rate: 3, mean_context: 8192, max_context: 32768}}\n")
    p = plan(2, "141GB", traffic=traffic)
    q3 = p.model(QWEN3).traffic
    assert (q3.rate, q3.mean_context, q3.max_context, q3.max_running) == (3.0, 8192, 32768, 2)
    # static: 2 x 32,768 tokens / 2,048 per block = 32 blocks x 96 pages.
    assert p.static.model(QWEN3).kv_pages.value == 32 * 96
    assert p.static.model(QWEN3).longest_context.value == 65_536
    # Monolithic pool 2 x 13,547 pages; token shares by rate x mean_context:
    # Qwen3 3 x 8192 = 24,576, the others 1 x 4,096 each (36,864 in all), so a mixed token
    # costs (24,576 x 98,304 + 4,096 x (196,608 + 131,072 + 131,072)) / 36,864 B.
    per_token = Fraction(24576 * 98304 + 4096 * (196608 + 131072 + 131072), 36864)
    assert p.monolithic.total_kv_tokens.value == int(2 * 13_547 * PAGE / per_token)


@pytest.mark.parametrize("content,message", [
    ('{"nope": {"rate": 1}}', "no served model named 'nope'"),
    ('{"Qwen3-30B-A3B": {"rates": 1}}', "unknown field(s) rates"),
    ('{"Qwen3-30B-A3B": {"mean_context": 9000, "max_context": 8192}}', "exceeds max_context"),
    ('{"Qwen3-30B-A3B": {"max_context": 65536}}', "max_position_embeddings 40960"),
    ('{"Qwen3-30B-A3B": {"rate": -1}}', "rate must be a number >= 0"),
    ('{"Qwen3-30B-A3B": {"max_running": 0}}', "max_running must be an integer >= 1"),
    ('[1, 2]', "expected a mapping"),
    ('{"Qwen3-30B-A3B": ', "not valid JSON"),
])
def test_bad_traffic_files_are_refused_clearly(tmp_path, content, message):
    traffic = tmp_path / "traffic.json"
    traffic.write_text(content)
    with pytest.raises(PlanError, match="traffic.json") as err:
        plan(2, "80GB", names=[QWEN3], traffic=traffic)
    assert message in str(err.value)


# ---- unsupported models and bad input --------------------------------------------------------

DEEPSEEK_V3 = {  # the sizing-relevant keys of deepseek-ai/DeepSeek-V3's config.json
    "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512,
    "qk_rope_head_dim": 64, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048, "vocab_size": 129280, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("config,message", [
    (DEEPSEEK_V3, "multi-head latent attention (MLA)"),
    ({**DEEPSEEK_V3, "model_type": "gpt_oss"}, "sliding-window"),
    ({**DEEPSEEK_V3, "model_type": "llama"}, "supported: mixtral, olmoe, qwen2_moe, qwen3_moe"),
    ({"model_type": "mixtral", "hidden_size": 64}, "missing field 'num_attention_heads'"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError) as err:
        build_plan([tmp_path], 2, parse_size("80GB"))
    assert message in str(err.value) and "config.json" in str(err.value)


def test_bad_sizes_and_counts():
    with pytest.raises(ValueError, match="unknown unit"):
        parse_size("80GX")
    assert parse_size("80GiB") == 80 << 30 and parse_size("2MiB") == PAGE
    with pytest.raises(PlanError, match="devices"):
        plan(0, "80GB")
    with pytest.raises(PlanError, match="names must be unique"):
        build_plan([CONFIGS / QWEN3] * 2, 2, parse_size("80GB"))
    with pytest.raises(PlanError, match="does not divide"):  # 1,024 B slots in a 1,000 B page
        plan(2, "80GB", names=[QWEN3], page_bytes=1000)


def test_one_gpu_has_no_crosspool_split():
    p = plan(1, "141GB", names=[OLMOE])
    assert p.monolithic.served == (OLMOE,)
    assert p.crosspool.served == () and "at least 2 devices" in p.crosspool.model(OLMOE).reason


# ---- plan.json and the CLI -------------------------------------------------------------------

def test_plan_json_round_trips(plans, tmp_path):
    for pl in plans.values():
        path = tmp_path / "plan.json"
        path.write_text(to_json(pl))
        assert load_plan(path) == pl
    path.write_text('{"version": 1, "inputs": {}}')
    with pytest.raises(PlanError, match="malformed plan"):
        load_plan(path)
    path.write_text('{"version": 99}')
    with pytest.raises(PlanError, match="not a version-1 plan"):
        load_plan(path)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sglang_crosspool.plan", *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=60, check=False)


def test_cli_prints_the_plan_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    models = [arg for n in ORDER for arg in ("--model-path", str(CONFIGS / n))]
    r = _cli(*models, "--devices", "2", "--device-memory", "141GB", "--out", str(out),
             "--monolithic-layout", "tp")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for needle in ("== static ==", "== monolithic ==", "== crosspool ==",
                   "2 (K,V) x 48 layers x 4 kv_heads x 128 head_dim x 2 B = 98,304 B/token",
                   "32 MoE layers x 8 experts x 3 (gate,up,down) x 4,096 hidden x 14,336",
                   "57,605 pages", "1,228,800", f"plan written to {out}"):
        assert needle in text, needle
    summary = text[text.index("== summary"):text.index("== static")]
    assert "Mixtral-8x7B-v0.1  131,072 -> 32,768  432,128 -> 32,768  does not fit" in summary
    p = load_plan(out)
    assert p.crosspool.served == (QWEN3, QWEN15, OLMOE)
    assert json.loads(out.read_text())["crosspool"]["placement"]["models"][0]["name"] == QWEN3


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "traffic.json"
    bad.write_text('{"nope": {}}')
    r = _cli("--model-path", str(CONFIGS / QWEN3), "--devices", "2", "--device-memory", "80GB",
             "--traffic", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope" in r.stderr
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    r = _cli("--model-path", str(tmp_path), "--devices", "2", "--device-memory", "80GB")
    assert r.returncode == 2 and "MLA" in r.stderr


def test_planner_imports_no_torch():
    code = ("import sys, sglang_crosspool.plan, sglang_crosspool.planner; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       check=False)
    assert r.returncode == 0, r.stderr
