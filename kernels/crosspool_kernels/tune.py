"""Tunes launch configs per shape and writes them as JSON under `configs/` (see tuned.py).

    python -m crosspool_kernels.tune fused_moe --experts 64 --inter 1024 --hidden 2048 \
        --top-k 8 --dtype bfloat16 --batches 1,2,4,8,16,32,64,128,256
    python -m crosspool_kernels.tune decode_attention --heads 32 --kv-heads 4 --head-dim 128 \
        --ctx 1024 --batches 1,4,16,64
    python -m crosspool_kernels.tune prefill_attention --heads 32 --kv-heads 4 --head-dim 128 \
        --ctx 0 --seqs 4 --batches 16,128,512,2048      (buckets: new tokens per sequence)
    python -m crosspool_kernels.tune sampling --vocab 151936 --batches 1,16

On a GPU each batch bucket times a few candidate configs (triton.testing.do_bench), drops those
that fail to compile or disagree with the torch reference, and keeps the fastest. Without a GPU
nothing is timed: the file gets the kernel's default config for each bucket, so that the
naming and loading path can be exercised on CPU (run with TRITON_INTERPRET=1 to also check
that the default config runs).
"""

import argparse
import functools
import itertools
import json
import os
import sys

import torch

from crosspool_kernels import tuned


def _bench(fn) -> float:
    """Kernel time inside a CUDA graph (how the engine runs decode), else eager time."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50)
    except Exception:  # noqa: BLE001 - e.g. host-to-device copies that cannot be captured
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=50)


def _paged_cache(batch, ctx, num_kv_heads, head_dim, block_tokens, dtype, device):
    blocks_per_seq = -(-ctx // block_tokens)
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks * block_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    perm = torch.randperm(num_blocks, device=device)
    tables = perm.view(batch, blocks_per_seq).to(torch.int64)
    return k, v, tables


class Family:
    """One kernel family: its file name shape, candidates, inputs and a call with a config."""

    name = ""

    def __init__(self, args):
        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def shape(self) -> dict:
        raise NotImplementedError

    def default(self, batch: int) -> dict:
        raise NotImplementedError

    def candidates(self, batch: int):
        raise NotImplementedError

    def inputs(self, batch: int):
        raise NotImplementedError

    def run(self, inputs, cfg: dict):
        raise NotImplementedError

    def reference(self, inputs):
        raise NotImplementedError

    def close(self, a, b) -> bool:
        tol = 2e-2 if self.dtype in (torch.bfloat16, torch.float16) else 1e-4
        return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


class FusedMoE(Family):
    name = "fused_moe"

    def shape(self):
        return {"E": self.args.experts, "N": self.args.inter}

    def default(self, batch):
        from crosspool_kernels.fused_moe import default_config

        return default_config(batch, self.args.top_k, self.args.experts)

    def candidates(self, batch):
        for bm, bn, bk, warps, stages in itertools.product(
            (16, 32, 64, 128), (32, 64, 128), (64, 128, 256), (4, 8), (3, 4)
        ):
            if bm > 16 and bm > 4 * batch * self.args.top_k:
                continue
            yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
                   "num_stages": stages}

    def inputs(self, batch):
        a, d = self.args, {"device": self.device, "dtype": self.dtype}
        hidden = torch.randn(batch, a.hidden, **d)
        w13 = torch.randn(a.experts, 2 * a.inter, a.hidden, **d) / a.hidden**0.5
        w2 = torch.randn(a.experts, a.hidden, a.inter, **d) / a.inter**0.5
        probs = torch.randn(batch, a.experts, device=self.device).softmax(-1)
        weights, ids = torch.topk(probs, a.top_k)
        return hidden, w13, w2, weights, ids

    def run(self, inputs, cfg):
        from crosspool_kernels.fused_moe import fused_moe

        return fused_moe(*inputs, config=cfg)

    def reference(self, inputs):
        from crosspool_kernels.fused_moe import fused_moe_ref

        return fused_moe_ref(*inputs)


class DecodeAttention(Family):
    name = "decode_attention"

    def shape(self):
        return {"G": self.args.heads // self.args.kv_heads, "D": self.args.head_dim}

    def default(self, batch):
        from crosspool_kernels.decode_attention import DEFAULT_CONFIG

        return dict(DEFAULT_CONFIG)

    def candidates(self, batch):
        for bn, splits, warps, stages in itertools.product(
            (32, 64, 128), (1, 2, 4, 8, 16, 32), (2, 4, 8), (1, 2, 3)
        ):
            yield {"BLOCK_N": bn, "num_splits": splits, "num_warps": warps, "num_stages": stages,
                   "min_split_tokens": 256}

    def inputs(self, batch):
        a = self.args
        k, v, tables = _paged_cache(batch, a.ctx, a.kv_heads, a.head_dim, a.block_tokens,
                                    self.dtype, self.device)
        q = torch.randn(batch, a.heads, a.head_dim, dtype=self.dtype, device=self.device)
        ctx = torch.full((batch,), a.ctx, dtype=torch.int32, device=self.device)
        return q, k, v, tables, ctx, a.block_tokens

    def run(self, inputs, cfg):
        from crosspool_kernels.decode_attention import decode_attention

        return decode_attention(*inputs, num_splits=cfg["num_splits"], config=cfg)

    def reference(self, inputs):
        from crosspool_kernels.decode_attention import decode_attention_ref

        return decode_attention_ref(*inputs)


class PrefillAttention(Family):
    name = "prefill_attention"

    def shape(self):
        return {"D": self.args.head_dim}

    def default(self, batch):
        from crosspool_kernels.prefill_attention import DEFAULT_CONFIG

        return dict(DEFAULT_CONFIG)

    def candidates(self, batch):
        for bm, bn, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (4, 8),
                                                       (1, 2, 3)):
            yield {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}

    def inputs(self, batch):
        # The bucket is the new tokens per sequence: --seqs sequences, each extending a cached
        # prefix of --ctx tokens by `batch` tokens.
        a = self.args
        ctx = a.ctx + batch
        k, v, tables = _paged_cache(a.seqs, ctx, a.kv_heads, a.head_dim, a.block_tokens,
                                    self.dtype, self.device)
        q = torch.randn(a.seqs * batch, a.heads, a.head_dim, dtype=self.dtype, device=self.device)
        starts = [i * batch for i in range(a.seqs)]
        return q, k, v, tables, starts, [batch] * a.seqs, [ctx] * a.seqs, a.block_tokens

    def run(self, inputs, cfg):
        from crosspool_kernels.prefill_attention import prefill_attention

        return prefill_attention(*inputs, config=cfg)

    def reference(self, inputs):
        from crosspool_kernels.prefill_attention import prefill_attention_ref

        return prefill_attention_ref(*inputs)


class Sampling(Family):
    name = "sampling"

    def shape(self):
        return {}

    def default(self, batch):
        from crosspool_kernels.sampling import DEFAULT_CONFIG

        return dict(DEFAULT_CONFIG)

    def candidates(self, batch):
        for bv, chunk, logp, warps in itertools.product((512, 1024, 2048), (2048, 4096, 8192),
                                                         (1, 2, 4), (4, 8)):
            if chunk >= bv:
                yield {"BLOCK_V": bv, "CHUNK": chunk, "LOG_PIVOTS": logp, "num_warps": warps}

    def inputs(self, batch):
        probs = torch.randn(batch, self.args.vocab, device=self.device).softmax(-1)
        probs = probs.to(self.dtype)
        u = torch.rand(batch, device=self.device)
        return probs, u, torch.full((batch,), 50, device=self.device), 0.9, 0.0

    def run(self, inputs, cfg):
        from crosspool_kernels.sampling import top_k_top_p_sample

        return top_k_top_p_sample(*inputs, config=cfg)

    def reference(self, inputs):
        from crosspool_kernels.sampling import top_k_top_p_sample_ref

        return top_k_top_p_sample_ref(*inputs)

    def close(self, a, b):
        return bool((a == b).float().mean() > 0.99)


FAMILIES = {f.name: f for f in (FusedMoE, DecodeAttention, PrefillAttention, Sampling)}


def _try(family: Family, inputs, cfg: dict, expected) -> float:
    """Milliseconds per call of one config; inf if it fails to build or is wrong."""
    try:
        if not family.close(family.run(inputs, cfg), expected):
            return float("inf")
        return _bench(functools.partial(family.run, inputs, cfg))
    except Exception as e:  # noqa: BLE001 - configs that do not compile or fit are skipped
        print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
        return float("inf")


def tune(family: Family, batches: list[int], verbose: bool = True) -> dict:
    result = {}
    on_gpu = family.device.type == "cuda"
    for batch in batches:
        if not on_gpu:
            cfg = family.default(batch)
            if os.environ.get("TRITON_INTERPRET") == "1":
                inputs = family.inputs(batch)
                if not family.close(family.run(inputs, cfg), family.reference(inputs)):
                    raise RuntimeError(f"default config of {family.name} is wrong at {batch}")
            result[str(batch)] = cfg
            continue
        inputs = family.inputs(batch)
        expected = family.reference(inputs)
        best, best_ms = None, float("inf")
        for cfg in family.candidates(batch):
            ms = _try(family, inputs, cfg, expected)
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            best = family.default(batch)
        result[str(batch)] = best
        if verbose:
            print(f"{family.name} batch={batch}: {best} {best_ms * 1e3:.1f} us", file=sys.stderr)
    return result


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kernel", choices=sorted(FAMILIES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--out-dir", default=str(tuned.CONFIG_DIR))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--inter", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--block-tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args(argv)
    family = FAMILIES[args.kernel](args)
    name = tuned.config_filename(family.name, family.shape(), family.device, family.dtype)
    path = os.path.join(args.out_dir, name)
    result = {}
    for batch in (int(b) for b in args.batches.split(",")):
        result.update(tune(family, [batch]))
        with open(path, "w") as f:  # after every bucket, so an interrupted run keeps its work
            json.dump(result, f, indent=2, sort_keys=True)
            f.write("\n")
    tuned.clear_cache()
    print(path)
    print(json.dumps(result, sort_keys=True))
    return path


if __name__ == "__main__":
    main()
