"""How one rank's share of a model is cut under tensor and expert parallelism (--tp-size,
--ep-size), as SGLang cuts it.

In: a `ShardPlan` (this rank, tp_size, ep_size) and a model's `ModelSpec`. Out: which rows or
columns of each checkpoint tensor the rank loads, as `(dim, start, stop)` parts that
`CheckpointFiles.get(..., part=...)` reads without reading the rest.

The TP group is every rank (`tp_size` processes); attention and dense weights are split over
all of them:
- q heads split evenly (`num_heads % tp_size == 0`); KV heads split while they last
  (`num_kv_heads % tp_size == 0`), replicated beyond (`tp_size % num_kv_heads == 0`: rank r
  holds KV head r * num_kv_heads // tp_size, kept by `kv_replicas` ranks). An MLA model's one
  latent "head" is kept by every rank. `kv_replicas` is what the KV pool's report counts as
  replicated bytes.
- q/k/v projections column-parallel (rows of the [out, in] weights), o_proj row-parallel
  (columns), its partial output summed by one all-reduce; its bias added once, after it.
- dense MLPs and shared experts: gate/up column-parallel, down row-parallel over tp_size.
- routed experts: the ranks form `ep_size` expert groups of `moe_tp_size = tp_size // ep_size`
  ranks; expert group g holds a contiguous slice of the experts (balanced; a remainder goes to
  the first groups), and within it each expert's intermediate dim is split moe_tp_size ways.
  Every rank routes every token (the router is replicated), computes the tokens routed to its
  experts with its slice, and one all-reduce per layer sums routed and shared parts together.
  (ep_size 1: pure TP of every expert; ep_size == tp_size: pure EP.)
- embeddings and lm_head: vocab-parallel where tp_size divides the vocabulary (rank r holds
  rows [r*V/N, (r+1)*V/N); a token's embedding comes from the rank holding its row, the
  others add zeros in one all-reduce; each rank's logits of its rows are all-gathered), else
  replicated; norms and routers: replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

Part = tuple[int, int, int] | None  # (dim, start, stop) of a checkpoint tensor; None: whole


class ParallelError(ValueError):
    """A --tp-size / --ep-size that this model's shapes cannot be cut by."""


@dataclass(frozen=True)
class HeadSplit:
    """One rank's attention heads."""

    heads: int  # q heads on this rank
    head_start: int
    kv_heads: int  # KV heads on this rank (cached in its KV pool)
    kv_head_start: int
    kv_replicas: int  # ranks holding each of these KV heads (1: no replication)
    head_dim: int

    @property
    def q_rows(self) -> tuple[int, int]:
        return self.head_start * self.head_dim, (self.head_start + self.heads) * self.head_dim

    @property
    def kv_rows(self) -> tuple[int, int]:
        start = self.kv_head_start * self.head_dim
        return start, start + self.kv_heads * self.head_dim

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ShardPlan:
    """This rank's place in a TP group of tp_size ranks with ep_size expert groups."""

    rank: int = 0
    tp_size: int = 1
    ep_size: int = 1

    def __post_init__(self):
        if self.tp_size < 1 or self.ep_size < 1:
            raise ParallelError(f"tp_size and ep_size must be >= 1, got {self.tp_size}, "
                                f"{self.ep_size}")
        if self.tp_size % self.ep_size:
            raise ParallelError(f"ep_size {self.ep_size} must divide tp_size {self.tp_size} "
                                f"(the expert groups are cut from the TP ranks)")
        if not 0 <= self.rank < self.tp_size:
            raise ParallelError(f"rank {self.rank} is outside a TP group of {self.tp_size}")

    @property
    def moe_tp_size(self) -> int:
        return self.tp_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank // self.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp_size

    @property
    def sharded(self) -> bool:
        return self.tp_size > 1

    # -- attention ------------------------------------------------------------------------

    def heads(self, num_heads: int, num_kv_heads: int, head_dim: int,
              what: str = "model") -> HeadSplit:
        tp, r = self.tp_size, self.rank
        if num_heads % tp:
            raise ParallelError(f"{what}: {num_heads} attention heads cannot be split over "
                                f"tp_size {tp}")
        if num_kv_heads >= tp:
            if num_kv_heads % tp:
                raise ParallelError(f"{what}: {num_kv_heads} KV heads cannot be split over "
                                    f"tp_size {tp}")
            kv, kv_start, replicas = num_kv_heads // tp, r * num_kv_heads // tp, 1
        else:
            if tp % num_kv_heads:
                raise ParallelError(f"{what}: {num_kv_heads} KV heads cannot be replicated "
                                    f"evenly over tp_size {tp}")
            kv, kv_start, replicas = 1, r * num_kv_heads // tp, tp // num_kv_heads
        heads = num_heads // tp
        return HeadSplit(heads, r * heads, kv, kv_start, replicas, head_dim)

    def spec_heads(self, spec) -> HeadSplit:
        """The attention heads of `spec` on this rank (an MLA latent: one head, every rank)."""
        where = f"{spec.path}/config.json"
        if spec.mla is not None:
            self.heads(spec.num_heads, spec.num_heads, 1, where)  # q heads divide?
            heads = spec.num_heads // self.tp_size
            return HeadSplit(heads, self.rank * heads, 1, 0, self.tp_size, spec.head_dim)
        return self.heads(spec.num_heads, spec.num_kv_heads, spec.head_dim, where)

    # -- FFN ------------------------------------------------------------------------------

    def experts(self, num_experts: int) -> list[int]:
        """The routed experts of this rank's expert group: a contiguous, balanced slice."""
        if num_experts < self.ep_size:
            raise ParallelError(f"{num_experts} experts cannot be spread over ep_size "
                                f"{self.ep_size}")
        base, extra = divmod(num_experts, self.ep_size)
        g = self.ep_rank
        start = g * base + min(g, extra)
        return list(range(start, start + base + (g < extra)))

    def expert_rows(self, inter: int) -> tuple[int, int]:
        """This rank's rows of one routed expert's intermediate dim."""
        return split(inter, self.moe_tp_size, self.moe_tp_rank, "moe_intermediate_size")

    def vocab_rows(self, vocab: int) -> tuple[int, int] | None:
        """This rank's rows of the embedding and lm_head; None: kept whole (TP 1, or a
        vocabulary tp_size does not divide)."""
        if not self.sharded or vocab % self.tp_size:
            return None
        return split(vocab, self.tp_size, self.rank, "vocab_size")

    def dense_rows(self, inter: int, what: str = "intermediate_size") -> tuple[int, int]:
        """This rank's rows of a dense MLP's or shared expert's intermediate dim."""
        return split(inter, self.tp_size, self.rank, what)

    def check(self, spec) -> None:
        """Raises ParallelError naming what in the model cannot be cut this way."""
        self.spec_heads(spec)
        if any(spec.moe_layers):
            self.experts(spec.num_experts)
            self.expert_rows(spec.moe_intermediate_size)
        if spec.shared_expert_intermediate_size:
            self.dense_rows(spec.shared_expert_intermediate_size,
                            "shared_expert_intermediate_size")
        if not all(spec.moe_layers):
            self.dense_rows(spec.dense_intermediate_size)


def split(n: int, parts: int, index: int, what: str = "dim") -> tuple[int, int]:
    """[start, stop) of part `index` of n rows cut into `parts` equal parts."""
    if n % parts:
        raise ParallelError(f"{what} = {n} cannot be split into {parts} equal parts")
    size = n // parts
    return index * size, (index + 1) * size


def rows(span: tuple[int, int] | None) -> Part:
    return None if span is None else (0, *span)


def cols(span: tuple[int, int] | None) -> Part:
    return None if span is None else (1, *span)
