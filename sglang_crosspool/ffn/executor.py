"""The FFN-executor contract, and the in-process executor.

`submit` hands one layer's FFN work for one micro-batch to wherever the FFN weights live and
returns a handle at once; `wait` returns the summed FFN output. The split lets the layer-wise
pipeline run another micro-batch's attention between the two. The in-process executor does the
work inside `submit`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from sglang_crosspool.models.common import FFNHalf, Routing


class FFNExecutor(ABC):
    @abstractmethod
    def submit(self, model: str, layer: int, hidden: torch.Tensor, routing: Routing) -> object:
        """Starts FFN(hidden) for one layer; `hidden` must not be modified until `wait`."""

    @abstractmethod
    def wait(self, handle: object) -> torch.Tensor:
        """The FFN output [tokens, hidden] of a submitted call."""

    def forward(self, model: str, layer: int, hidden: torch.Tensor, routing: Routing):
        return self.wait(self.submit(model, layer, hidden, routing))

    def wait_residual(self, handle: object, x: torch.Tensor) -> torch.Tensor:
        """x + the FFN output of a submitted call (a transport may fuse the add)."""
        return x + self.wait(handle)

    def forward_residual(self, model: str, layer: int, x: torch.Tensor, hidden: torch.Tensor,
                         routing: Routing) -> torch.Tensor:
        return self.wait_residual(self.submit(model, layer, hidden, routing), x)

    # -- per step (the p2p crossing announces each step once; others need nothing) ---------
    supports_graphs = False  # whether a decode step through this executor can be captured

    def begin_step(self, plan, graph: bool = False) -> None:
        """Before a step's first crossing: per micro-batch (model, tokens), in slot order;
        `graph` when the step is a replay of graphs captured under `capture(plan)`."""

    def end_step(self) -> None:
        """After a step's outputs were used; raises FFNServerError if the step failed."""

    def capture(self, plan):
        """Context manager around the capture of a decode step of `plan`."""
        import contextlib

        return contextlib.nullcontext()

    def close(self) -> None:
        """Releases connections or processes; the in-process executor holds none."""

    def failure(self) -> str | None:
        """Why this executor can serve no more (a dead FFN server), or None; cheap enough to
        ask once a second."""
        return None

    def recover(self) -> bool:
        """After a failure: restarts what died, where the transport allows it, and blocks until
        it serves again; False if it cannot. Raises FFNServerError if a restart fails."""
        return False

    def local_bytes(self) -> int:
        """Bytes of FFN weights held in this process."""
        return 0

    def server_bytes(self) -> list[int]:
        """Bytes of FFN weights held by each FFN server (this process counts as one if local)."""
        return [self.local_bytes()]


class LocalFFNExecutor(FFNExecutor):
    """Runs every model's FFN in this process, on the same device as attention.

    A model's FFN may be one half or several expert subsets (crosspool with the `local`
    transport: in-process FFN servers), whose partial outputs are summed.
    """

    supports_graphs = True

    def __init__(self, halves: dict[str, FFNHalf | list[FFNHalf]]):
        self.halves = {k: v if isinstance(v, list) else [v] for k, v in halves.items()}

    def submit(self, model, layer, hidden, routing):
        parts = self.halves[model]
        out = parts[0].forward(layer, hidden, routing)
        for part in parts[1:]:
            out = out + part.forward(layer, hidden, routing)
        return out

    def wait(self, handle):
        return handle

    def local_bytes(self) -> int:
        return sum(self.server_bytes())

    def server_bytes(self) -> list[int]:
        """Per in-process FFN server (expert subset), summed over models."""
        servers = max(len(parts) for parts in self.halves.values())
        return [sum(parts[i].nbytes() for parts in self.halves.values() if i < len(parts))
                for i in range(servers)]
