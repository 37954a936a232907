"""Building blocks shared by the MoE architectures: the attention half and the FFN half.

A decoder layer is split where CrossPool splits it:

    attention half (KV-cache pool)                       FFN half (weights pool)
    x -> RMSNorm -> QKV -> RoPE -> paged attention
      -> O-proj -> +residual -> RMSNorm -> router  ---- h, top-k ids, top-k weights ---->
                                                       experts (+ shared expert) -> sum
    x <- +residual <------------------------------------------------------ FFN(h) ----

`AttentionHalf` holds embeddings, attention, norms, routers and lm_head; `FFNHalf` holds the
routed experts (all of them, or the subset one FFN server owns), shared experts and dense MLPs.
Architecture files subclass both and say only what differs: tensor names, q/k norms, router.
Numerics follow transformers' eager implementation (norms in float32, softmax router in float32)
so that outputs match it token for token.

Tensor / expert parallelism (`models/parallel.py`): both halves take a `ShardPlan` and a rank
`Group`; each rank loads only its share (heads, intermediate rows, expert slice, vocabulary
rows) and the partial outputs of o_proj and of the FFN are summed by one all-reduce each (the
embeddings by one more, the logits all-gathered). Without them (the default) every collective
is the identity and the code is the one-device path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_crosspool.distributed.group import Group, SingleGroup
from sglang_crosspool.models.checkpoint import CheckpointFiles
from sglang_crosspool.models.config import ModelSpec
from sglang_crosspool.models.parallel import ShardPlan, cols, rows


@functools.cache
def _gpu_kernel(name: str):
    """The Triton kernel `name` of crosspool_kernels for CUDA tensors, or None without Triton.

    On CUDA the layers run these kernels (one launch instead of several torch ops, which is
    what a captured decode step is made of); on CPU they keep torch ops, the float32 path that
    matches transformers token for token.
    """
    from crosspool_kernels import HAS_TRITON, KERNELS

    return KERNELS[name].triton if HAS_TRITON else None


def _kernel_for(name: str, x: torch.Tensor):
    return _gpu_kernel(name) if x.is_cuda else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernel = _kernel_for("rms_norm", x)
    if kernel is not None:
        return kernel(x, weight, eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class Rotary:
    """cos/sin tables of the default rotary embedding, computed once for every position."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device, dtype):
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def apply_qk(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        kernel = _kernel_for("rope", q)
        if kernel is not None:
            return kernel(q, k, positions, self.cos, self.sin)
        return self.apply(q, positions), self.apply(k, positions)


@dataclass
class AttnLayer:
    input_norm: torch.Tensor
    qkv_w: torch.Tensor  # q, k and v projections stacked: one GEMM per layer
    o_w: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor | None  # None for a dense layer
    qkv_b: torch.Tensor | None = None
    o_b: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class Routing:
    """What crosses to the weights pool besides the hidden states."""

    topk_ids: torch.Tensor | None  # [tokens, top_k] int64; None for a dense layer
    topk_weights: torch.Tensor | None  # [tokens, top_k] float32


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class AttentionHalf:
    """Embeddings, attention blocks, routers and lm_head of one model (no expert weights).

    Subclasses set the class attributes below and may override `qk_norm` and `route`.
    """

    moe_prefixes: tuple[str, ...] = ("mlp.",)  # where the router lives in a layer
    bias_fields: tuple[str, ...] = ()  # which of q/k/v/o projections carry biases
    qk_norm_keys: bool = False

    def __init__(self, spec: ModelSpec, files: CheckpointFiles, device, dtype: torch.dtype,
                 shard: ShardPlan | None = None, group: Group | None = None):
        self.spec = spec  # the whole model's shapes; `heads` says which heads this rank holds
        self.device = device
        self.dtype = dtype
        self.shard = shard or ShardPlan()
        self.group = group or SingleGroup(device)
        self.heads = self.shard.spec_heads(spec)

        def load(*keys, shape=None, part=None):
            return files.first(*keys, shape=shape, part=part).to(device=device, dtype=dtype)

        s = spec
        # Vocab-parallel under TP (models/parallel.py): this rank's rows, or all of them.
        self.vocab_rows = self.shard.vocab_rows(s.vocab_size)
        self.embed = load("model.embed_tokens.weight", shape=(s.vocab_size, s.hidden_size),
                          part=rows(self.vocab_rows))
        self.final_norm = load("model.norm.weight", shape=(s.hidden_size,))
        if "lm_head.weight" in files or not s.tie_word_embeddings:
            self.lm_head = load("lm_head.weight", shape=(s.vocab_size, s.hidden_size),
                                part=rows(self.vocab_rows))
        else:
            self.lm_head = self.embed
        self.layers = [self._load_layer(i, load) for i in range(s.num_layers)]
        self.rotary = self._rotary()

    def _rotary(self):
        s = self.spec
        return Rotary(s.head_dim, s.rope_theta, s.max_position_embeddings, self.device, self.dtype)

    def attention_backend(self, backend):
        """What computes attention over this model's KV cache: the engine's backend, unless
        the architecture brings its own (MLA over a latent cache)."""
        return backend

    def _load_layer(self, i: int, load) -> AttnLayer:
        s, p, hs = self.spec, f"model.layers.{i}.", self.heads
        h, q, kv = s.hidden_size, s.q_size, s.kv_size
        sizes = {"q": q, "k": kv, "v": kv, "o": h}
        # This rank's rows of each projection (all of them at TP 1); o_proj's bias stays whole.
        spans = {"q": hs.q_rows, "k": hs.kv_rows, "v": hs.kv_rows, "o": None}
        parts = {n: rows(span) if self.shard.sharded else None for n, span in spans.items()}
        local = {n: sizes[n] if span is None else span[1] - span[0] for n, span in spans.items()}
        proj = {name: load(p + f"self_attn.{name}_proj.weight", shape=(sizes[name], h),
                           part=parts[name]) for name in ("q", "k", "v")}
        layer = AttnLayer(
            input_norm=load(p + "input_layernorm.weight", shape=(h,)),
            qkv_w=torch.cat(list(proj.values())),
            o_w=load(p + "self_attn.o_proj.weight", shape=(h, q),
                     part=cols(hs.q_rows) if self.shard.sharded else None),
            post_norm=load(p + "post_attention_layernorm.weight", shape=(h,)),
            router=None,
        )
        if s.moe_layers[i]:
            keys = [p + prefix + "gate.weight" for prefix in self.moe_prefixes]
            layer.router = load(*keys, shape=(s.num_experts, h))
        biases = {name: load(p + f"self_attn.{name}_proj.bias", shape=(sizes[name],),
                             part=parts[name]) for name in self.bias_fields}
        if any(name in biases for name in proj):
            layer.qkv_b = torch.cat([biases[n] if n in biases else proj[n].new_zeros(local[n])
                                     for n in proj])
        layer.o_b = biases.get("o")
        if self.qk_norm_keys:
            q_shape, k_shape = self.qk_norm_shapes()
            q_part, k_part = self.qk_norm_parts()
            layer.q_norm = load(p + "self_attn.q_norm.weight", shape=q_shape, part=q_part)
            layer.k_norm = load(p + "self_attn.k_norm.weight", shape=k_shape, part=k_part)
        return layer

    def qk_norm_shapes(self) -> tuple[tuple[int], tuple[int]]:
        return (self.spec.head_dim,), (self.spec.head_dim,)

    def qk_norm_parts(self) -> tuple:
        """This rank's parts of the q/k norm weights: whole for per-head norms."""
        return None, None

    # -- forward pieces ---------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.vocab_rows is None:
            return F.embedding(input_ids, self.embed)
        # Rows this rank does not hold read row 0 and are zeroed; the all-reduce adds the
        # holder's row (exactly: every other term is zero).
        start, stop = self.vocab_rows
        outside = (input_ids < start) | (input_ids >= stop)
        x = F.embedding((input_ids - start).masked_fill(outside, 0), self.embed)
        return self.group.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))

    def qkv(self, layer: AttnLayer, h: torch.Tensor):
        """Projects h [tokens, hidden] to q [T, heads, d], k and v [T, kv_heads, d]."""
        hs = self.heads  # this rank's heads (all of them at TP 1)
        q, k, v = F.linear(h, layer.qkv_w, layer.qkv_b).split([hs.q_size, hs.kv_size,
                                                                hs.kv_size], -1)
        q, k, v = self.qk_norm(layer, q, k, v)
        return (
            q.view(-1, hs.heads, hs.head_dim),
            k.view(-1, hs.kv_heads, hs.head_dim),
            v.view(-1, hs.kv_heads, hs.head_dim),
        )

    def qk_norm(self, layer: AttnLayer, q, k, v):
        """Hook for architectures that normalize q and k; the default does nothing."""
        return q, k, v

    def route(self, layer: AttnLayer, h: torch.Tensor) -> Routing:
        """Softmax router in float32, top-k, optionally renormalized (transformers' order)."""
        if layer.router is None:
            return Routing(None, None)
        logits = F.linear(h, layer.router)
        fused = _kernel_for("router_topk", logits)
        if fused is not None:  # on GPU: softmax, top-k, renormalisation and cast in one launch
            return Routing(*fused(logits, self.spec.top_k, self.renormalize(), h.dtype))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.renormalize():
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(ids, weights.to(h.dtype))

    def renormalize(self) -> bool:
        return self.spec.norm_topk_prob

    def attention_block(self, i: int, x: torch.Tensor, batch, attn) -> tuple:
        """Runs layer i up to the FFN: returns (residual stream, FFN input, routing).

        `attn(i, q, k, v, batch)` stores k/v in the KV pool and returns [T, heads*d].
        """
        layer = self.layers[i]
        h = rms_norm(x, layer.input_norm, self.spec.rms_norm_eps)
        q, k, v = self.qkv(layer, h)
        q, k = self.rotary.apply_qk(q, k, batch.positions)
        o = attn(i, q, k, v, batch)
        o = self.o_proj(layer, o)
        add_norm = _kernel_for("fused_add_rms_norm", x)
        if add_norm is not None:
            h, x = add_norm(o, x, layer.post_norm, self.spec.rms_norm_eps)
        else:
            x = x + o
            h = rms_norm(x, layer.post_norm, self.spec.rms_norm_eps)
        return x, h, self.route(layer, h)

    def o_proj(self, layer, o: torch.Tensor) -> torch.Tensor:
        """o_proj of this rank's heads; under TP the partial sums are all-reduced, then the
        bias is added once."""
        if self.group.world_size == 1:
            return F.linear(o, layer.o_w, layer.o_b)
        o = self.group.all_reduce(F.linear(o, layer.o_w))
        return o if layer.o_b is None else o + layer.o_b

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab]; vocab-parallel: every rank must call it (all-gather)."""
        out = F.linear(rms_norm(x, self.final_norm, self.spec.rms_norm_eps), self.lm_head).float()
        return out if self.vocab_rows is None else self.group.all_gather(out, dim=-1)

    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors.extend(vars(layer).values())
        return _nbytes(tensors)


@dataclass
class FFNLayer:
    w13: torch.Tensor | None = None  # routed experts [E_local, 2I, H] (gate rows, then up)
    w2: torch.Tensor | None = None  # [E_local, H, I]
    local_index: torch.Tensor | None = None  # global expert id -> local row, -1 if not owned
    shared_w13: torch.Tensor | None = None  # shared expert or dense MLP [2I, H]
    shared_w2: torch.Tensor | None = None  # [H, I]
    shared_gate: torch.Tensor | None = None  # [1, H]: sigmoid gate of the shared expert


class FFNHalf:
    """Routed experts, shared expert and dense MLPs of one model, or of a subset of its experts.

    `experts=None` loads every expert; a list loads only those (one FFN server's share), and
    `forward` then returns the partial sum over the owned experts. Under TP/EP (`shard`) the
    rank loads its expert slice and intermediate rows, and `forward` returns the sum over the
    group (one all-reduce). `moe_small_batch` (auto | on
    | off, the engine's --moe-small-batch) picks the grouped-GEMV path for batches of at most
    8 tokens: `auto` on CUDA, `on` wherever Triton runs (the interpreter on CPU, for tests).
    """

    moe_prefixes: tuple[str, ...] = ("mlp.",)
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_prefix: str | None = None  # e.g. "mlp.shared_expert." (with gate "mlp.shared_expert_gate")
    shared_gated: bool = True  # the shared expert's output passes a sigmoid gate (Qwen2-MoE)

    def __init__(
        self,
        spec: ModelSpec,
        files: CheckpointFiles,
        device,
        dtype: torch.dtype,
        experts: list[int] | None = None,
        with_shared: bool = True,
        moe_small_batch: str = "auto",
        shard: ShardPlan | None = None,
        group: Group | None = None,
    ):
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.moe_small_batch = moe_small_batch
        self.shard = shard or ShardPlan()
        self.group = group or SingleGroup(device)
        if experts is None:
            experts = self.shard.experts(spec.num_experts) if self.shard.sharded \
                else range(spec.num_experts)
        self.experts = sorted(experts)
        self.with_shared = with_shared
        self.layers = [self._load_layer(files, i) for i in range(spec.num_layers)]

    def _load(self, files, *keys, shape=None, part=None):
        return files.first(*keys, shape=shape, part=part).to(device=self.device,
                                                              dtype=self.dtype)

    def _load_layer(self, files: CheckpointFiles, i: int) -> FFNLayer:
        s, p = self.spec, f"model.layers.{i}."
        h = s.hidden_size
        if not s.moe_layers[i]:
            if not self.with_shared:
                return FFNLayer()
            gate, up, down = (f"{p}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))
            return self._dense(files, gate, up, down, s.dense_intermediate_size,
                               "intermediate_size")
        layer = FFNLayer()
        if self.experts:
            layer.w13, layer.w2 = self._load_experts(files, p)
            index = torch.full((s.num_experts,), -1, dtype=torch.int64)
            index[self.experts] = torch.arange(len(self.experts))
            layer.local_index = index.to(self.device)
        if self.shared_prefix and self.with_shared:
            sp = p + self.shared_prefix
            n = s.shared_expert_intermediate_size
            shared = self._dense(files, sp + "gate_proj.weight", sp + "up_proj.weight",
                                 sp + "down_proj.weight", n, "shared_expert_intermediate_size")
            layer.shared_w13, layer.shared_w2 = shared.shared_w13, shared.shared_w2
            if self.shared_gated:
                gate_key = p + self.shared_prefix.rstrip(".") + "_gate.weight"
                layer.shared_gate = self._load(files, gate_key, shape=(1, h))
        return layer

    def _dense(self, files, gate_key, up_key, down_key, inter: int,
               what: str = "intermediate_size") -> FFNLayer:
        h = self.spec.hidden_size
        span = self.shard.dense_rows(inter, what) if self.shard.sharded else None
        gate = self._load(files, gate_key, shape=(inter, h), part=rows(span))
        up = self._load(files, up_key, shape=(inter, h), part=rows(span))
        down = self._load(files, down_key, shape=(h, inter), part=cols(span))
        return FFNLayer(shared_w13=torch.cat([gate, up], dim=0), shared_w2=down)

    def _load_experts(self, files: CheckpointFiles, p: str):
        """Stacks the owned experts; accepts per-expert tensors or fused 3D tensors."""
        s = self.spec
        h, inter, e = s.hidden_size, s.moe_intermediate_size, s.num_experts
        span = self.shard.expert_rows(inter) if self.shard.moe_tp_size > 1 else None
        for prefix in self.moe_prefixes:
            fused = f"{p}{prefix}experts.gate_up_proj"
            if fused in files:
                # NOTE: read whole, then cut (a TP rank's slice of a fused tensor is not one
                # contiguous range: its gate rows and its up rows).
                w13 = files.get(fused, shape=(e, 2 * inter, h))[self.experts]
                w2 = files.get(f"{p}{prefix}experts.down_proj", shape=(e, h, inter))[self.experts]
                if span is not None:
                    a, b = span
                    w13 = torch.cat([w13[:, a:b], w13[:, inter + a:inter + b]], dim=1)
                    w2 = w2[:, :, a:b]
                return w13.to(self.device, self.dtype), w2.to(self.device, self.dtype)
        g, u, d = self.expert_names
        w13, w2 = [], []
        for x in self.experts:
            keys = [f"{p}{prefix}experts.{x}." for prefix in self.moe_prefixes]
            gate = self._load(files, *(k + g + ".weight" for k in keys), shape=(inter, h),
                              part=rows(span))
            up = self._load(files, *(k + u + ".weight" for k in keys), shape=(inter, h),
                            part=rows(span))
            w13.append(torch.cat([gate, up], dim=0))
            w2.append(self._load(files, *(k + d + ".weight" for k in keys), shape=(h, inter),
                                 part=cols(span)))
        return torch.stack(w13), torch.stack(w2)

    def forward(self, i: int, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """FFN output of layer i for h [tokens, hidden] (partial if experts are a subset and
        no TP group sums the parts)."""
        out = self._forward_local(i, h, routing)
        return out if self.group.world_size == 1 else self.group.all_reduce(out)

    def _forward_local(self, i: int, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        layer = self.layers[i]
        if layer.w13 is not None and routing.topk_ids is not None and self._small_batch(h):
            # Routed and shared experts in one pass of GEMVs over the chosen experts' weights.
            return _gpu_kernel("moe_small_batch")(
                h, layer.w13, layer.w2, routing.topk_weights, routing.topk_ids,
                layer.local_index, layer.shared_w13, layer.shared_w2, layer.shared_gate)
        out = None
        if layer.w13 is not None and routing.topk_ids is not None:
            out = self._routed(layer, h, routing)
        if layer.shared_w13 is not None:
            shared = _swiglu(h, layer.shared_w13, layer.shared_w2)
            if layer.shared_gate is not None:
                shared = torch.sigmoid(F.linear(h, layer.shared_gate)) * shared
            out = shared if out is None else out + shared
        return torch.zeros_like(h) if out is None else out

    def _small_batch(self, h: torch.Tensor) -> bool:
        mode = self.moe_small_batch
        if mode == "off" or (mode == "auto" and not h.is_cuda):
            return False  # decided without importing triton
        from crosspool_kernels.moe_small_batch import use_small_batch

        return use_small_batch(mode, h.shape[0], h.device)

    def _routed(self, layer: FFNLayer, h, routing: Routing) -> torch.Tensor:
        fused = _kernel_for("fused_moe", h)
        if fused is not None:  # on GPU: sorted by expert, grouped GEMM, no host sync
            return fused(h, layer.w13, layer.w2, routing.topk_weights, routing.topk_ids,
                         layer.local_index)
        # Reference path: loop over the owned experts that received tokens.
        out = torch.zeros_like(h)
        local = layer.local_index[routing.topk_ids]  # [T, k], -1 where another server owns it
        for row in torch.unique(local[local >= 0]).tolist():
            token_idx, slot = torch.where(local == row)
            y = _swiglu(h[token_idx], layer.w13[row], layer.w2[row])
            y = y * routing.topk_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def nbytes(self) -> int:
        return _nbytes(t for layer in self.layers for t in vars(layer).values()
                       if t is not None and t.dtype != torch.int64)


def _swiglu(h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(h, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)
