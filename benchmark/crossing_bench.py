"""Per-layer crossing cost of each FFN transport, against FFN servers that compute nothing.

    PYTHONPATH=.:scheduler:kernels python benchmark/crossing_bench.py --out crossing.json \
        [--transports cuda-ipc,shm,nccl,local] [--tokens 1,4,16,64,256] [--hidden 4096,2048]

A crossing is what one layer of one micro-batch pays to reach the weights pool and back: the
attention side submits hidden states [T, H] with top-k ids and weights (k = 8) through a
transport's link, waits for the output and adds it to the residual on its stream. The FFN
server runs in echo mode (`FFNServerSpec.echo`: no model, FFN(h) = h, its output written back
like a real one), so only the data path and the control path (ZeroMQ doorbell, the server's
receive loop) are timed, through the same classes the engine uses.

Per transport and size: `median_us` and `p90_us` of single crossings with the device
synchronized before and after each (latency), and `stream_us`, the mean over back-to-back
crossings with two slots in flight and one synchronize at the end (what a pipelined decode
pays per layer). For reference, `copy` rows time a same-process `copy_` of [T, H] on GPU 0 the
same way (`copy:1`: GPU 0 -> GPU 1, where there are two), with `gpu_us`, the copy alone as CUDA
events see it.

`p2p` (the FFN server on GPU 1; on CPU, its shared-memory twin) is timed as the engine runs
it: `--layers` crossings of one step captured in one CUDA graph on each side, one Step message
per step. `median_us` / `p90_us`: a step of one micro-batch (each crossing waits for the
previous one), synchronized and divided by the layers; `stream_us`: the same with two
micro-batches in the pipeline order (back to back); `eager_us`: one crossing as an uncaptured
one-layer step (Step message, kernel launches from Python, the error read): the per-step
control cost. The echoed data is checked against the same adds done locally.

Transports and where their server runs: `cuda-ipc` (GPU 0, beside attention; across GPUs it
is refused: see config),  `shm` (GPU 0; device -> host -> device both
ways), `nccl` (GPU 1; skipped with a note on one GPU: NCCL cannot join two processes on one
GPU), `dist` (gloo, staged through host memory), `local` (an in-process call: the floor).
`--device cpu` runs the CPU transports (a smoke test of this script). Prints a table; writes
JSON with the device name and torch version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch

from sglang_crosspool.models.common import Routing

TOP_K = 8
NUM_EXPERTS = 64
SLOTS = 2


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    began = time.monotonic()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    tokens = [int(t) for t in args.tokens.split(",")]
    hiddens = [int(h) for h in args.hidden.split(",")]
    sizes = [(t, h) for h in hiddens for t in tokens]
    transports = args.transports.split(",") if args.transports else _defaults(dev, gpus)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "gpus": gpus, "dtype": args.dtype, "top_k": TOP_K,
        "iters": args.iters, "crossings": [], "copies": [], "skipped": {}, "errors": {},
    }
    for transport in transports:
        reason = _skip_reason(transport, dev, gpus)
        if reason:
            result["skipped"][transport] = reason
            continue
        t0 = time.monotonic()
        try:
            bench = bench_p2p if transport == "p2p" else bench_transport
            result["crossings"] += bench(transport, dev, sizes, args)
        except Exception as e:  # noqa: BLE001 - record it and measure the others
            traceback.print_exc()
            result["errors"][transport] = f"{type(e).__name__}: {e}"
        print(f"[{transport}: {time.monotonic() - t0:.1f} s]", file=sys.stderr)
    result["copies"] = bench_copies(dev, gpus, sizes, args)
    result["wall_s"] = round(time.monotonic() - began, 1)
    _print_table(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--transports", help="comma-separated; default: every one this machine has")
    p.add_argument("--tokens", default="1,4,16,64,256")
    p.add_argument("--hidden", default="4096,2048")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=300, help="timed crossings per size")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--layers", type=int, default=48, help="p2p: crossings per captured step")
    return p.parse_args(argv)


def _defaults(dev: torch.device, gpus: int) -> list[str]:
    if dev.type != "cuda":
        return ["p2p", "shm", "dist", "local"]
    return ["p2p", "cuda-ipc", "shm", "nccl", "local"]


def _skip_reason(transport: str, dev: torch.device, gpus: int) -> str | None:
    name = transport.partition(":")[0]
    if name not in ("p2p", "cuda-ipc", "shm", "nccl", "dist", "local"):
        raise SystemExit(f"unknown transport {transport!r}")
    if name == "p2p" and dev.type == "cuda" and gpus < 2:
        return "needs 2 GPUs (p2p spins on device flags: the FFN server needs its own GPU)"
    if name in ("cuda-ipc", "nccl") and dev.type != "cuda":
        return "needs CUDA"
    if (name == "nccl" or transport.endswith(":1")) and gpus < 2:
        return "needs 2 GPUs (NCCL cannot join two processes on one GPU)" if name == "nccl" \
            else "needs 2 GPUs"
    return None


class InProcess:
    """`local`: the FFN is a call in this process; the crossing is the consumer's add."""

    def __init__(self):
        self._out = {}

    def submit(self, slot, model, layer, hidden, routing) -> None:
        self._out[slot] = hidden

    def wait(self, slot):
        return self._out.pop(slot)


def _start_pool(transport: str, dev: torch.device, sizes, args):
    from sglang_crosspool.ffn.remote import FFNServerPool, PoolSpec

    name, _, gpu = transport.partition(":")
    server_device = {"cuda-ipc": f"cuda:{gpu or 0}", "nccl": "cuda:1"}.get(name, str(dev))
    spec = PoolSpec(
        models={}, placement={"echo": [[0]]}, device=server_device, dtype=args.dtype,
        transport=name, max_tokens=max(t for t, _ in sizes), hidden=max(h for _, h in sizes),
        max_top_k=TOP_K, slots=SLOTS, dist_backend="nccl" if name == "nccl" else "gloo",
        start_timeout_s=60, attention_device=str(dev),
        echo={f"h{h}": h for h in sorted({h for _, h in sizes})})
    return FFNServerPool(spec)


def bench_transport(transport: str, dev: torch.device, sizes, args) -> list[dict]:
    pool = None if transport == "local" else _start_pool(transport, dev, sizes, args)
    link = InProcess() if pool is None else pool.links[0]
    rows = []
    try:
        for tokens, hidden in sizes:
            x, h, routing = _inputs(tokens, hidden, dev, args.dtype)
            model = f"h{hidden}"

            def once(link=link, model=model, h=h, routing=routing, x=x):
                link.submit(0, model, 0, h, routing)
                x.add_(link.wait(0))

            lat = _latencies(once, dev, args.iters, args.warmup)
            stream = _streamed(link, model, h, routing, x, dev, args.iters)
            rows.append({"transport": transport, "tokens": tokens, "hidden": hidden,
                         **_summary(lat), "stream_us": round(stream, 2)})
    finally:
        if pool is not None:
            pool.close()
    return rows


def bench_p2p(transport: str, dev: torch.device, sizes, args) -> list[dict]:
    from crosspool_scheduler.pipeline import SUBMIT, layer_pipeline

    from sglang_crosspool.ffn.p2p_executor import P2PFFNExecutor
    from sglang_crosspool.ffn.remote import FFNServerPool, PoolSpec

    layers = args.layers
    hiddens = sorted({h for _, h in sizes})
    echo = {f"h{h}": {"hidden": h, "layers": layers, "top_k": TOP_K} for h in hiddens}
    echo |= {f"h{h}x1": {"hidden": h, "layers": 1, "top_k": TOP_K} for h in hiddens}
    spec = PoolSpec(
        models={}, placement={name: [[0]] for name in echo},
        device="cuda:1" if dev.type == "cuda" else "cpu", dtype=args.dtype, transport="p2p",
        max_tokens=max(t for t, _ in sizes), hidden=max(hiddens), max_top_k=TOP_K, slots=SLOTS,
        start_timeout_s=120, attention_device=str(dev), echo=echo)
    ex = P2PFFNExecutor(FFNServerPool(spec), {n: e["layers"] for n, e in echo.items()})
    cuda = dev.type == "cuda"
    rows = []

    def step_body(model, mbs, x, h, routing):
        """The crossings of one step in the pipeline order; returns each micro-batch's x."""
        xs, handles = [x] * mbs, [None] * mbs
        for op in layer_pipeline([echo[model]["layers"]] * mbs):
            if op.kind == SUBMIT:
                handles[op.mb] = ex.submit(model, op.layer, h, routing)
            elif op.kind != "attention":
                xs[op.mb] = ex.wait_residual(handles[op.mb], xs[op.mb])
        return xs

    try:
        for tokens, hidden in sizes:
            x, h, routing = _inputs(tokens, hidden, dev, args.dtype)
            x.normal_()
            model = f"h{hidden}"
            expect = x.clone()
            for _ in range(layers):
                expect = expect + h
            row = {"transport": transport, "tokens": tokens, "hidden": hidden, "layers": layers}
            for mbs, key in ((1, "single"), (2, "stream")):
                plan = [(model, tokens)] * mbs
                for _ in range(2):  # warm-up: compiles both sides' kernels
                    ex.begin_step(plan)
                    out = step_body(model, mbs, x, h, routing)
                    ex.end_step()
                row[f"{key}_data_ok"] = all(bool(torch.equal(o, expect)) for o in out)
                run = None
                if cuda:
                    graph = torch.cuda.CUDAGraph()
                    with ex.capture(plan), torch.cuda.graph(graph):
                        out = step_body(model, mbs, x, h, routing)

                    def run(graph=graph, plan=plan):
                        ex.begin_step(plan, graph=True)
                        graph.replay()
                        ex.end_step()
                else:
                    def run(plan=plan, mbs=mbs):
                        ex.begin_step(plan)
                        step_body(model, mbs, x, h, routing)
                        ex.end_step()
                us = [t / (layers * mbs) for t in _latencies(run, dev, args.iters // 10 or 1,
                                                             3)]
                row[f"{key}_data_ok"] &= all(bool(torch.equal(o, expect)) for o in out)
                if key == "single":
                    row.update(_summary(us))
                else:
                    row["stream_us"] = round(statistics.median(us), 2)
            one = f"h{hidden}x1"

            def eager(one=one):
                ex.begin_step([(one, tokens)])
                x.copy_(ex.wait_residual(ex.submit(one, 0, h, routing), x))
                ex.end_step()

            row["eager_us"] = _summary(_latencies(eager, dev, args.iters, args.warmup))[
                "median_us"]
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    finally:
        ex.close()
    return rows


def bench_copies(dev: torch.device, gpus: int, sizes, args) -> list[dict]:
    targets = [("copy", dev)]
    if gpus >= 2:
        targets.append(("copy:1", torch.device("cuda", 1)))
    rows = []
    for name, target in targets:
        for tokens, hidden in sizes:
            src = torch.randn(tokens, hidden, device=dev).to(getattr(torch, args.dtype))
            dst = torch.empty_like(src, device=target)
            lat = _latencies(lambda dst=dst, src=src: dst.copy_(src), dev, args.iters,
                             args.warmup)
            row = {"transport": name, "tokens": tokens, "hidden": hidden, **_summary(lat)}
            if dev.type == "cuda":
                row["gpu_us"] = round(_gpu_time(lambda dst=dst, src=src: dst.copy_(src),
                                                args.iters), 2)
            rows.append(row)
    return rows


def _inputs(tokens: int, hidden: int, dev: torch.device, dtype: str):
    gen = torch.Generator().manual_seed(tokens * 7 + hidden)
    h = torch.randn(tokens, hidden, generator=gen).to(device=dev, dtype=getattr(torch, dtype))
    ids = torch.randint(0, NUM_EXPERTS, (tokens, TOP_K), generator=gen).to(dev)
    weights = torch.rand(tokens, TOP_K, generator=gen).to(dev)
    return torch.zeros_like(h), h, Routing(ids, weights)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _latencies(fn, dev, iters: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + iters):
        _sync(dev)
        t0 = time.perf_counter_ns()
        fn()
        _sync(dev)
        if i >= warmup:
            out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def _streamed(link, model, hidden, routing, x, dev, n: int) -> float:
    """Mean us per crossing, back to back with SLOTS slots in flight (a slot is submitted again
    only after its wait, as in the engine)."""
    _sync(dev)
    t0 = time.perf_counter_ns()
    for i in range(n + SLOTS - 1):
        if i < n:
            link.submit(i % SLOTS, model, 0, hidden, routing)
        if i >= SLOTS - 1:
            x.add_(link.wait((i - SLOTS + 1) % SLOTS))
    _sync(dev)
    return (time.perf_counter_ns() - t0) / 1e3 / n


def _gpu_time(fn, iters: int) -> float:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in pairs)


def _summary(us: list[float]) -> dict:
    ordered = sorted(us)
    return {"median_us": round(statistics.median(ordered), 2),
            "p90_us": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2)}


def _print_table(result: dict) -> None:
    print(f"{result['device']}, torch {result['torch']}, {result['dtype']}, top-k {TOP_K}, "
          f"{result['iters']} crossings per row; us per crossing")
    print(f"{'transport':<12}{'tokens':>7}{'hidden':>7}{'median':>10}{'p90':>10}"
          f"{'stream':>10}{'gpu':>10}{'eager':>10}")
    for row in result["crossings"] + result["copies"]:
        print(f"{row['transport']:<12}{row['tokens']:>7}{row['hidden']:>7}"
              f"{row['median_us']:>10.1f}{row['p90_us']:>10.1f}"
              f"{row.get('stream_us', float('nan')):>10.1f}"
              f"{row.get('gpu_us', float('nan')):>10.1f}"
              f"{row.get('eager_us', float('nan')):>10.1f}")
    for transport, reason in result["skipped"].items():
        print(f"skipped {transport}: {reason}")
    for transport, error in result["errors"].items():
        print(f"FAILED {transport}: {error}")
    print(f"wall time {result['wall_s']} s")


if __name__ == "__main__":
    main()
