"""The scheduler process: one EngineCore behind two ZeroMQ sockets.

In (PULL, `ServerArgs.ipc_path("scheduler_in")`): AddRequests, AbortRequest, ControlRequest.
Out (PUSH, `ServerArgs.ipc_path("scheduler_out")`): Ready once the models are loaded (and warmed
up), then AddResults, BatchOutput, ControlResult; SchedulerError with the traceback if it fails.

The HTTP server binds both sockets and spawns this process; the process exits when its parent
is gone (checked each time the loop wakes while idle).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

import zmq

from sglang_crosspool.server.messages import Ready, SchedulerError, dumps, loads
from sglang_crosspool.server.scheduler_loop import SchedulerLoop

logger = logging.getLogger(__name__)


class ZmqTransport:
    def __init__(self, in_path: str, out_path: str):
        self.ctx = zmq.Context(1)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.connect(in_path)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.connect(out_path)
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)

    def recv(self, timeout_ms: int | None):
        if timeout_ms is not None and not self.poller.poll(timeout_ms):
            return None
        return loads(self.pull.recv())

    def send(self, msg) -> None:
        self.push.send(dumps(msg))

    def close(self) -> None:
        self.pull.close()
        self.push.close()
        self.ctx.term()


def use_device(device: str) -> None:
    """Makes the worker's GPU the current one, as SGLang's per-GPU workers do: Triton kernels
    and CUDA graphs launch on the current device, whatever device their tensors are on."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


def run_scheduler_process(engine_config, in_path: str, out_path: str, warmup: bool,
                          log_level: str, parent_pid: int) -> None:
    """The process's target. Never raises: failures are reported, then the process exits."""
    logging.basicConfig(level=log_level.upper(),
                        format="[%(asctime)s scheduler] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when to stop
    # SIGTERM unwinds normally, so the core stops its FFN servers and frees shared memory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    transport = ZmqTransport(in_path, out_path)
    core = None
    try:
        from sglang_crosspool.engine.tensor_parallel import make_core

        use_device(engine_config.device)
        core = make_core(engine_config)  # under --tp-size: rank 0, followers spawned
        loop = SchedulerLoop(core, transport)
        if warmup:
            loop.warmup()
        transport.send(Ready(os.getpid(), list(engine_config.model_names), core.stats()))
        logger.info("scheduler ready: %s", ", ".join(engine_config.model_names))
        loop.run(keep_going=lambda: os.getppid() == parent_pid)
        logger.info("scheduler: the server process is gone; exiting")
        core.shutdown()
    except BaseException as e:  # noqa: BLE001 - report anything, then go down
        if core is not None:
            core.shutdown()
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            msg = "".join(traceback.format_exception(e))
            logger.error("scheduler failed:\n%s", msg)
            try:
                transport.send(SchedulerError(msg))
            except zmq.ZMQError:
                pass
        transport.close()
        os._exit(0 if isinstance(e, (KeyboardInterrupt, SystemExit)) else 1)
    transport.close()
