"""The HTTP server's side of the scheduler link: one interface, two implementations.

    client.start(loop, on_message, on_dead)   messages from the scheduler arrive on `loop`
    client.send(msg)                          from the event loop's thread only
    client.close()

`MultiprocessEngineClient` spawns the scheduler process and talks ZeroMQ over IPC paths unique
to the server; a receiver thread hands messages to the event loop and reports a dead child.
`InProcessEngineClient` runs the same `SchedulerLoop` in a thread of this process, with queues
in place of sockets (tests, and debugging without processes).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import zmq

from sglang_crosspool.server.messages import Ready, SchedulerError, dumps, loads

logger = logging.getLogger(__name__)


class SchedulerStartError(RuntimeError):
    """The scheduler did not come up; the message says why."""


class EngineClient(ABC):
    ready: Ready  # set once the scheduler is up (by wait_ready)

    def wait_ready(self, timeout: float = 600.0) -> Ready:
        return self.ready

    @abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable,
              on_dead: Callable[[str], None]) -> None: ...

    @abstractmethod
    def send(self, msg) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class MultiprocessEngineClient(EngineClient):
    def __init__(self, server_args, engine_config):
        self.ipc_dir = server_args.ipc_dir
        os.makedirs(self.ipc_dir, mode=0o700, exist_ok=True)
        self.ctx = zmq.Context(1)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.bind(server_args.ipc_path("scheduler_in"))
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(server_args.ipc_path("scheduler_out"))
        mp = multiprocessing.get_context("spawn")
        from sglang_crosspool.server.scheduler_process import run_scheduler_process

        self.proc = mp.Process(
            target=run_scheduler_process, name="sglang_crosspool-scheduler", daemon=True,
            args=(engine_config, server_args.ipc_path("scheduler_in"),
                  server_args.ipc_path("scheduler_out"), not server_args.skip_server_warmup,
                  server_args.log_level, os.getpid()))
        self.proc.start()
        self._closed = False
        self._thread: threading.Thread | None = None

    def wait_ready(self, timeout: float = 600.0) -> Ready:
        """Blocks until the scheduler reports Ready; raises SchedulerStartError if it fails."""
        try:
            self.ready = self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self.ready

    def _wait_ready(self, timeout: float) -> Ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pull.poll(200):
                msg = loads(self.pull.recv())
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, SchedulerError):
                    raise SchedulerStartError(f"the scheduler process failed to start:\n"
                                              f"{msg.message}")
                logger.warning("unexpected %s before Ready", type(msg).__name__)
            elif not self.proc.is_alive():
                raise SchedulerStartError(f"the scheduler process died while starting "
                                          f"(exit code {self.proc.exitcode})")
        raise SchedulerStartError(f"the scheduler process was not ready after {timeout:.0f} s")

    def start(self, loop, on_message, on_dead) -> None:
        def receive() -> None:
            while not self._closed:
                try:
                    if self.pull.poll(200):
                        msg = loads(self.pull.recv())
                        if isinstance(msg, SchedulerError):
                            loop.call_soon_threadsafe(on_dead, f"the scheduler process failed:\n"
                                                               f"{msg.message}")
                            return
                        loop.call_soon_threadsafe(on_message, msg)
                    elif not self.proc.is_alive():
                        loop.call_soon_threadsafe(
                            on_dead, f"the scheduler process (pid {self.proc.pid}) died with exit "
                                     f"code {self.proc.exitcode}")
                        return
                except zmq.ZMQError:
                    if not self._closed:
                        raise
                    return
                except RuntimeError:  # the event loop is closed: the server is going down
                    return

        self._thread = threading.Thread(target=receive, name="scheduler-receiver", daemon=True)
        self._thread.start()

    def send(self, msg) -> None:
        self.push.send(dumps(msg))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        self.push.close()
        self.pull.close()
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


class _QueueTransport:
    """The scheduler's end of the in-process link."""

    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        self.deliver: Callable | None = None  # set by start(); messages before it are kept
        self.early: list = []

    def recv(self, timeout_ms):
        try:
            if timeout_ms == 0:
                return self.inbox.get_nowait()
            return self.inbox.get(timeout=None if timeout_ms is None else timeout_ms / 1000)
        except queue.Empty:
            return None

    def send(self, msg) -> None:
        if self.deliver is None:
            self.early.append(msg)
        else:
            self.deliver(msg)


class InProcessEngineClient(EngineClient):
    def __init__(self, server_args, engine_config):
        from sglang_crosspool.engine.core import EngineCore
        from sglang_crosspool.server.scheduler_loop import SchedulerLoop

        self.core = EngineCore(engine_config)
        self.transport = _QueueTransport()
        self.loop_ = SchedulerLoop(self.core, self.transport)
        if not server_args.skip_server_warmup:
            self.loop_.warmup()
        self.ready = Ready(os.getpid(), list(engine_config.model_names), self.core.stats())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop, on_message, on_dead) -> None:
        def deliver(msg):
            try:
                loop.call_soon_threadsafe(on_message, msg)
            except RuntimeError:  # loop closed
                self._stop.set()

        self.transport.deliver = deliver
        for msg in self.transport.early:
            deliver(msg)

        def run():
            try:
                self.loop_.run(keep_going=lambda: not self._stop.is_set())
            except BaseException as e:  # surface a crash as a dead scheduler
                logger.exception("in-process scheduler failed")
                try:
                    loop.call_soon_threadsafe(on_dead, f"the in-process scheduler failed: {e!r}")
                except RuntimeError:
                    pass

        self._thread = threading.Thread(target=run, name="scheduler", daemon=True)
        self._thread.start()

    def send(self, msg) -> None:
        self.transport.inbox.put(msg)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.core.shutdown()
