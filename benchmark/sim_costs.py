"""The simulator's cost model: the time of one engine step, fitted to GPU measurements committed
under benchmark/results/.

In: a model's shape (a plan's `ModelInfo`), a batch (tokens per sequence and their contexts),
the model's attention TP degree and, for crosspool, how many FFN servers share its experts and
whether they sit on another node. Out: seconds for the step, and `coefficients()`: every
constant with the file it comes from.

The form (one H200, bf16, times in seconds):

    graphed decode step  = L*a + (A + F(n))/BW_w + KV/BW_kv
    eager step (prefill, mixed, or a decode batch above the graphs' largest bucket)
                         = max(L*e_arch, graphed-form + FLOPs/R)
    crosspool adds         L*x(n) per step (graphed), or the eager crossing (eager steps);
                         attention bytes and KV split over the TP degree, FFN bytes over the
                         model's FFN servers
    pair graph (--pipeline-models, two models' decode batches in one step)
                         = per layer the longest of: both attention sides, both FFN sides,
                         each model's own attention + crossing + FFN
    KV pages mapped/unmapped on the step: + pages*map_s / pages*unmap_s
    + the server's own time per step

L layers; A attention-side bytes read per step (attention, norms, router, lm_head); F(n) FFN
bytes read for n tokens: each MoE layer reads E*(1-(1-k/E)^n) distinct experts (uniform
routing, as random weights give) plus shared experts and dense layers; KV the bytes of every
context read. a, BW_w, BW_kv are fitted by least squares (relative error) on the monolithic
full-depth decode cells of p2p-2xh200 (Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B, OLMoE-1B-7B); x(n)
on the difference of the p2p-mb1 and monolithic columns of the same files. e_arch is the
eager step of the decode benchmarks per layer (gpu-h200-decode, mla-h200). Three constants
have no committed measurement of their own and are fitted, each to one figure of a 20-request
burst to the fleet-2xh200 fleet: the server's time per step beyond the engine's
(`STEP_OVERHEAD_S`, both modes' TBT p50), R, the prefill FLOP rate (`PREFILL_FLOPS_PER_S`,
monolithic's TTFT p50), and the attention side's share of `a` (`ATTENTION_SHARE`, the TBT p50
of the burst served with --pipeline-models); those figures are fits, not checks. The
headline-2xh200-partial trace replays are then an independent check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

DECODE_FILES = {  # full-depth decode, monolithic vs p2p-mb1, on 2 x H200
    "qwen3_moe": "p2p-2xh200/final/decode.json",
    "qwen2_moe": "p2p-2xh200/rerun/decode-qwen15.json",
    "olmoe": "p2p-2xh200/first/decode-olmoe.json",
}
EAGER_FILES = {  # eager decode step at batch 1, ctx 1k (triton backend)
    "qwen3_moe": "gpu-h200-decode/decode-qwen3-30b-a3b.json",
    "qwen2_moe": "gpu-h200-decode/decode-qwen1.5-moe-a2.7b.json",
    "olmoe": "gpu-h200-decode/decode-olmoe-1b-7b.json",
}
MLA_FILE = "mla-h200/mla.json"
VMM_FILE = "gpu-h200-decode/vmm.json"
CROSSING_FILE = "p2p-2xh200/first/crossing.json"

# Fitted to fleet-2xh200/monolithic/result.json's burst TTFT p50 (0.220 s) by
# `python -m benchmark.simulate fit-prefill` (README of results/simulate): the one cost with
# no measurement of its own. Effective FLOP/s of an eager prefill chunk (all kernels).
PREFILL_FLOPS_PER_S = 180e12
PREFILL_SOURCE = ("fitted: fleet-2xh200/monolithic/result.json burst ttft_p50 (0.220 s), "
                  "grid search by `simulate fit`")
# The server's own time per step (scheduler loop, sampling, streaming) on top of the engine's
# step that the decode benchmarks time: fitted to the TBT p50 of both fleet-2xh200 bursts
# (monolithic and crosspool) by `python -m benchmark.simulate fit`, before the prefill rate.
STEP_OVERHEAD_S = 0.5e-3
STEP_OVERHEAD_SOURCE = ("fitted: fleet-2xh200/{monolithic,crosspool}/result.json burst "
                        "tbt_p50, grid search by `simulate fit`")
# Share of the per-layer fixed time `a` spent on the attention side (the rest on the FFN
# side), which only matters where the two overlap: pair graphs (`--pipeline-models`). Fitted
# to the TBT p50 of the fleet burst served with --pipeline-models
# (headline-2xh200-partial/crosspool-pipeline-models/result.json) by `simulate fit`.
ATTENTION_SHARE = 0.7
ATTENTION_SHARE_SOURCE = ("fitted: headline-2xh200-partial/crosspool-pipeline-models/"
                          "result.json burst tbt_p50, grid search by `simulate fit`")
PAIR_GRAPH_MAX_BS = 16  # engine/pair_graphs.py: pairs are captured up to this batch

# Eager crossing of one layer (prefill and mixed steps in crosspool): two eager kernel
# launches (peer store, flag wait) at ~21 us each (docs/DESIGN.md section 5, "the same kernel
# launched eagerly from Python: ~21 us") plus the bytes both ways at the bulk copy rate
# (390 GB/s, same section); plus one control message per step (p2p-2xh200 README:
# "p2p eager, 1-layer step" 359-419 us; the median of the four, 362 us).
EAGER_LAUNCH_S = 21e-6
BULK_BYTES_PER_S = 390e9
EAGER_STEP_CONTROL_S = 362e-6

# Inter-node crossing: NOT MEASURED here. Assumed = the intra-node NCCL round trip captured in
# a CUDA graph (docs/DESIGN.md section 5: 47 / 50 / 58 / 75 us at 1 / 16 / 64 / 256 tokens x
# 4096 bf16) + 2 x 5 us of network latency + both directions' bytes at 50 GB/s (one 400 Gb/s
# NIC per GPU, a typical H200 node; not a figure of ours).
NCCL_GRAPH_US = {1: 47.0, 16: 50.0, 64: 58.0, 256: 75.0}
NCCL_HIDDEN = 4096
INTER_NODE_LATENCY_S = 5e-6
INTER_NODE_BYTES_PER_S = 50e9


def _read(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text())


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of one model (from a plan's ModelInfo)."""

    name: str
    arch: str
    layers: int
    moe_layers: int
    hidden: int
    heads: int
    head_dim: int
    experts: int
    top_k: int
    attn_bytes: int  # read per step: attention, norms, router, lm_head (or tied embedding)
    expert_layer_bytes: int  # one routed expert in one layer
    always_ffn_bytes: int  # shared experts + dense MLP layers, all layers
    kv_bytes_per_token: int  # over all layers, whole (before any TP split)
    active_params: int

    @staticmethod
    def from_info(info) -> Shape:
        w = info.weights
        lm = int(w.lm_head) or int(w.embedding)
        attn = int(w.attention) + int(w.norms) + int(w.router) + lm
        per_layer = int(w.expert_bytes) // max(info.moe_layers, 1)
        return Shape(info.name, info.model_type, info.num_layers, info.moe_layers,
                     info.hidden_size, info.num_heads, info.head_dim, info.num_experts,
                     info.top_k, attn, per_layer,
                     int(w.shared_experts) + int(w.dense_mlp), int(info.kv_bytes_per_token),
                     int(w.params_active))

    def ffn_bytes(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        e, k = self.experts, self.top_k
        distinct = e * (1 - (1 - k / e) ** tokens) if e else 0.0
        return self.moe_layers * distinct * self.expert_layer_bytes + self.always_ffn_bytes


@dataclass(frozen=True)
class StepBatch:
    """One step's work for the cost model: per sequence, tokens computed and context after."""

    tokens: tuple[int, ...]
    contexts: tuple[int, ...]

    @property
    def decode_only(self) -> bool:
        return all(t == 1 for t in self.tokens)


@dataclass(frozen=True)
class Placement:
    """Where a model's step runs: TP degree of its attention; crosspool's FFN servers."""

    tp: int = 1
    crosspool: bool = False
    ffn_servers: int = 1
    inter_node: bool = False


class CostModel:
    """Step times from the fitted coefficients (see the module docstring)."""

    def __init__(self, graph_max_bs: int = 64, prefill_flops_per_s: float = PREFILL_FLOPS_PER_S,
                 crosspool_eager_factor: float = 1.0, step_overhead_s: float = STEP_OVERHEAD_S,
                 attention_share: float = ATTENTION_SHARE):
        self.graph_max_bs = graph_max_bs
        self.attention_share = attention_share
        self.prefill_rate = prefill_flops_per_s
        self.step_overhead_s = step_overhead_s
        self.crosspool_eager_factor = crosspool_eager_factor
        self.fit = fit_decode()
        self.cross = fit_crossing()
        self.eager = eager_per_layer()
        vmm = _read(VMM_FILE)["kv_pool"]["reserve 96"]
        ppb = _read(VMM_FILE)["pages_per_block"]
        self.map_s = vmm["alloc_blocks"]["median_us"] / ppb * 1e-6
        self.unmap_s = vmm["free_blocks"]["median_us"] / ppb * 1e-6

    # -- pieces -------------------------------------------------------------------------------

    def graphed(self, s: Shape, b: StepBatch, p: Placement) -> float:
        a, inv_w, inv_kv = self.fit["a_s"], 1 / self.fit["bw_w"], 1 / self.fit["bw_kv"]
        n = sum(b.tokens)
        kv = sum(b.contexts) * s.kv_bytes_per_token
        ffn = s.ffn_bytes(n) / (p.ffn_servers if p.crosspool else p.tp)
        return s.layers * a + (s.attn_bytes / p.tp + ffn) * inv_w + kv / p.tp * inv_kv

    def sides(self, s: Shape, b: StepBatch, p: Placement) -> tuple[float, float, float]:
        """Per layer, a graphed crosspool decode step's (attention side, FFN side, crossing);
        L times their sum is `graphed` + the crossing."""
        a, inv_w, inv_kv = self.fit["a_s"], 1 / self.fit["bw_w"], 1 / self.fit["bw_kv"]
        kv = sum(b.contexts) * s.kv_bytes_per_token
        att = s.layers * a * self.attention_share + s.attn_bytes / p.tp * inv_w + \
            kv / p.tp * inv_kv
        ffn = s.layers * a * (1 - self.attention_share) + \
            s.ffn_bytes(sum(b.tokens)) / p.ffn_servers * inv_w
        cross = self.crossing(s, b, p, eager=False)
        return att / s.layers, ffn / s.layers, cross / s.layers

    def pair_fits(self, a: StepBatch, b: StepBatch) -> bool:
        """Whether two models' batches run as one pair graph (engine/pair_graphs.fits)."""
        return a.decode_only and b.decode_only and \
            max(len(a.tokens), len(b.tokens)) <= min(PAIR_GRAPH_MAX_BS, self.graph_max_bs)

    def pair_step(self, sa: Shape, a: StepBatch, pa: Placement, sb: Shape, b: StepBatch,
                  pb: Placement) -> float:
        """Two models' decode batches in one pair graph, layer by layer in the pipeline order:
        per layer the cycle is the longest of the attention GPU's work (both attentions), the
        weights pool's (both FFNs) and each model's own chain (attention, crossing, FFN);
        layers only the deeper model has run alone. Both batches pad to one bucket."""
        bucket = _bucket(max(len(a.tokens), len(b.tokens)), self.graph_max_bs)
        ya = self.sides(sa, _pad(a, bucket), pa)
        yb = self.sides(sb, _pad(b, bucket), pb)
        both = min(sa.layers, sb.layers)
        cycle = max(ya[0] + yb[0], ya[1] + yb[1], sum(ya), sum(yb))
        deeper = ya if sa.layers > sb.layers else yb
        return both * cycle + (max(sa.layers, sb.layers) - both) * sum(deeper) + \
            self.step_overhead_s

    def flops(self, s: Shape, b: StepBatch) -> float:
        """Matmul FLOPs of the active weights plus causal attention over each chunk."""
        dense = 2.0 * s.active_params * sum(b.tokens)
        attn = 0.0
        for t, ctx in zip(b.tokens, b.contexts):
            attn += 4.0 * s.layers * s.heads * s.head_dim * t * (ctx - t / 2)
        return dense + attn

    def crossing(self, s: Shape, b: StepBatch, p: Placement, eager: bool) -> float:
        n = sum(b.tokens)
        nbytes = n * s.hidden * 2
        if p.inter_node:
            per_layer = inter_node_crossing(n, s.hidden)
        elif eager:
            per_layer = 2 * EAGER_LAUNCH_S + 2 * nbytes / BULK_BYTES_PER_S
        else:
            per_layer = self.cross["x0_s"] + self.cross["x1_s_per_byte"] * nbytes
        step = s.layers * per_layer
        if eager and not p.inter_node:
            step += EAGER_STEP_CONTROL_S
        return step

    # -- the step -----------------------------------------------------------------------------

    def step(self, s: Shape, b: StepBatch, p: Placement) -> float:
        graph = b.decode_only and len(b.tokens) <= self.graph_max_bs
        if graph:
            t = self.graphed(s, _pad(b, _bucket(len(b.tokens), self.graph_max_bs)), p)
        else:
            gpu = self.graphed(s, b, p) + self.flops(s, b) / p.tp / self.prefill_rate
            t = max(s.layers * self.eager[_family(s.arch)], gpu)
        if p.crosspool:
            t += self.crossing(s, b, p, eager=not graph)
            if not graph:
                t *= self.crosspool_eager_factor
        return t + self.step_overhead_s

    def vmm(self, mapped_pages: int, unmapped_pages: int) -> float:
        return mapped_pages * self.map_s + unmapped_pages * self.unmap_s

    def coefficients(self) -> dict:
        return {
            "decode_fit": self.fit,
            "crossing_fit": self.cross,
            "eager_s_per_layer": {k: {"value": v, "source": src}
                                  for k, (v, src) in eager_sources().items()},
            "prefill_flops_per_s": {"value": self.prefill_rate, "source": PREFILL_SOURCE},
            "step_overhead_s": {"value": self.step_overhead_s, "source": STEP_OVERHEAD_SOURCE},
            "attention_share": {"value": self.attention_share,
                                "source": ATTENTION_SHARE_SOURCE},
            "vmm_map_s_per_page": {"value": self.map_s, "source": f"{VMM_FILE}: kv_pool "
                                   "'reserve 96' alloc_blocks median / pages_per_block"},
            "vmm_unmap_s_per_page": {"value": self.unmap_s, "source": f"{VMM_FILE}: kv_pool "
                                     "'reserve 96' free_blocks median / pages_per_block"},
            "eager_crossing": {"launch_s": EAGER_LAUNCH_S, "bulk_bytes_per_s": BULK_BYTES_PER_S,
                               "step_control_s": EAGER_STEP_CONTROL_S,
                               "source": "docs/DESIGN.md section 5; p2p-2xh200/README.md "
                               "(p2p eager, 1-layer step)"},
            "inter_node_crossing": {"nccl_graph_us": NCCL_GRAPH_US,
                                    "latency_s": INTER_NODE_LATENCY_S,
                                    "bytes_per_s": INTER_NODE_BYTES_PER_S,
                                    "source": "ASSUMED: docs/DESIGN.md section 5 intra-node "
                                    "NCCL captured round trip + 400 Gb/s NIC; not measured"},
            "graph_max_bs": self.graph_max_bs,
            "crosspool_eager_factor": self.crosspool_eager_factor,
        }


def _bucket(n: int, max_bs: int) -> int:
    """The CUDA-graph bucket a decode batch of n runs in (engine/cuda_graph.graph_buckets)."""
    sizes = [b for b in (1, 2, 4) if b < max_bs]
    b = 8
    while b < max_bs:
        sizes.append(b)
        b += 8 if b < 64 else 16
    sizes.append(max_bs)
    return next(s for s in sizes if s >= n)


def _pad(b: StepBatch, bucket: int) -> StepBatch:
    """A decode batch padded to its graph bucket (padding rows read no KV)."""
    extra = bucket - len(b.tokens)
    return StepBatch(b.tokens + (1,) * extra, b.contexts + (0,) * extra)


def _family(arch: str) -> str:
    return arch if arch in EAGER_FILES or arch.startswith("deepseek") else "other"


def inter_node_crossing(tokens: int, hidden: int) -> float:
    """Assumed per-layer round trip between nodes (see the constants above)."""
    xs = sorted(NCCL_GRAPH_US)
    t = min(max(tokens, xs[0]), xs[-1])
    lo = max(x for x in xs if x <= t)
    hi = min(x for x in xs if x >= t)
    base = NCCL_GRAPH_US[lo] if hi == lo else NCCL_GRAPH_US[lo] + (
        NCCL_GRAPH_US[hi] - NCCL_GRAPH_US[lo]) * (t - lo) / (hi - lo)
    # the table is for hidden 4096 at <= 256 tokens; beyond, bytes at the NIC rate dominate
    nbytes = tokens * hidden * 2
    return base * 1e-6 + 2 * INTER_NODE_LATENCY_S + 2 * nbytes / INTER_NODE_BYTES_PER_S


# -- fits ---------------------------------------------------------------------------------------


def shapes_from_configs() -> dict[str, Shape]:
    """The measured shapes, built by the planner from tests/data/model-configs."""
    from sglang_crosspool.planner import build_plan

    root = Path(__file__).resolve().parent.parent / "tests" / "data" / "model-configs"
    names = {"qwen3_moe": "Qwen3-30B-A3B", "qwen2_moe": "Qwen1.5-MoE-A2.7B",
             "olmoe": "OLMoE-1B-7B-0924", "mixtral": "Mixtral-8x7B-v0.1"}
    plan = build_plan([root / n for n in names.values()], 1, 10**15, served_names=list(names))
    return {m.name: Shape.from_info(m) for m in plan.models}


def _cells(arch: str, mode: str) -> list[tuple[int, int, float]]:
    d = _read(DECODE_FILES[arch])
    out = []
    for s in d["shapes"]:
        for c in s["modes"][mode]["cells"]:
            out.append((c["batch"], c["ctx"], c["ms_per_token"] * 1e-3))
    return out


def _solve3(m: list[list[float]], v: list[float]) -> list[float]:
    """Gaussian elimination for a 3x3 system."""
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for i in range(3):
        p = max(range(i, 3), key=lambda r: abs(a[r][i]))
        a[i], a[p] = a[p], a[i]
        for r in range(3):
            if r != i:
                f = a[r][i] / a[i][i]
                a[r] = [x - f * y for x, y in zip(a[r], a[i])]
    return [a[i][3] / a[i][i] for i in range(3)]


def fit_decode() -> dict:
    """a, BW_w, BW_kv by least squares on relative error over the monolithic cells."""
    shapes = shapes_from_configs()
    rows = []
    for arch in DECODE_FILES:
        s = shapes[arch]
        for batch, ctx, t in _cells(arch, "monolithic"):
            x = (s.layers, s.attn_bytes + s.ffn_bytes(batch), batch * ctx * s.kv_bytes_per_token)
            rows.append((arch, batch, ctx, t, x))
    ata = [[0.0] * 3 for _ in range(3)]
    atb = [0.0] * 3
    for _, _, _, t, x in rows:
        w = [xi / t for xi in x]  # relative error: divide the row by the measured time
        for i in range(3):
            atb[i] += w[i]
            for j in range(3):
                ata[i][j] += w[i] * w[j]
    a, inv_w, inv_kv = _solve3(ata, atb)
    cells = []
    for arch, batch, ctx, t, x in rows:
        pred = a * x[0] + inv_w * x[1] + inv_kv * x[2]
        cells.append({"arch": arch, "batch": batch, "ctx": ctx, "measured_ms": t * 1e3,
                      "fitted_ms": round(pred * 1e3, 3), "error": round(pred / t - 1, 4)})
    return {"a_s": a, "bw_w": 1 / inv_w, "bw_kv": 1 / inv_kv, "cells": cells,
            "source": "least squares (relative error) on the 'monolithic' cells of "
            + ", ".join(DECODE_FILES.values())}


def fit_crossing() -> dict:
    """Per-layer crossing x(n) = x0 + x1 * bytes, from (p2p-mb1 - monolithic) / layers."""
    shapes = shapes_from_configs()
    pts = []
    for arch in DECODE_FILES:
        s = shapes[arch]
        mono = {(b, c): t for b, c, t in _cells(arch, "monolithic")}
        for b, c, t in _cells(arch, "p2p-mb1"):
            pts.append((b * s.hidden * 2, (t - mono[(b, c)]) / s.layers))
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    x1 = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    x1 = max(x1, 0.0)
    x0 = my - x1 * mx
    probe = {c["tokens"]: c["median_us"] for c in _read(CROSSING_FILE)["crossings"]
             if c["transport"] == "p2p"}
    return {"x0_s": x0, "x1_s_per_byte": x1, "points": len(pts),
            "source": "least squares on (p2p-mb1 - monolithic) / layers, cells of "
            + ", ".join(DECODE_FILES.values()),
            "probe_p2p_single_us_hidden4096": probe}


def eager_sources() -> dict[str, tuple[float, str]]:
    out = {}
    for arch, rel in EAGER_FILES.items():
        d = _read(rel)
        shape = d["shapes"][0]
        cell = next(c for c in shape["backends"]["triton"]["steps"]
                    if c["batch"] == 1 and c["ctx"] == 1024)
        out[arch] = (cell["eager_ms"] * 1e-3 / shape["layers"],
                     f"{rel}: triton eager_ms at batch 1, ctx 1024 / {shape['layers']} layers")
    mla = _read(MLA_FILE)["sections"]
    layers = mla["engine_build"]["layers"]
    out["deepseek"] = (mla["engine_decode_step"]["1024"]["eager"]["ms"] * 1e-3 / layers,
                       f"{MLA_FILE}: engine_decode_step 1024 eager ms / {layers} layers")
    others = [v for k, (v, _) in out.items() if k != "deepseek"]
    out["other"] = (sum(others) / len(others),
                    "mean of the three GQA shapes (Mixtral: no eager measurement)")
    return out


def eager_per_layer() -> dict[str, float]:
    return {k: v for k, (v, _) in eager_sources().items()}


def mla_check(model: CostModel) -> list[dict] | None:
    """Out-of-sample check of the decode form on DeepSeek-V2-Lite (mla-h200), when the planner
    can build its shape; None where it refuses MLA."""
    from sglang_crosspool.planner import PlanError, build_plan

    root = Path(__file__).resolve().parent.parent / "tests" / "data" / "model-configs"
    try:
        plan = build_plan([root / "DeepSeek-V2-Lite"], 1, 10**15, served_names=["dsv2"])
    except PlanError:
        return None
    s = Shape.from_info(plan.models[0])
    steps = _read(MLA_FILE)["sections"]["engine_decode_step"]
    out = []
    for ctx in ("1024", "32768", "131072"):
        t = steps[ctx]["graph"]["ms"] * 1e-3
        pred = model.step(s, StepBatch((1,), (int(ctx),)), Placement())
        out.append({"ctx": int(ctx), "measured_ms": t * 1e3, "predicted_ms": pred * 1e3,
                    "error": pred / t - 1})
    return out
