"""The FFN-executor contract, and the in-process executor.

`submit` hands one layer's FFN work for one micro-batch to wherever the FFN weights live and
returns a handle at once; `wait` returns the summed FFN output. The split lets the layer-wise
pipeline run another micro-batch's attention between the two. The in-process executor does the
work inside `submit`.

Models come and go while serving (`engine/live_models.py`): `begin_load` starts loading one
model's FFN half (or its expert shares) off the step and returns an `FFNLoad` to poll;
`commit` makes it routable; `unload_model` frees it. `begin_reshard` moves a model's experts
to other FFN servers (/rebalance): the new shares load while the old ones serve, and `commit`
swaps them between two steps. An executor that cannot do this says why in
`live_models_refused`.
"""

from __future__ import annotations

import concurrent.futures
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

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

    # -- the model set ----------------------------------------------------------------------

    def live_models_refused(self) -> str | None:
        """Why this executor cannot load or unload models while serving; None when it can."""
        return f"{type(self).__name__} cannot load or unload models while serving"

    def begin_load(self, name: str, path: str, shares: list[list[int]], dtype: str,
                   load_format: str) -> FFNLoad:
        """Starts loading model `name`'s FFN (experts `shares[i]` on FFN server i; server 0
        also the shared experts and dense MLPs) without blocking the step loop."""
        raise NotImplementedError(self.live_models_refused())

    def unload_model(self, name: str) -> int:
        """Frees model `name`'s FFN weights (no step may use it any more); returns the bytes
        freed."""
        raise NotImplementedError(self.live_models_refused())

    def shares(self, name: str) -> list[list[int]]:
        """Model `name`'s expert ids per FFN server, as served now."""
        raise NotImplementedError(self.live_models_refused())

    def begin_reshard(self, name: str, path: str, shares: list[list[int]], dtype: str,
                      load_format: str) -> FFNLoad:
        """Starts moving model `name`'s experts to `shares` while the current ones serve;
        the returned load's `commit` (between steps) switches to the new shares."""
        raise NotImplementedError(self.live_models_refused())


class FFNLoad(ABC):
    """One model's FFN on its way in: poll until done, then commit (or cancel)."""

    @abstractmethod
    def poll(self) -> bool:
        """True once every part is loaded; raises (FFNLoadError) if a part failed."""

    @abstractmethod
    def commit(self) -> int:
        """Makes the model routable; returns the FFN bytes it added."""

    @abstractmethod
    def cancel(self) -> None:
        """Frees whatever was loaded (after a failure, or when the load is given up)."""


class FFNLoadError(RuntimeError):
    """A part of a model's FFN failed to load; the message says which and why."""


def in_thread(fn: Callable, name: str) -> concurrent.futures.Future:
    """fn() in a daemon thread of its own; its result or exception in the returned Future."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            with torch.inference_mode():
                future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - the poller re-raises it
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future

    def server_bytes(self) -> list[int]:
        """Bytes of FFN weights held by each FFN server (this process counts as one if local)."""
        return [self.local_bytes()]


class LocalFFNExecutor(FFNExecutor):
    """Runs every model's FFN in this process, on the same device as attention.

    A model's FFN may be one half or several expert subsets (crosspool with the `local`
    transport: in-process FFN servers), whose partial outputs are summed.
    """

    supports_graphs = True

    def __init__(self, halves: dict[str, FFNHalf | list[FFNHalf]],
                 device: torch.device | str = "cpu"):
        self.halves = {k: v if isinstance(v, list) else [v] for k, v in halves.items()}
        self.device = torch.device(device)  # where models loaded later go

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

    def live_models_refused(self) -> str | None:
        return None

    def begin_load(self, name, path, shares, dtype, load_format) -> FFNLoad:
        from sglang_crosspool.ffn.factory import build_halves

        device = self.device
        future = in_thread(lambda: build_halves(path, shares, device, dtype, load_format),
                           f"load-ffn-{name}")
        return _LocalLoad(self, name, future)

    def unload_model(self, name: str) -> int:
        parts = self.halves.pop(name)
        return sum(p.nbytes() for p in parts)

    def shares(self, name: str) -> list[list[int]]:
        return [list(part.experts) for part in self.halves[name]]

    def begin_reshard(self, name, path, shares, dtype, load_format) -> FFNLoad:
        return self.begin_load(name, path, shares, dtype, load_format)  # commit replaces


    def server_bytes(self) -> list[int]:
        """Per in-process FFN server (expert subset), summed over models."""
        servers = max((len(parts) for parts in self.halves.values()), default=1)
        return [sum(parts[i].nbytes() for parts in self.halves.values() if i < len(parts))
                for i in range(servers)]


class _LocalLoad(FFNLoad):
    def __init__(self, executor: LocalFFNExecutor, name: str,
                 future: concurrent.futures.Future):
        self.executor, self.name, self.future = executor, name, future

    def poll(self) -> bool:
        if not self.future.done():
            return False
        error = self.future.exception()
        if error is not None:
            raise FFNLoadError(f"loading the FFN weights failed: {type(error).__name__}: "
                               f"{error}") from error
        return True

    def commit(self) -> int:
        parts = self.future.result()
        self.executor.halves[self.name] = parts
        return sum(p.nbytes() for p in parts)

    def cancel(self) -> None:
        self.future.cancel()  # a running load finishes in its thread and is dropped

