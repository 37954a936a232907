"""The plan as text for people: tables first, then the arithmetic behind every figure.

In: a `Plan`. Out: one string (the CLI prints it).
"""

from __future__ import annotations

from sglang_crosspool.planner.figure import Figure, gb, num
from sglang_crosspool.planner.schema import MODES, ModelInfo, ModePlan, Placement, Plan


def render(plan: Plan, arithmetic: bool = True) -> str:
    """The whole plan; `arithmetic=False` keeps the tables and drops the derivations."""
    out: list[str] = []
    i = plan.inputs
    out.append(f"CrossPool plan: {len(plan.models)} model(s) on {i.devices} x "
               f"{num(i.device_memory_bytes)} B devices, {i.dtype} weights and KV, "
               f"{num(i.page_bytes)} B KV pages")
    out.append(f"usable per device: {i.usable_bytes.how}")
    out.append(f"monolithic layout: {i.monolithic_layout}")
    out.append("models are listed in priority order: where not all fit, earlier ones are kept")
    out += ["", "== models =="]
    for m in plan.models:
        out += _model(m) if arithmetic else _model(m)[:3] + _model(m)[-1:]
    out += ["", ("== summary: longest context one request can reach (tokens; memory bound, "
            "then capped by max_position_embeddings) ==")]
    out += _summary(plan)
    for mode in MODES:
        out += ["", f"== {mode} =="]
        out += _mode(plan.mode(mode), plan, arithmetic)
    return "\n".join(out) + "\n"


def _model(m: ModelInfo) -> list[str]:
    w, t = m.weights, m.traffic
    shared = ", shared expert" if m.has_shared_expert else ""
    dense = f", {m.dense_layers} dense layers" if m.dense_layers else ""
    return [
        f"{m.name} ({m.model_type}, {m.path})",
        (f"  shape: {m.num_layers} layers, {m.num_heads} heads / {m.num_kv_heads} kv_heads x "
        f"{m.head_dim}, {m.num_experts} experts top-{m.top_k}{shared}{dense}, "
        f"max_position_embeddings {num(m.max_position_embeddings)}"),
        (f"  traffic: {num(t.rate)} req/s, context mean {num(t.mean_context)} / max "
        f"{num(t.max_context)} tokens, max_running {t.max_running}"),
        f"  params: {w.params_total.how}; active per token: {w.params_active.how}",
        f"  attention side {gb(int(w.attention_side))}: {w.attention_side.how}",
        f"    embedding: {w.embedding.how}",
        f"    lm_head: {w.lm_head.how}",
        f"    attention: {w.attention.how}",
        f"    norms: {w.norms.how}",
        f"    router: {w.router.how}",
        f"  FFN side {gb(int(w.ffn_side))}: {w.ffn_side.how}",
        f"    routed experts: {w.routed_experts.how}",
        f"    one expert (all layers): {w.expert_bytes.how}",
        f"    shared experts: {w.shared_experts.how}",
        f"    dense MLP: {w.dense_mlp.how}",
        f"  total {gb(int(w.total))}: {w.total.how}",
        f"  KV per token: {m.kv_bytes_per_token.how}",
    ]


def _summary(plan: Plan) -> list[str]:
    rows = [["model", *MODES]]
    for m in plan.models:
        row = [m.name]
        for mode in MODES:
            kv = plan.mode(mode).model(m.name)
            row.append(f"{num(int(kv.longest_context))} -> {num(int(kv.longest_served))}"
                       if kv.fits else "does not fit")
        rows.append(row)
    rows.append(["KV tokens in all", *(f"{num(int(plan.mode(x).total_kv_tokens))}"
                                        for x in MODES)])
    rows.append(["KV bytes in all", *(gb(int(plan.mode(x).total_kv_bytes)) for x in MODES)])
    return _table(rows)


def _mode(mp: ModePlan, plan: Plan, arithmetic: bool) -> list[str]:
    out = [f"serves: {', '.join(mp.served) or 'nothing'}"]
    out += [f"note: {n}" for n in mp.notes]
    if mp.split:
        out.append(f"split: {mp.split}")
    if mp.devices:
        rows = [["device", "role", "weights", "KV pool", "KV pages", "idle", "holds"]]
        for d in mp.devices:
            rows.append([str(d.index), d.role, gb(int(d.weights_bytes)), gb(int(d.kv_bytes)),
                         num(int(d.kv_pages)), gb(int(d.idle_bytes)), ", ".join(d.holds)])
        out += _table(rows)
    rows = [["model", "devices", "attention", "tokens/block", "longest", "served",
             "tokens alone", "requests at mean"]]
    for kv in mp.models:
        if not kv.fits:
            rows.append([kv.name, "-", "does not fit", "", "", "", "", ""])
            continue
        shape = "+".join(f"TP{t}" for t in kv.parallel.replicas)
        rows.append([kv.name, _ids(kv.devices), shape, num(int(kv.block_tokens)),
                     num(int(kv.longest_context)), num(int(kv.longest_served)),
                     num(int(kv.tokens_alone)), num(int(kv.requests_at_mean))])
    out += _table(rows)
    if mp.placement:
        out += _placement(mp.placement, arithmetic)
    for kv in mp.models:
        if kv.fits and not kv.reaches_max_context:
            max_ctx = plan.model(kv.name).traffic.max_context
            out.append(f"WARNING: {kv.name} cannot reach its max_context {num(max_ctx)}")
    if not arithmetic:
        return out
    out.append("arithmetic:")
    for d in mp.devices:
        out.append(f"  device {d.index} weights: {d.weights_bytes.how}")
        out.append(f"  device {d.index} KV pages: {d.kv_pages.how}")
        out.append(f"  device {d.index} idle: {d.idle_bytes.how}")
    for kv in mp.models:
        if not kv.fits:
            out.append(f"  {kv.name}: does not fit: {kv.reason}")
            continue
        out.append(f"  {kv.name} parallelism: {kv.parallel.how}")
        if kv.parallel.waste_note:
            out.append(f"  {kv.name} why not one TP group: {kv.parallel.waste_note}")
        for label, fig in (("tokens per block", kv.block_tokens),
                           ("pages per block", kv.pages_per_block),
                           ("KV pages one request can map", kv.kv_pages),
                           ("longest context", kv.longest_context),
                           ("served", kv.longest_served),
                           ("tokens if alone", kv.tokens_alone),
                           ("requests at mean context", kv.requests_at_mean),
                           ("virtual reservation", kv.virtual_pages)):
            out.append(f"  {kv.name} {label}: {_how(fig)}")
    out.append(f"  KV bytes in all: {mp.total_kv_bytes.how}")
    out.append(f"  KV tokens in all: {mp.total_kv_tokens.how}")
    return out


def _placement(p: Placement, arithmetic: bool) -> list[str]:
    out = [f"expert placement: {p.how}"]
    rows = [["server", "device", "FFN bytes", "load", "items"]]
    for s in p.servers:
        rows.append([str(s.server), str(s.device), gb(int(s.bytes)), num(s.load.value),
                     str(s.items)])
    out += _table(rows)
    for m in p.models:
        parts = [f"server {s}: {_ids(e) or '-'}" for s, e in enumerate(m.experts)]
        if m.shared_server is not None:
            parts.append(f"shared expert on server {m.shared_server}")
        if m.dense_server is not None:
            parts.append(f"dense MLPs on server {m.dense_server}")
        out.append(f"  {m.name} experts: {'; '.join(parts)}")
    for s in p.servers if arithmetic else ():
        out.append(f"  server {s.server} bytes: {s.bytes.how}")
        out.append(f"  server {s.server} load: {s.load.how}")
    return out


def _ids(ids) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2,5,7-8'."""
    ids = sorted(ids)
    runs, start = [], None
    for k, v in enumerate(ids):
        if start is None:
            start = v
        if k + 1 == len(ids) or ids[k + 1] != v + 1:
            runs.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(runs)


def _how(fig: Figure | None) -> str:
    return fig.how if fig is not None else "-"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
