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

    def close(self) -> None:
        """Releases connections or processes; the in-process executor holds none."""


class LocalFFNExecutor(FFNExecutor):
    """Runs every model's FFN half in this process, on the same device as attention."""

    def __init__(self, halves: dict[str, FFNHalf]):
        self.halves = halves

    def submit(self, model, layer, hidden, routing):
        return self.halves[model].forward(layer, hidden, routing)

    def wait(self, handle):
        return handle
