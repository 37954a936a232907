"""Tensor and expert parallelism on 2 GPUs against one (issue 21): decode ms per step at batch
1, 16 and 64 for TP 1, TP 2 and EP 2, and what the collectives cost.

    python benchmark/tp_gpu_bench.py --out /tmp/tp.json                         # 2 x H200
    python benchmark/tp_gpu_bench.py --model-config tests/data/model-configs/OLMoE-1B-7B-0924 \
        --layers 16 --out /tmp/tp-olmoe.json
    python benchmark/tp_gpu_bench.py --device cpu --out /tmp/tp-cpu.json        # tiny, CPU

One command, standalone (it puts the repository's packages on sys.path itself, no torchrun).
Each mode runs in fresh processes, one per rank (rank r on cuda:r; NCCL between them, gloo on
CPU), spawned by this script:
- `tp1`: the whole model on GPU 0;
- `tp2`: attention heads, dense weights and every expert's intermediate rows split over
  --ranks GPUs, two all-reduces per layer (o_proj, FFN);
- `ep2`: attention as tp2, experts sliced over the ranks (each whole), the FFN's partial sums
  combined by the same all-reduce.
Every rank builds its own shard from config.json (random bf16 weights, `load_format dummy`,
made on its GPU) with the engine's own code (engine/tensor_parallel.py: load_shard,
make_kv_pool, make_runner), fills B sequences of --ctx tokens of KV with random values in its
own pool (the same blocks on every rank) and runs the decode step in lockstep, eagerly. A mode
written `NAME+graph` (e.g. tp2+graph) instead captures the step as a CUDA graph on every rank
(engine/cuda_graph.DecodeGraphs, the NCCL all-reduces inside the graph) and replays it: the
engine does not capture graphs under TP yet, and this is the measurement that says whether it
should (and that capture works). The graph modes run after every eager mode, so that a failed
capture loses nothing else. Reported per mode and batch, from rank 0's CUDA events:
- `step_ms`: one decode step of the model (ms per output token of each sequence);
- `all_reduce_us`: one all-reduce of the step's [B, hidden] hidden states, alone;
  `all_reduce_ms_per_step` = 2 x layers x that;
- `control_us`: broadcasting one step's metadata to the followers (what the engine's rank 0
  sends every step over gloo);
- `all_to_all_us`: one leg of an all-to-all dispatch of the step's top-k token copies (the
  alternative to the FFN's all-reduce that the engine does not implement; for comparison);
- last (`all_reduce_kinds`, CUDA, --no-symm-mem to skip): NCCL's all-reduce of [B, hidden]
  against torch's symmetric-memory one-shot and two-shot all-reduces (multicast off), with
  each one's difference from NCCL's sum or the error it raised;
- per rank: weight bytes held and KV bytes per token (with the replicated share).
The JSON is rewritten after every mode, so a run stopped midway keeps what it measured.
On CPU (--device cpu) a tiny checkpoint runs in float32 over gloo, to check the script
itself; its times mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark.gpu_env import setup_paths

setup_paths("cpu" if "cpu" in sys.argv else "cuda")

# NOTE: NVLink multicast stays off on shared machines (the ranks inherit this environment).
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                  NVSHMEM_DISABLE_NVLS="1")

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "tests/data/model-configs/Qwen3-30B-A3B")
DEFAULT_MODES = "tp1,tp2,ep2,tp1+graph,tp2+graph,ep2+graph"


def mode_sizes(name: str, ranks: int) -> tuple[int, int, bool]:
    """tpN / epN (+graph) (+symm) -> (tp_size, ep_size, graph); a bare tp / ep takes
    --ranks. `+symm`: the ranks' all-reduce through symmetric memory (--tp-all-reduce
    symm-mem; `mode_symm`)."""
    base, *suffixes = name.split("+")
    kind, digits = base[:2], base[2:]
    if kind not in ("tp", "ep") or not set(suffixes) <= {"graph", "symm"} or \
            (digits and not digits.isdigit()) or int(digits or ranks) < 1:
        raise SystemExit(f"--modes: {name!r} is not tpN or epN, optionally with +graph "
                         "and +symm")
    n, graph = int(digits or ranks), "graph" in suffixes
    return (n, 1, graph) if kind == "tp" else (n, n, graph)


def mode_symm(name: str) -> bool:
    return "symm" in name.split("+")[1:]


# -- one rank (a spawned process) -------------------------------------------------------------

def _rank(rank: int, world: int, init_method: str, config, args: dict) -> dict:
    import torch

    from sglang_crosspool.distributed import init_group
    from sglang_crosspool.engine.tensor_parallel import (
        TPFFNExecutor,
        add_kv,
        choose_all_reduce,
        load_shard,
        make_kv_pool,
        make_runner,
        rank_device,
    )
    from sglang_crosspool.models.parallel import ShardPlan

    device = rank_device(config, rank)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    group = init_group(rank, world, init_method, device, timeout_s=300)
    choose_all_reduce(config, group)
    out = {"rank": rank, "device": str(device),
           "symm_all_reduce": getattr(group, "_symm", None) is not None}
    try:
        entry = config.models[0]
        spec = entry.spec
        t0 = time.perf_counter()
        shard = ShardPlan(rank, config.tp_size, config.ep_size)
        attention, ffn_half = load_shard(config, entry, shard, group, device)
        ffn = TPFFNExecutor({entry.name: ffn_half}, device)
        if on_cuda and args["kv_gib"] == "auto":  # what the weights leave, less a margin
            free = torch.cuda.mem_get_info(device)[0] - int(args["margin_gib"] * 2**30)
            config = dataclasses.replace(config, kv_budget_bytes=max(free, 1 << 30))
        pool = make_kv_pool(config, device)
        add_kv(pool, config, entry, attention)
        runner = make_runner(config, entry, attention, pool, ffn)
        _sync(on_cuda)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["attention_bytes"] = attention.nbytes()
        out["ffn_bytes"] = ffn_half.nbytes()
        h = attention.heads
        per_token = spec.kv_bytes_per_token(config.dtype) * h.kv_heads // spec.num_kv_heads
        out["kv_bytes_per_token"] = per_token
        out["kv_replicas"] = h.kv_replicas
        out["heads"], out["kv_heads"] = h.heads, h.kv_heads
        kv = pool.models[entry.name]
        out["kv_pool_bytes"] = pool.total_pages * pool.page_bytes
        # Tokens of KV this rank's pool holds (every rank holds the same tokens).
        # (the model's virtual range, context x max running, may hold fewer: kv_tokens_virtual)
        out["kv_tokens_capacity"] = pool.total_pages // kv.pages_per_block * kv.block_tokens
        out["kv_tokens_virtual"] = kv.num_blocks * kv.block_tokens
        if on_cuda:
            out["memory_allocated_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
        rows = {}
        for batch in args["batches"]:
            rows[str(batch)] = _measure(runner, pool, config, batch, args, group)
            if rank == 0:
                print(f"  batch {batch}: {json.dumps(rows[str(batch)])}", flush=True)
        out["batches"] = rows
        return out
    finally:
        group.close()


def _measure(runner, pool, config, batch: int, args: dict, group) -> dict:
    """One batch size on this rank: B sequences of ctx tokens of random KV, then the timings."""
    import torch

    from sglang_crosspool.engine.cuda_graph import DecodeGraphs
    from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists

    entry = config.models[0]
    spec, name, device = entry.spec, entry.name, group.device
    on_cuda, world, ctx = device.type == "cuda", group.world_size, args["ctx"]
    bt = pool.block_tokens(name)
    kv = pool.models[name]
    blocks = []
    for _ in range(batch):
        got = pool.alloc_blocks(name, -(-ctx // bt))
        if got is None:
            for seq in blocks:
                pool.free_blocks(name, seq)
            return {"skipped": f"KV pool too small for {batch} x {ctx} (--kv-gib)"}
        blocks.append(got)
    try:
        gen = torch.Generator(device=device).manual_seed(group.rank)  # any values: timing only
        for cache in kv.k + ([] if kv.latent else kv.v):
            for seq in blocks:
                for b in seq:
                    cache[b * bt:(b + 1) * bt].normal_(0, 1, generator=gen)
        pos = ctx - 1
        lists = StepLists(
            ids=[(17 * i + 5) % spec.vocab_size for i in range(batch)], positions=[pos] * batch,
            slots=[seq[pos // bt] * bt + pos % bt for seq in blocks],
            q_starts=list(range(batch)), q_lens=[1] * batch, ctx_lens=[ctx] * batch,
            tables=blocks)
        rows_t = torch.arange(batch, device=device)

        def eager():
            fb = ForwardBatch.from_lists(lists, bt, device)
            if group.rank == 0 or runner.model.vocab_rows is not None:
                return runner.forward(fb, rows_t)  # as the engine: vocab-parallel logits
            runner.backend.prepare(fb)
            return runner.layers(fb)

        graphs, reference = None, None
        if args["graph"]:
            with torch.inference_mode():
                reference = eager()  # the graph's logits are checked against these
            if not runner.backend.supports_graphs:
                return {"skipped": f"{type(runner.backend).__name__} has no graph support"}
            # Every rank captures the same bucket at the same time (warm-up runs all-reduce).
            group.barrier()
            graphs = DecodeGraphs(runner, pool, [batch], max(len(t) for t in blocks),
                                  capture=on_cuda, pool=None)

        def step():
            if graphs is not None:
                return graphs.run(lists, list(range(batch)))
            return eager()

        with torch.inference_mode():
            for _ in range(args["warmup"]):
                last = step()
            finite = bool(torch.isfinite(last).all())
            diff = None
            if reference is not None and group.rank == 0:
                # NOTE: the step's K/V store rewrites the same slot each time: same inputs.
                diff = float((last.float() - reference.float()).abs().max())
            step_ms = _timed(step, args["iters"], on_cuda, group)
            x = torch.randn(batch, spec.hidden_size, device=device, dtype=config.torch_dtype)
            ar_us = ctl_us = a2a_us = 0.0
            if world > 1:
                a2a_us = 1e3 * _timed(_all_to_all(x, spec.top_k, world), args["iters"] * 4,
                                      on_cuda, group)
                ar_us = 1e3 * _timed(lambda: group.all_reduce(x), args["iters"] * 4, on_cuda,
                                     group)
                ctl_us = 1e3 * _timed(lambda: group.broadcast_object(lists), args["iters"],
                                      False, group)
    finally:
        for seq in blocks:
            pool.free_blocks(name, seq)
    if graphs is not None:
        del graphs
        if on_cuda:
            torch.cuda.empty_cache()
    return {"step_ms": round(step_ms, 4), "finite": finite, "graph_vs_eager_max_abs": diff,
            "all_reduce_us": round(ar_us, 2),
            "all_reduce_ms_per_step": round(2 * spec.num_layers * ar_us / 1e3, 4),
            "control_us": round(ctl_us, 2),
            # One leg of an all-to-all dispatch (each token's top-k copies spread evenly over
            # the ranks), for comparison: a dispatch + combine would pay two per MoE layer,
            # in place of the FFN's one all-reduce.
            "all_to_all_us": round(a2a_us, 2)}


def _all_reduce_kinds(rank: int, world: int, init_method: str, hidden: int,
                      batches: list[int], iters: int) -> dict:
    """Per batch: us per all-reduce of [B, hidden] bf16 by NCCL and by torch's symmetric
    memory (one-shot: every rank reads every peer's buffer; two-shot: reduce-scatter then
    all-gather through peer stores), each with its largest difference from NCCL's sum, or the
    error that kind raised here."""
    import torch

    from sglang_crosspool.distributed import init_group

    device = torch.device("cuda", rank)
    group = init_group(rank, world, init_method, device, timeout_s=300)
    out = {}
    try:
        for batch in batches:
            out[str(batch)] = _all_reduce_row(group, batch, hidden, iters)
            if rank == 0:
                print(f"  batch {batch}: {json.dumps(out[str(batch)])}", flush=True)
    except Exception as e:  # noqa: BLE001 - e.g. no symmetric memory in this torch
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        group.close()
    return out


def _all_reduce_row(group, batch: int, hidden: int, iters: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    device, name = group.device, dist.group.WORLD.group_name
    gen = torch.Generator(device=device).manual_seed(group.rank)
    x = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    want = group.all_reduce(x.clone())
    scratch = x.clone()  # summed in place again and again: timing only
    row = {"nccl_us": round(1e3 * _timed(lambda: group.all_reduce(scratch), iters * 4, True,
                                         group), 2)}
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch, else a no-op
        symm_mem.enable_symm_mem_for_group(name)
    buf = symm_mem.empty(batch, hidden, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(buf, name)
    kinds = {"one_shot": lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name),
             "two_shot": lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", name)}
    for kind, fn in kinds.items():
        try:
            buf.copy_(x)
            group.barrier()
            got = fn()
            torch.cuda.synchronize(device)
            row[f"{kind}_max_abs_diff"] = float((got.float() - want.float()).abs().max())
            row[f"{kind}_us"] = round(1e3 * _timed(fn, iters * 4, True, group), 2)
        except Exception as e:  # noqa: BLE001 - this torch or GPU lacks the kind
            row[f"{kind}_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def _all_to_all(x, top_k: int, world: int):
    """One all_to_all_single of the batch's top-k token copies ([B * top_k, hidden], in equal
    parts per rank; padded up to a multiple of the ranks)."""
    import torch
    import torch.distributed as dist

    rows = -(-x.shape[0] * top_k // world) * world
    send = torch.randn(rows, x.shape[1], device=x.device, dtype=x.dtype)
    recv = torch.empty_like(send)
    return lambda: dist.all_to_all_single(recv, send)


def _sync(on_cuda: bool) -> None:
    if on_cuda:
        import torch

        torch.cuda.synchronize()


def _timed(fn, n: int, on_cuda: bool, group) -> float:
    """Mean ms per call over n calls; every rank starts together (a barrier first)."""
    group.barrier()
    _sync(on_cuda)
    if on_cuda:
        from benchmark.gpu_env import cuda_ms

        return cuda_ms(fn, n)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


# -- driver -----------------------------------------------------------------------------------

def _model_dir(args, root: Path) -> str:
    """CPU: a tiny checkpoint (made with transformers). GPU: the config.json alone, its depth
    cut to --layers (only config.json is read: no transformers or tokenizer needed there)."""
    if args.device == "cpu":
        from sglang_crosspool.testing.checkpoints import make_model

        return str(make_model(root / "tiny", args.tiny_arch, size="tiny", seed=1))
    src = Path(args.model_config)
    if not (src / "config.json").is_file():
        raise SystemExit(f"--model-config: {src}/config.json not found")
    config = json.loads((src / "config.json").read_text())
    if args.layers:
        config["num_hidden_layers"] = args.layers
    out = root / src.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return str(out)


def _config(path: str, args, tp: int, ep: int):
    from sglang_crosspool.config import EngineConfig

    return EngineConfig.build(
        path, device="cpu" if args.device == "cpu" else "cuda:0",
        dtype="float32" if args.device == "cpu" else "bfloat16",
        load_format="auto" if args.device == "cpu" else "dummy",
        # room for one whole KV block per sequence at any TP (a block holds up to 4096 tokens
        # of a 2 MiB page here): the virtual range is context x max running
        context_length=args.ctx + 4096, max_running_requests=max(args.batches),
        kv_budget_bytes=int(float(8 if args.kv_gib == "auto" else args.kv_gib) * 2**30),
        disable_cuda_graph=True, kv_page_bytes=args.kv_page_bytes,
        moe_small_batch=args.moe_small_batch, attention_backend=args.attention_backend,
        tp_size=tp, ep_size=ep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON report path")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model-config", default=DEFAULT_CONFIG,
                   help="a folder with a real config.json (weights are random)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers kept (depth cut)")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma list of tpN / epN, each optionally +graph (a bare tp / ep: "
                        "--ranks ranks)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of tp2 / ep2 written as tp / ep")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--ctx", type=int, default=1024, help="tokens of KV per sequence")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kv-gib", default="8",
                   help="KV pool per rank in GiB, or auto: what the weights leave on the GPU "
                        "less --margin-gib (reported as kv_tokens_capacity)")
    p.add_argument("--margin-gib", type=float, default=6.0)
    p.add_argument("--kv-page-bytes", type=int, default=None,
                   help="KV page size (default 2 MiB on CUDA); an MLA model's latent must "
                        "divide it, e.g. 18874368 for DeepSeek-V2-Lite in bf16")
    p.add_argument("--moe-small-batch", default="off", choices=("auto", "on", "off"),
                   help="the engine's small-batch MoE path (off: the fused-MoE GEMM at "
                        "every batch, the path tested under TP)")
    p.add_argument("--tiny-arch", default="qwen3_moe", help="CPU: the tiny checkpoint's arch")
    p.add_argument("--mode-timeout", type=float, default=420.0,
                   help="seconds one mode may take (a hung capture then costs only its mode)")
    p.add_argument("--no-symm-mem", dest="symm_mem", action="store_false",
                   help="skip the last section: NCCL's all-reduce against torch's "
                        "symmetric-memory one-shot and two-shot all-reduces (CUDA)")
    p.add_argument("--attention-backend", default="auto",
                   help="the engine's --attention-backend (CPU: triton under TRITON_INTERPRET=1 "
                        "runs the +graph modes' static path, without capture)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    modes = [(m, *mode_sizes(m, args.ranks)) for m in args.modes.split(",")]
    modes.sort(key=lambda m: m[3])  # eager modes first: a failed capture cannot cost them

    import torch

    from sglang_crosspool.distributed.spawn import run_ranks

    if args.device == "cuda":
        need = max(m[1] for m in modes)
        if not torch.cuda.is_available() or torch.cuda.device_count() < need:
            raise SystemExit(f"needs {need} CUDA GPUs, found "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
                             " (use --device cpu to check the script)")
    else:
        args.iters, args.warmup = min(args.iters, 2), 1
        args.ctx = min(args.ctx, 100)
    report = {"args": vars(args), "torch": torch.__version__, "modes": {}, "failed": []}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as root:
        path = _model_dir(args, Path(root))
        for name, tp, ep, graph in modes:
            print(f"mode {name}: tp_size {tp}, ep_size {ep}, graphs {graph}", flush=True)
            t0 = time.perf_counter()
            try:
                config = _config(path, args, tp, ep)
                if mode_symm(name):
                    config = dataclasses.replace(config, tp_all_reduce="symm-mem")
                ranks = run_ranks(_rank, tp, args=(config, {
                    "batches": args.batches, "ctx": args.ctx, "iters": args.iters,
                    "warmup": args.warmup, "kv_gib": args.kv_gib, "graph": graph,
                    "margin_gib": args.margin_gib}), timeout_s=args.mode_timeout)
                report["modes"][name] = {"tp_size": tp, "ep_size": ep, "graph": graph,
                                         "per_rank": ranks,
                                         "wall_s": round(time.perf_counter() - t0, 1)}
            except Exception as e:  # noqa: BLE001 - reported, the next mode still runs
                traceback.print_exc()
                report["failed"].append({"mode": name, "error": f"{type(e).__name__}: {e}"})
            report["summary"] = summarize(report)
            out.write_text(json.dumps(report, indent=2) + "\n")
        if args.device == "cuda" and args.symm_mem and args.ranks > 1:
            # Last: an all-reduce kind that crashes here costs nothing measured before it.
            print("all-reduce kinds: NCCL against symmetric memory", flush=True)
            try:
                hidden = _config(path, args, 1, 1).models[0].spec.hidden_size
                report["all_reduce_kinds"] = run_ranks(
                    _all_reduce_kinds, args.ranks, args=(hidden, args.batches, args.iters),
                    timeout_s=180)[0]
            except Exception as e:  # noqa: BLE001 - reported
                traceback.print_exc()
                report["failed"].append({"mode": "all_reduce_kinds",
                                         "error": f"{type(e).__name__}: {e}"})
            out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    return 1 if report["failed"] else 0


def summarize(report: dict) -> dict:
    """Per batch: each mode's step ms and its all-reduce share; per mode: bytes per GPU."""
    table = {}
    for name, mode in report["modes"].items():
        lead = mode["per_rank"][0]
        for batch, row in lead["batches"].items():
            if "step_ms" in row:
                table.setdefault(batch, {})[name] = {
                    "step_ms": row["step_ms"],
                    "all_reduce_ms_per_step": row["all_reduce_ms_per_step"],
                    "control_us": row["control_us"]}
    weights = {name: [r["attention_bytes"] + r["ffn_bytes"] for r in m["per_rank"]]
               for name, m in report["modes"].items()}
    kv = {name: {k: m["per_rank"][0][k] for k in ("kv_tokens_capacity", "kv_bytes_per_token",
                                                   "kv_replicas")}
          for name, m in report["modes"].items()}
    return {"decode_step_ms_by_batch": table, "weight_bytes_per_rank": weights, "kv": kv}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
