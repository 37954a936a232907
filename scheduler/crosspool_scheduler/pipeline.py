"""The layer-wise pipeline: the order in which in-flight micro-batches use the attention worker.

While micro-batch A's hidden states are in the weights pool (its FFN submitted, not yet
waited for), micro-batch B runs its attention. For micro-batches mb0..mbM-1 (from one model or
several, each with its own layer count) the order is, layer by layer, round-robin:

    wait(mb, l-1) -> attention(mb, l) -> submit(mb, l)      for each mb, for l = 0, 1, ...

so every wait comes one full round of other micro-batches' attention after its submit. The
`Timeline` turns the recorded spans into the bubble fraction: the share of wall time the
attention worker sat blocked waiting for FFN outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION = "attention"
SUBMIT = "submit"
WAIT = "wait"


@dataclass(frozen=True)
class Op:
    kind: str  # ATTENTION | SUBMIT | WAIT
    mb: int
    layer: int


def layer_pipeline(num_layers: list[int]) -> list[Op]:
    """The op order for micro-batches with the given layer counts."""
    ops: list[Op] = []
    for layer in range(max(num_layers, default=0)):
        for mb, total in enumerate(num_layers):
            if layer >= total:
                continue
            if layer > 0:
                ops.append(Op(WAIT, mb, layer - 1))
            ops.append(Op(ATTENTION, mb, layer))
            ops.append(Op(SUBMIT, mb, layer))
    ops.extend(Op(WAIT, mb, total - 1) for mb, total in enumerate(num_layers) if total)
    return ops


@dataclass
class Span:
    kind: str  # ATTENTION, SUBMIT (send), WAIT (blocked on FFN output)
    mb: int
    layer: int
    start: float
    end: float


@dataclass
class Timeline:
    """Spans of one pipelined step on the attention worker (times in seconds)."""

    spans: list[Span] = field(default_factory=list)

    def add(self, op: Op, start: float, end: float) -> None:
        self.spans.append(Span(op.kind, op.mb, op.layer, start, end))

    @property
    def wall(self) -> float:
        if not self.spans:
            return 0.0
        return max(s.end for s in self.spans) - min(s.start for s in self.spans)

    def total(self, kind: str) -> float:
        return sum(s.end - s.start for s in self.spans if s.kind == kind)

    def bubble_fraction(self) -> float:
        """Share of the step the attention worker was blocked waiting for the weights pool."""
        return self.total(WAIT) / self.wall if self.wall > 0 else 0.0

    def ffn_round_trips(self) -> list[float]:
        """Per (mb, layer): time from the end of its submit to the end of its wait."""
        submitted = {(s.mb, s.layer): s.end for s in self.spans if s.kind == SUBMIT}
        return [s.end - submitted[(s.mb, s.layer)] for s in self.spans
                if s.kind == WAIT and (s.mb, s.layer) in submitted]

    def summary(self) -> dict:
        return {
            "wall_s": self.wall,
            "attention_s": self.total(ATTENTION),
            "submit_s": self.total(SUBMIT),
            "wait_s": self.total(WAIT),
            "bubble_fraction": self.bubble_fraction(),
            "micro_batches": len({s.mb for s in self.spans}),
        }

    def to_json(self) -> list[dict]:
        return [vars(s) for s in self.spans]
