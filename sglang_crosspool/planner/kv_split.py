"""KV per request under KV-head-limited attention: replicated TP against a head split and a
sequence split (issue 16's planner table).

In: models' config.json files, device counts, the memory of one device, mem_fraction_static
and the dtype. Out: per model and device count G, the KV one request can use and the KV of
all requests together, for each way of running its attention over the G devices, as Figures
that carry their arithmetic, printed as tables (and JSON with --json). Pure Python.

Every option shards the model's weights evenly over the G devices (W / G each: attention TP
and experts split by expert), so the options differ only in where the KV goes. With F the
memory a device has left for KV and kv the model's KV heads (1 for MLA: its latent is one
"head" that every rank needs whole):
- replicated TP G: every rank holds ceil(kv / G) heads; with G > kv each head is kept on
  G / kv devices, so one request (and all of them together) can use min(G, kv) x F;
- replicas of TP t = min(G, kv) (data parallel): no replication, but each replica holds W / t
  of the weights per device and a request's KV stays on its replica: t x (usable - W / t);
- head split: the KV heads divided over min(G, kv) devices, no replication: one request
  uses min(G, kv) x F, and the devices beyond kv hold other requests' heads (total G x F);
- sequence split: a request's KV pages spread over all G devices, partials merged by
  log-sum-exp: one request can use G x F.
Tokens are bytes over the KV of one token (all layers, all heads); the longest request is
also capped by max_position_embeddings, which the table shows separately.

Weights come from `planner.weights` where it knows the architecture; MLA models (DeepSeek-V2,
-V3), which it refuses, are counted here from their config (`mla_weights`).

    python -m sglang_crosspool.plan kv-split --model-path A --model-path B --devices 2 \
        --devices 8 --device-memory 141GB
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from sglang_crosspool.models.config import CheckpointError, ModelSpec, load_spec
from sglang_crosspool.planner.errors import PlanError
from sglang_crosspool.planner.figure import Figure, gb, num, parse_size, product, size, total
from sglang_crosspool.planner.plan import DEFAULT_MEM_FRACTION
from sglang_crosspool.planner.weights import DTYPE_BYTES, model_weights

OPTIONS = ("replicated_tp", "dp_replicas", "head_split", "sequence_split")
TITLES = {"replicated_tp": "replicated TP G", "dp_replicas": "replicas of TP min(G,kv)",
          "head_split": "head split", "sequence_split": "sequence split"}


def mla_weights(spec: ModelSpec, dtype: str) -> Figure:
    """Every weight of an MLA model (DeepSeek-V2/V3 layout), from its config."""
    m, b = spec.mla, DTYPE_BYTES[dtype]
    h, L, a, v = spec.hidden_size, spec.num_layers, spec.num_heads, spec.vocab_size
    n_moe = sum(spec.moe_layers)
    q_out = a * m.qk_head_dim
    if m.q_lora_rank is None:
        q, q_how = h * q_out, f"q {num(h)}x{num(q_out)}"
    else:
        r = m.q_lora_rank
        q = h * r + r + r * q_out
        q_how = f"q {num(h)}x{num(r)} + {num(r)} norm + {num(r)}x{num(q_out)}"
    kv_b = a * (m.qk_nope_head_dim + m.v_head_dim)
    kv = h * m.latent_dim + m.kv_lora_rank + m.kv_lora_rank * kv_b
    kv_how = (f"kv_a {num(h)}x{num(m.latent_dim)} + {num(m.kv_lora_rank)} norm + kv_b "
              f"{num(m.kv_lora_rank)}x{num(kv_b)}")
    o = a * m.v_head_dim * h
    biases = (m.q_lora_rank or 0) + m.latent_dim + h if spec.attention_bias else 0
    per_layer = q + kv + o + 2 * h + biases
    bias_how = f" + {num(biases)} biases" if biases else ""
    attention = Figure(per_layer * L * b, f"{L} layers x ({q_how} + {kv_how} + o "
                       f"{num(a * m.v_head_dim)}x{num(h)} + 2x{num(h)} norms{bias_how} = "
                       f"{num(per_layer)} params) x {b} B = {size(per_layer * L * b)}")
    bias = n_moe * spec.num_experts if spec.router.topk_method == "noaux_tc" else 0
    router = Figure((n_moe * spec.num_experts * h) * b + 4 * bias,
                    f"{n_moe} MoE layers x {spec.num_experts} experts x {num(h)} hidden x {b} B"
                    + (f" + {num(bias)} float32 score biases x 4 B" if bias else "")
                    + f" = {size(n_moe * spec.num_experts * h * b + 4 * bias)}")
    embed = product((v, "vocab"), (h, "hidden"), (b, "B"))
    head = Figure(0, "tied: 0 B") if spec.tie_word_embeddings else embed
    final_norm = product((h, "final norm"), (b, "B"))
    i = spec.moe_intermediate_size
    routed = product((n_moe, "MoE layers"), (spec.num_experts, "experts"), (3, "(gate,up,down)"),
                     (h, "hidden"), (i, "moe_intermediate"), (b, "B"))
    shared = product((n_moe, "MoE layers"), (3, "(gate,up,down)"), (h, "hidden"),
                     (spec.shared_expert_intermediate_size, "shared_intermediate"), (b, "B"))
    dense = product((L - n_moe, "dense layers"), (3, "(gate,up,down)"), (h, "hidden"),
                    (spec.dense_intermediate_size, "intermediate"), (b, "B"))
    return total([("embedding", embed), ("lm_head", head), ("attention", attention),
                  ("final norm", final_norm), ("router", router), ("routed", routed),
                  ("shared", shared), ("dense", dense)])


def weights_total(spec: ModelSpec, dtype: str, name: str) -> Figure:
    if spec.mla is not None:
        return mla_weights(spec, dtype)
    return model_weights(spec, dtype, name).total


def kv_per_token(spec: ModelSpec, dtype: str) -> Figure:
    b = DTYPE_BYTES[dtype]
    if spec.kv_latent:
        fig = product((spec.num_layers, "layers"),
                      (spec.head_dim, "latent (kv_lora_rank + rope)"), (b, "B"))
    else:
        fig = product((2, "(K,V)"), (spec.num_layers, "layers"), (spec.num_kv_heads, "kv_heads"),
                      (spec.head_dim, "head_dim"), (b, "B"))
    assert fig.value == spec.kv_bytes_per_token(dtype)  # the engine's own formula
    return Figure(fig.value, fig.how + " per token")


@dataclass(frozen=True)
class Option:
    per_request_bytes: Figure
    per_request_tokens: Figure
    total_bytes: Figure
    fraction: Figure  # per-request bytes / the G devices' KV memory


@dataclass(frozen=True)
class SplitRow:
    model: str
    model_type: str
    devices: int
    mla: bool
    kv_heads: int  # 1 for MLA
    kv_heads_how: str
    weights: Figure
    usable: Figure
    free: Figure  # F: per device, weights sharded over all G
    kv_per_token: Figure
    max_position_embeddings: int
    options: dict[str, Option]
    # The engine's flags for each option it runs (None: not this way), see `launch_flags`.
    launch: dict[str, str | None] | None = None


def _option(label: str, bytes_fig: Figure, total_fig: Figure, pool: int, token: int) -> Option:
    tokens = bytes_fig.value // token if bytes_fig.value > 0 else 0
    return Option(
        bytes_fig,
        Figure(tokens, f"{num(max(bytes_fig.value, 0))} B / {num(token)} B per token = "
               f"{num(tokens)} tokens"),
        total_fig,
        Figure(round(max(bytes_fig.value, 0) / pool, 4) if pool > 0 else 0.0,
               f"{label}: {num(max(bytes_fig.value, 0))} B of the {num(pool)} B that the "
               f"devices have for KV"),
    )


def split_row(name: str, spec: ModelSpec, devices: int, device_memory: int,
              mem_fraction: float = DEFAULT_MEM_FRACTION, dtype: str = "bfloat16",
              other_weights: int = 0) -> SplitRow:
    """The four options for one model on `devices` devices (see the module docstring);
    `other_weights`: bytes per device already taken by other models' weights."""
    if devices < 1:
        raise PlanError(f"devices must be >= 1, got {devices}")
    g = devices
    kv = 1 if spec.kv_latent else spec.num_kv_heads
    kv_how = ("MLA: one latent per token that every attention rank needs whole, so 1"
              if spec.kv_latent else f"{kv} kv_heads")
    usable_value = int(device_memory * mem_fraction) - other_weights
    others = f" - {size(other_weights)} of other models' weights" if other_weights else ""
    usable = Figure(usable_value, f"{num(device_memory)} B x {mem_fraction}{others} = "
                    f"{size(usable_value)}")
    w = weights_total(spec, dtype, name)
    per_dev = -(-w.value // g)
    free_value = usable_value - per_dev
    free = Figure(free_value, f"{size(usable_value)} usable - {size(w.value)} weights / {g} "
                  f"devices = {size(free_value)}")
    token = kv_per_token(spec, dtype)
    f, h = max(free_value, 0), min(g, kv)
    pool = g * f

    repl = g / h
    tp_bytes = Figure(h * f, f"TP {g} over {kv_how}: {num(h)} distinct head group(s), each kept "
                      f"on {num(repl)} device(s): {g} x {num(f)} B / {num(repl)} = {size(h * f)}")
    t = h
    dp_free = usable_value - -(-w.value // t)
    dp_bytes = Figure(t * max(dp_free, 0),
                      f"TP {t} replicas: {t} x ({size(usable_value)} - {size(w.value)} / {t}) "
                      f"= {size(t * max(dp_free, 0))}"
                      + ("" if dp_free > 0 else " (the weights do not fit one replica)"))
    dp_total = Figure((g // t) * t * max(dp_free, 0), f"{g // t} replica(s) x "
                      f"{size(dp_bytes.value)} = {size((g // t) * t * max(dp_free, 0))}")
    head_bytes = Figure(h * f, f"{kv_how} over {h} of {g} devices: {h} x {num(f)} B = "
                        f"{size(h * f)}")
    seq_bytes = Figure(pool, f"all {g} devices: {g} x {num(f)} B = {size(pool)}")
    whole = Figure(pool, f"{g} x {num(f)} B = {size(pool)}")
    options = {
        "replicated_tp": _option("replicated TP", tp_bytes,
                                 Figure(h * f, f"one TP group: {size(h * f)}"), pool, token.value),
        "dp_replicas": _option("replicas", dp_bytes, dp_total, pool, token.value),
        "head_split": _option("head split", head_bytes, whole, pool, token.value),
        "sequence_split": _option("sequence split", seq_bytes, whole, pool, token.value),
    }
    return SplitRow(name, spec.model_type, g, spec.kv_latent, kv, kv_how, w, usable, free, token,
                    spec.max_position_embeddings, options, launch_flags(spec, g))


def launch_flags(spec: ModelSpec, devices: int) -> dict[str, str | None]:
    """How this engine runs each option on `devices` GPUs (None where it does not): replicated
    TP is --tp-size; a head split needs the KV heads divided evenly over min(G, kv) ranks (an
    MLA latent never is); the sequence split runs on any G. NOTE: the engine's sequence split
    keeps attention weights whole on every rank (experts divided), not W / G of everything."""
    kv = 1 if spec.kv_latent else spec.num_kv_heads
    h = min(devices, kv)
    head = (f"--attention-split head --attention-split-size {h}"
            if not spec.kv_latent and h > 1 and kv % h == 0 else None)
    return {"replicated_tp": f"--tp-size {devices}" if devices > 1 else None,
            "dp_replicas": None, "head_split": head,
            "sequence_split": (f"--attention-split seq --attention-split-size {devices}"
                               if devices > 1 else None)}


def render(rows: list[SplitRow], arithmetic: bool = True) -> str:
    out = []
    for g in sorted({r.devices for r in rows}):
        group = [r for r in rows if r.devices == g]
        out += [(f"== {g} devices: KV one request can use, tokens (share of the devices' KV "
                 "memory) =="), ""]
        out.append("| model | kv heads | weights | F per device | "
                   + " | ".join(TITLES[o] for o in OPTIONS) + " | max_position |")
        out.append("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in OPTIONS)
                   + " | ---: |")
        for r in group:
            cells = [f"{num(r.options[o].per_request_tokens.value)} "
                     f"({100 * r.options[o].fraction.value:.0f}%)"
                     if r.options[o].per_request_bytes.value > 0 else "weights do not fit"
                     for o in OPTIONS]
            heads = f"{r.kv_heads}{' (MLA)' if r.mla else ''}"
            out.append(f"| {r.model} | {heads} | {gb(r.weights.value)} | {gb(r.free.value)} | "
                       + " | ".join(cells) + f" | {num(r.max_position_embeddings)} |")
        out.append("")
        out.append("Shares are of the G devices' KV memory, G x F: what a request on this "
                   "deployment can reach of the KV capacity it pays for. A request is also capped "
                   "by max_position.")
        for r in group:
            flags = [f"{TITLES[o]} `{f}`" for o, f in (r.launch or {}).items() if f]
            if flags:
                out.append(f"Launch {r.model} here: " + "; ".join(flags) + ".")
        out += ["", f"KV of all requests together on {g} devices, tokens:", "",
                "| model | " + " | ".join(TITLES[o] for o in OPTIONS) + " |",
                "| --- | " + " | ".join("---:" for _ in OPTIONS) + " |"]
        for r in group:
            out.append(f"| {r.model} | " + " | ".join(
                num(max(r.options[o].total_bytes.value, 0) // r.kv_per_token.value)
                for o in OPTIONS) + " |")
        out.append("")
        if arithmetic:
            for r in group:
                out.append(f"{r.model} on {g} devices")
                out.append(f"  weights: {r.weights.how}")
                out.append(f"  usable per device: {r.usable.how}")
                out.append(f"  F, free per device with the weights sharded: {r.free.how}")
                out.append(f"  KV per token: {r.kv_per_token.how}")
                for o in OPTIONS:
                    opt = r.options[o]
                    out.append(f"  {TITLES[o]}: {opt.per_request_bytes.how}; "
                               f"{opt.per_request_tokens.how}; all requests: "
                               f"{opt.total_bytes.how}")
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def to_json(rows: list[SplitRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sglang_crosspool.plan kv-split",
        description="KV one request can use with replicated TP, data-parallel replicas, a head "
        "split and a sequence split of attention, from config.json files.")
    p.add_argument("--model-path", action="append", required=True,
                   help="checkpoint directory with config.json; repeat")
    p.add_argument("--devices", type=int, action="append", required=True,
                   help="device count; repeat for several tables")
    p.add_argument("--device-memory", required=True, help="memory of each device: 141GB, ...")
    p.add_argument("--mem-fraction-static", type=float, default=DEFAULT_MEM_FRACTION)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--other-weights", default="0",
                   help="memory per device already taken by other models' weights (a crowded "
                   "pool), e.g. 100GB; default 0: the model alone")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--brief", action="store_true", help="tables only, without the arithmetic")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        memory = parse_size(args.device_memory, "--device-memory")
        others = 0 if args.other_weights in ("0", "") else parse_size(args.other_weights,
                                                                       "--other-weights")
        rows = []
        for devices in args.devices:
            for path in args.model_path:
                spec = load_spec(path)
                name = path.rstrip("/").rsplit("/", 1)[-1]
                rows.append(split_row(name, spec, devices, memory, args.mem_fraction_static,
                                      args.dtype, others))
    except (PlanError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    crowd = f", {num(others)} B of other models' weights per device" if others else ""
    print(f"{'; '.join(args.model_path)} on {', '.join(map(str, args.devices))} x "
          f"{num(memory)} B devices, mem_fraction_static {args.mem_fraction_static}, "
          f"{args.dtype}{crowd}\n")
    print(to_json(rows) if args.json else render(rows, arithmetic=not args.brief), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
