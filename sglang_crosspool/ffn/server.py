"""An FFN server: one process of the weights pool.

In: a JSON spec (argv[1]) naming the models, the experts of each model this server owns,
whether it also holds shared experts and dense MLPs, and its link (ZeroMQ control address and
the shm layout or torch.distributed rank). Out: per `Forward` message, the partial FFN output
over its experts. It reads only FFN tensors from the checkpoints: attention weights, embeddings
and lm_head never enter this process.

    python -m sglang_crosspool.ffn.server '<json spec>'
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
from dataclasses import asdict, dataclass

import torch
import zmq

from sglang_crosspool.config import DTYPES
from sglang_crosspool.models.checkpoint import CheckpointFiles
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.links import DistEndpoint, ShmEndpoint
from sglang_crosspool.transport.shm import ShmLayout

log = logging.getLogger("sglang_crosspool.ffn_server")


@dataclass(frozen=True)
class FFNServerSpec:
    server_id: int
    models: dict  # name -> checkpoint path
    experts: dict  # name -> expert ids owned here
    with_shared: bool  # holds shared experts and dense MLP layers
    device: str
    dtype: str
    control_addr: str
    transport: str  # "shm" or "dist"
    shm: dict | None = None  # ShmLayout fields
    dist: dict | None = None  # backend, init_method, world_size

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def load_halves(spec: FFNServerSpec) -> tuple[dict, list[str]]:
    """This server's FFN halves, and the names of every tensor read to build them."""
    halves, keys = {}, []
    for name, path in spec.models.items():
        model_spec, arch = resolve(path)
        files = CheckpointFiles(path)
        halves[name] = arch.ffn_cls(model_spec, files, torch.device(spec.device),
                                    DTYPES[spec.dtype], experts=spec.experts[name],
                                    with_shared=spec.with_shared)
        keys.extend(f"{name}:{key}" for key in sorted(files.read_keys))
    return halves, keys


def serve(spec: FFNServerSpec) -> None:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(spec.control_addr)
    if spec.transport == "dist":
        import torch.distributed as dist

        dist.init_process_group(spec.dist["backend"], init_method=spec.dist["init_method"],
                                rank=spec.server_id + 1, world_size=spec.dist["world_size"])
    halves, keys_read = load_halves(spec)
    if spec.transport == "shm":
        endpoint = ShmEndpoint(ShmLayout(**spec.shm))
    else:
        sizes = {name: h.spec.hidden_size for name, h in halves.items()}
        endpoint = DistEndpoint(sizes, DTYPES[spec.dtype])
    ffn_bytes = sum(h.nbytes() for h in halves.values())
    sock.send(m.encode(m.Ready(spec.server_id, os.getpid(), ffn_bytes, tuple(keys_read),
                              spec.experts)))
    log.info("FFN server %d ready: %d bytes of FFN weights", spec.server_id, ffn_bytes)
    try:
        _loop(sock, endpoint, halves)
    finally:
        endpoint.close()
        sock.close(linger=0)
        ctx.term()


def _loop(sock, endpoint, halves) -> None:
    parent = os.getppid()
    with torch.inference_mode():
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:  # the attention worker died: nothing to serve
                    log.error("parent process %d is gone; exiting", parent)
                    return
                continue
            msg = m.decode(sock.recv())
            if isinstance(msg, m.Shutdown):
                return
            hidden, routing = endpoint.read(msg)
            try:
                out = halves[msg.model].forward(msg.layer, hidden, routing)
            except Exception as e:  # report, keep serving other requests
                log.exception("FFN forward failed")
                sock.send(m.encode(m.Failed(msg.slot, f"{type(e).__name__}: {e}")))
                continue
            endpoint.write(msg, out)
            sock.send(m.encode(m.Done(msg.slot)))
            if isinstance(endpoint, DistEndpoint):
                endpoint.send_output()


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a server is stuck
    logging.basicConfig(level=os.environ.get("SGLANG_CROSSPOOL_LOG", "WARNING"),
                        format="%(asctime)s ffn-server %(levelname)s %(message)s")
    serve(FFNServerSpec(**json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
