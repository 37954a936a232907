"""End-to-end fixtures: real server processes on loopback, started once per session.

In: two tiny random checkpoints (qwen3_moe as `qwen-a`, mixtral as `mixtral-b`) made with
`make_model`. Out: `server`, a running `python -m sglang_crosspool.launch` serving both, on a
free port of 127.0.0.1; `limited_server`, a second one with an API key and a queue limit (for
401 and 503). Both are killed at the end of the session; their logs are printed if a start
fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sglang_crosspool.testing.checkpoints import make_model

MODELS = {"qwen-a": ("qwen3_moe", 1), "mixtral-b": ("mixtral", 2)}
START_TIMEOUT = 180


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen
    log: Path
    paths: dict[str, str]
    api_key: str | None = None

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(), timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.headers(), timeout=60, **kw)

    def send(self, path: str, body) -> httpx.Response:
        """POSTs `body`: JSON from an object, or raw bytes sent as they are (malformed
        bodies)."""
        if isinstance(body, bytes):
            return httpx.post(self.url + path, content=body, timeout=30,
                              headers={"content-type": "application/json", **self.headers()})
        return self.post(path, json=body)

    def internal_state(self) -> dict:
        r = self.get("/server_info")
        r.raise_for_status()
        return r.json()["internal_states"][0]

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Waits until nothing runs and no KV page is in use; returns the last state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.internal_state()
            busy = state["in_flight"] or state["kv"]["used_pages"] or any(
                m["running"] or m["waiting"] for m in state["scheduler"]["models"].values())
            if not busy or time.monotonic() > deadline:
                return state
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, paths: dict[str, str], *extra: str,
                 api_key: str | None = None) -> RunningServer:
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "sglang_crosspool.launch", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--random-seed", "0"]
    for name, path in paths.items():
        cmd += ["--model", f"{name}={path}"]
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(f"http://127.0.0.1:{port}", proc, log, paths, api_key)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"the server did not come up in {START_TIMEOUT} s:\n{log.read_text()}")


def stop_server(server: RunningServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


SERVER_DEPS = ("fastapi", "uvicorn", "uvloop", "zmq", "prometheus_client")


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory) -> dict[str, str]:
    for module in SERVER_DEPS:  # listed in requirements-server.txt
        pytest.importorskip(module)
    root = tmp_path_factory.mktemp("e2e-models")
    return {name: str(make_model(root / name, arch, seed=seed))
            for name, (arch, seed) in MODELS.items()}


@pytest.fixture(scope="session")
def server(model_paths, tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), model_paths)
    yield s
    stop_server(s)
    assert s.proc.returncode in (0, -15), s.log.read_text()


@pytest.fixture
def launch_server(tmp_path):
    """Starts servers of one test (killed at its end): launch_server(paths, *flags)."""
    started = []

    def launch(paths: dict[str, str], *extra: str, api_key: str | None = None):
        started.append(start_server(tmp_path, paths, *extra, api_key=api_key))
        return started[-1]

    yield launch
    for s in started:
        stop_server(s)


@pytest.fixture(scope="session")
def limited_server(model_paths, tmp_path_factory):
    """One model, an API key, one running request and one queued at most."""
    s = start_server(tmp_path_factory.mktemp("limited"), {"qwen-a": model_paths["qwen-a"]},
                     "--max-running-requests", "1", "--max-queued-requests", "1",
                     api_key="sk-test-key")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def launch_module_server(tmp_path_factory):
    """Like launch_server, for servers shared by the tests of one module."""
    started = []

    def launch(paths: dict[str, str], *extra: str):
        started.append(start_server(tmp_path_factory.mktemp("module-server"), paths, *extra))
        return started[-1]

    yield launch
    for s in started:
        stop_server(s)
