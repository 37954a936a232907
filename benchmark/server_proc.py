"""Starts and stops one `sglang_crosspool.launch` server process on a free loopback port.

In: {served name: checkpoint path}, a pool mode and extra launch flags. Out: a `Server` with
its URL, process and log file; `stop()` terminates it (then kills it after a grace period) and
returns the exit code. A server that exits or stays unhealthy past the timeout raises with its
log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self, grace: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(models: dict[str, str], pool_mode: str, extra: list[str], log: Path,
          timeout: float = 180.0, threads: int = 1) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_crosspool.launch", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--random-seed", "0",
           "--pool-mode", pool_mode]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    cmd += extra
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        out.write((" ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{pool_mode} server exited with {proc.returncode}:\n"
                               f"{log.read_text()}")
        if healthy(server.url):
            return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{pool_mode} server not healthy in {timeout} s:\n{log.read_text()}")
