"""An FFN server: one process of the weights pool.

In: a JSON spec (argv[1]) naming the models, the experts of each model this server owns,
whether it also holds shared experts and dense MLPs, and its link (ZeroMQ control address and
the shm layout, the cuda-ipc layout or torch.distributed rank). Out: per `Forward` message, the
partial FFN output over its experts. It reads only FFN tensors from the checkpoints: attention
weights, embeddings and lm_head never enter this process. With `echo` (benchmarks) it loads no
model and returns its input, so that only the transport and the control path are timed.

Models come and go while it serves (not on the p2p loop): `LoadModel` starts reading one
model's share of experts in a thread of its own, and Forward messages for the other models are
served meanwhile; once the share is loaded it joins the served set and `Loaded` goes back (or
`LoadFailed`). `UnloadModel` drops a model's share at once and answers `Unloaded`. To move
experts (/rebalance), a `LoadModel` with `stage` keeps the new share aside while the old one
serves, and `Swap` puts it in place between two steps.

Data-parallel attention (`--dp-size`): several attention workers, one per KV-pool device,
share this server's experts. The worker that started it is link 0 (steps, model loads,
shutdown); each other replica has a `clients` entry: a control socket it binds and a data path
of its own (shm segment or cuda-ipc buffers). It says `Attach` when its side is ready and gets
`Ready` back; from then on its `Forward` messages are served from the same weights, each
answered on the socket it came from.

    python -m sglang_crosspool.ffn.server '<json spec>'
"""

from __future__ import annotations

import concurrent.futures
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import torch
import zmq

from sglang_crosspool.config import DTYPES
from sglang_crosspool.ffn.executor import in_thread
from sglang_crosspool.ffn.p2p_server import serve_steps
from sglang_crosspool.models.checkpoint import open_checkpoint
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.cuda_ipc import IpcLayout
from sglang_crosspool.transport.links import CudaIpcEndpoint, DistEndpoint, ShmEndpoint
from sglang_crosspool.transport.p2p import FFNEnd, P2PLayout, ShmArena, SymmetricArena
from sglang_crosspool.transport.shm import ShmLayout

log = logging.getLogger("sglang_crosspool.ffn_server")
LOAD_POLL_MS = 10  # how often the loop looks at a running load while no message comes


@dataclass(frozen=True)
class FFNServerSpec:
    server_id: int
    models: dict  # name -> checkpoint path
    experts: dict  # name -> expert ids owned here
    with_shared: bool  # holds shared experts and dense MLP layers
    device: str
    dtype: str
    control_addr: str
    transport: str  # "shm", "cuda-ipc", "dist" or "nccl"
    shm: dict | None = None  # ShmLayout fields
    ipc: dict | None = None  # IpcLayout fields
    dist: dict | None = None  # backend, init_method, world_size
    p2p: dict | None = None  # P2PLayout fields, and "shm": the CPU arena's name prefix
    # benchmarks: model name -> hidden size (or p2p: {"hidden", "layers", "top_k"}); no
    # weights, FFN(h) = h
    echo: dict | None = None
    load_format: str = "auto"
    # data-parallel replicas: per replica, {"replica", "control_addr", "shm" | "ipc" layout}
    clients: tuple = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def load_halves(spec: FFNServerSpec) -> tuple[dict, list[str]]:
    """This server's FFN halves, and the names of every tensor read to build them."""
    halves, keys = {}, []
    for name, path in spec.models.items():
        halves[name], read = load_half(path, spec.experts[name], spec.with_shared,
                                       spec.device, spec.dtype, spec.load_format)
        keys.extend(f"{name}:{key}" for key in sorted(read))
    return halves, keys


def load_half(path: str, experts, with_shared: bool, device: str, dtype: str,
              load_format: str):
    """One model's FFN half over `experts`, and the checkpoint tensors read for it."""
    model_spec, arch = resolve(path)
    files = open_checkpoint(path, load_format, device)
    half = arch.ffn_cls(model_spec, files, torch.device(device), DTYPES[dtype],
                        experts=list(experts), with_shared=with_shared)
    return half, files.read_keys


class ModelSet:
    """The models this server holds, as they are loaded and unloaded while it serves."""

    def __init__(self, spec: FFNServerSpec, sock, endpoint, halves: dict):
        self.spec, self.sock, self.endpoint, self.halves = spec, sock, endpoint, halves
        self.loading: dict[str, object] = {}  # name -> Future of (half, keys read)
        self.staging: set[str] = set()  # loads whose share waits for Swap
        self.staged: dict[str, object] = {}  # name -> the share that Swap puts in place

    @property
    def busy(self) -> bool:
        return bool(self.loading)

    def handle(self, msg) -> bool:
        """Takes a LoadModel or UnloadModel; False for any other message."""
        if isinstance(msg, m.LoadModel):
            if msg.stage:
                self.staging.add(msg.name)
            elif msg.name in self.halves or msg.name in self.loading:
                self._send(m.LoadFailed(self.spec.server_id, msg.name,
                                        f"model {msg.name!r} is already here"))
                return True
            spec = self.spec
            self.loading[msg.name] = in_thread(
                lambda: load_half(msg.path, msg.experts, msg.with_shared, spec.device,
                                  spec.dtype, msg.load_format), f"load-{msg.name}")
            return True
        if isinstance(msg, m.Swap):
            if msg.name in self.staging:  # given up while loading: let it finish, drop it
                concurrent.futures.wait([self.loading.pop(msg.name)])
                self.staging.discard(msg.name)
            staged = self.staged.pop(msg.name, None)
            if msg.keep and staged is not None:
                self.halves[msg.name] = staged
                self.endpoint.hidden_sizes[msg.name] = staged.spec.hidden_size
            del staged
            if torch.device(self.spec.device).type == "cuda":
                torch.cuda.empty_cache()
            self._send(m.Swapped(self.spec.server_id, msg.name, self._bytes()))
            return True
        if isinstance(msg, m.UnloadModel):
            loading = self.loading.pop(msg.name, None)
            if loading is not None:  # given up: let it finish, then drop it
                concurrent.futures.wait([loading])
            half = self.halves.pop(msg.name, None)
            freed = half.nbytes() if half is not None else 0
            del half  # NOTE: no gc.collect(): it stalls the loop ~0.4 s; halves hold no cycles
            if torch.device(self.spec.device).type == "cuda":
                torch.cuda.empty_cache()  # back to the device, not kept by the allocator
            self._send(m.Unloaded(self.spec.server_id, msg.name, freed, self._bytes()))
            return True
        return False

    def finish(self) -> None:
        """Adds every model whose load is done to the served set and says so."""
        for name, future in list(self.loading.items()):
            if not future.done():
                continue
            del self.loading[name]
            error = future.exception()
            if error is not None:
                self.staging.discard(name)
                log.error("loading model %s failed: %s", name, error)
                self._send(m.LoadFailed(self.spec.server_id, name,
                                        f"{type(error).__name__}: {error}"))
                continue
            half, _ = future.result()
            if name in self.staging:
                self.staging.discard(name)
                self.staged[name] = half
                self._send(m.Loaded(self.spec.server_id, name, half.nbytes(), self._bytes()))
                continue
            self.halves[name] = half
            self.endpoint.hidden_sizes[name] = half.spec.hidden_size
            self._send(m.Loaded(self.spec.server_id, name, half.nbytes(), self._bytes()))

    def _bytes(self) -> int:
        return sum(h.nbytes() for h in self.halves.values())

    def _send(self, msg) -> None:
        self.sock.send(m.encode(msg))


class EchoFFN:
    """A stand-in FFN half for transport benchmarks: no weights, returns its input."""

    def __init__(self, shape=None):
        # p2p: the model's shape as the step runner reads it off `spec`
        if isinstance(shape, dict):
            self.spec = _EchoSpec(shape["hidden"], shape["layers"], shape["top_k"],
                                  [shape["top_k"] > 0] * shape["layers"])

    def forward(self, layer: int, h: torch.Tensor, routing) -> torch.Tensor:
        return h

    def nbytes(self) -> int:
        return 0


@dataclass(frozen=True)
class _EchoSpec:
    hidden_size: int
    num_layers: int
    top_k: int
    moe_layers: list


def serve(spec: FFNServerSpec) -> None:
    torch.set_num_threads(1)
    device = torch.device(spec.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # current stream and NCCL device of this process
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(spec.control_addr)
    if spec.dist is not None:
        import torch.distributed as dist

        extra = {"device_id": device} if spec.p2p is not None else {}
        dist.init_process_group(spec.dist["backend"], init_method=spec.dist["init_method"],
                                rank=spec.server_id + 1, world_size=spec.dist["world_size"],
                                **extra)
    # p2p: the arena first (collective with the attention worker), then the weights.
    endpoint = _p2p_end(spec, device) if spec.p2p is not None else None
    if spec.echo is not None:
        halves, keys_read = {n: EchoFFN(shape) for n, shape in spec.echo.items()}, []
        sizes = {n: s if isinstance(s, int) else s["hidden"] for n, s in spec.echo.items()}
    else:
        halves, keys_read = load_halves(spec)
        sizes = {name: h.spec.hidden_size for name, h in halves.items()}
    endpoint = endpoint or _endpoint(spec, sizes)
    try:
        if isinstance(endpoint, CudaIpcEndpoint) and not _swap_handles(sock, endpoint):
            return
        ffn_bytes = sum(h.nbytes() for h in halves.values())
        sock.send(m.encode(m.Ready(spec.server_id, os.getpid(), ffn_bytes, tuple(keys_read),
                                  spec.experts)))
        log.info("FFN server %d ready: %d bytes of FFN weights", spec.server_id, ffn_bytes)
        if isinstance(endpoint, FFNEnd):
            serve_steps(sock, endpoint, halves, spec.server_id)
        else:
            models = ModelSet(spec, sock, endpoint, halves)
            replicas = [Replica(ctx, c, spec, endpoint.hidden_sizes, models)
                        for c in spec.clients]
            try:
                _loop(sock, endpoint, models, replicas)
            finally:
                for r in replicas:
                    r.close()
    finally:
        endpoint.close()
        sock.close(linger=0)
        ctx.term()


def _endpoint(spec: FFNServerSpec, sizes: dict[str, int]):
    if spec.transport == "shm":
        return ShmEndpoint(ShmLayout(**spec.shm), sizes, spec.device)
    if spec.transport == "cuda-ipc":
        return CudaIpcEndpoint(IpcLayout(**spec.ipc), spec.device, sizes)
    return DistEndpoint(sizes, DTYPES[spec.dtype], spec.device, spec.dist["backend"])


def _p2p_end(spec: FFNServerSpec, device: torch.device) -> FFNEnd:
    fields = dict(spec.p2p)
    shm = fields.pop("shm")
    layout = P2PLayout(**fields)
    arena = ShmArena(layout, shm, create=False) if shm else SymmetricArena(layout, device)
    return FFNEnd(layout, arena, spec.server_id, device)


def _swap_handles(sock, endpoint: CudaIpcEndpoint) -> bool:
    """cuda-ipc start-up: sends this server's buffers and events, maps the attention side's.
    False if told to shut down (or orphaned) first."""
    sock.send(m.encode(m.IpcHandles(endpoint.share())))
    parent = os.getppid()
    while not sock.poll(1000):
        if os.getppid() != parent:
            return False
    msg = m.decode(sock.recv())
    if not isinstance(msg, m.IpcHandles):
        return False
    endpoint.attach(msg.handles)
    return True


class Replica:
    """Another attention worker's link to this server (data-parallel attention): its control
    socket, connected here, and its data path, opened when it says Attach."""

    def __init__(self, ctx, client: dict, spec: FFNServerSpec, hidden_sizes: dict,
                 models: ModelSet):
        self.client, self.spec, self.hidden_sizes, self.models = client, spec, hidden_sizes, models
        self.sock = ctx.socket(zmq.PAIR)
        self.sock.connect(client["control_addr"])
        self.endpoint = None

    def attach(self) -> None:
        """Opens the replica's data path (its shm segment exists by now; cuda-ipc: handles
        both ways) and says Ready."""
        if self.client.get("ipc") is not None:
            endpoint = CudaIpcEndpoint(IpcLayout(**self.client["ipc"]), self.spec.device,
                                       self.hidden_sizes)
            self.sock.send(m.encode(m.IpcHandles(endpoint.share())))
            if not self.sock.poll(30_000):
                raise RuntimeError(f"replica {self.client['replica']}: no cuda-ipc handles")
            endpoint.attach(m.decode(self.sock.recv()).handles)
        else:
            endpoint = ShmEndpoint(ShmLayout(**self.client["shm"]), self.hidden_sizes,
                                   self.spec.device)
        self.endpoint = endpoint
        self.sock.send(m.encode(m.Ready(self.spec.server_id, os.getpid(), self.models._bytes(),
                                        (), self.spec.experts)))

    def close(self) -> None:  # twice is fine: a failed attach closes it before the end
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        self.sock.close(linger=0)


def _loop(sock, endpoint, models: ModelSet, replicas: list[Replica] = ()) -> None:
    parent, halves = os.getppid(), models.halves
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    replica_of = {}
    for r in replicas:
        poller.register(r.sock, zmq.POLLIN)
        replica_of[r.sock] = r
    checked = time.monotonic()
    with torch.inference_mode():
        while True:
            models.finish()
            ready = dict(poller.poll(LOAD_POLL_MS if models.busy else 1000))
            # NOTE: checked while busy too: other replicas may keep an orphan busy.
            if not ready or time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if os.getppid() != parent:
                    log.error("parent process %d is gone; exiting", parent)
                    return
            for s in ready:
                msg = m.decode(s.recv())
                replica = replica_of.get(s)
                if replica is None:  # link 0: the worker that started this server
                    if isinstance(msg, m.Shutdown):
                        return
                    if not models.handle(msg):
                        _forward(s, endpoint, halves, msg)
                elif isinstance(msg, m.Attach):
                    try:
                        replica.attach()
                    except Exception:  # that replica only: the others keep their link
                        log.exception("replica %d could not attach", replica.client["replica"])
                        poller.unregister(s)
                        replica.close()
                else:
                    _forward(s, replica.endpoint, halves, msg)


def _forward(sock, endpoint, halves: dict, msg: m.Forward) -> None:
    """One layer of one micro-batch, answered on the socket it came from."""
    hidden, routing = endpoint.read(msg)
    try:
        out = halves[msg.model].forward(msg.layer, hidden, routing)
    except Exception as e:  # report, keep serving other requests
        log.exception("FFN forward failed")
        sock.send(m.encode(m.Failed(msg.slot, f"{type(e).__name__}: {e}")))
        return
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
