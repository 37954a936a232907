"""Fault scenarios for tests: an FFN server killed while requests are in flight; the FFN
server processes of a running server, found through /proc."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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


def failed_cleanly(core: EngineCore, states: list[RequestState], model: str,
                   server: int) -> list[str]:
    """What is wrong after `kill_ffn_server_mid_run` (empty when nothing is): every request
    ended with an abort naming FFN server `server`, no KV page is left in use, and a new
    request is refused as unavailable with that name."""
    from sglang_crosspool.engine.core import EngineUnavailable

    name = f"FFN server {server}"
    problems = []
    if core.has_work():
        problems.append("requests are still scheduled")
    for state in states:
        reason = state.finish_reason or {}
        if reason.get("type") != "abort" or name not in reason.get("message", ""):
            problems.append(f"{state.req.rid} ended with {reason}")
    if core.stats()["kv"]["used_pages"]:
        problems.append(f"{core.stats()['kv']['used_pages']} KV pages still in use")
    try:
        core.add_request(EngineRequest("late", model, [1, 2], SamplingParams()))
        problems.append("a new request was accepted")
    except EngineUnavailable as e:
        if name not in str(e):
            problems.append(f"the refusal does not name {name}: {e}")
    return problems


def ffn_server_pids(scheduler_pid: int) -> list[int]:
    """The pids of the FFN server processes a scheduler process started (Linux: /proc)."""
    return child_pids(scheduler_pid, b"sglang_crosspool.ffn.server")


def child_pids(parent: int, marker: bytes = b"") -> list[int]:
    """The running (not zombie) children of process `parent` whose command line holds
    `marker` (Linux: /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == parent and state != "Z" and marker in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)
