"""Fault scenarios for tests: an FFN server killed while requests are in flight."""

from __future__ import annotations

import os
import signal
import time

from sglang_crosspool.engine.core import EngineCore
from sglang_crosspool.engine.request import EngineRequest, RequestState
from sglang_crosspool.engine.sampling_params import SamplingParams


def kill_ffn_server_mid_run(core: EngineCore, model: str, server: int = 1,
                            timeout_s: float = 30.0) -> list[RequestState]:
    """Starts 3 long requests, runs 3 steps, SIGKILLs FFN server `server`, then steps until no
    work is left (or `timeout_s`); returns the requests' states for the caller to check."""
    params = SamplingParams.from_dict({"max_new_tokens": 50, "ignore_eos": True})
    states = [core.add_request(EngineRequest(f"r{i}", model, [1, 2, 3 + i], params))
              for i in range(3)]
    for _ in range(3):
        core.step()
    victim = core.ffn.pool.procs[server]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    start = time.monotonic()
    while core.has_work() and time.monotonic() - start < timeout_s:
        core.step()
    return states
