"""The weights pool seen from the attention worker: FFN server processes and their executor.

`FFNServerPool` starts one process per FFN server, hands each its share of every model's
experts (expert e of model m lives in exactly one server, for all layers; server 0 also holds
shared experts and dense MLPs), waits until every server reports ready, and watches them;
with the shm transport it can start a dead server again (`restart_dead`).
`RemoteFFNExecutor` sends each layer's hidden states and routing only to the servers owning
at least one chosen expert and sums their partial outputs. It loads and unloads models while
serving (`begin_load`, `unload_model`): the servers read a new model's experts in a thread
while they keep answering steps; a server restarted later loads the live set.

Data-parallel attention (`--dp-size N`): replica 0 starts the FFN servers as above and tells
each the links of replicas 1..N-1 (`replica_link`: a socket path and a shm segment or cuda-ipc
layout, named from the server's folder, so every replica derives the same names on its own).
Replicas 1..N-1 start no process: `AttachedFFNPool` binds their sockets, makes their data
paths and waits for each server's Ready, and `RemoteFFNExecutor` runs on it unchanged. The
experts exist once, in the servers' memory, whatever N is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from sglang_crosspool.ffn.executor import FFNExecutor, FFNLoad, FFNLoadError
from sglang_crosspool.ffn.server import FFNServerSpec
from sglang_crosspool.models.common import Routing
from sglang_crosspool.transport import messages as m
from sglang_crosspool.transport.cuda_ipc import IpcLayout
from sglang_crosspool.transport.links import (
    CudaIpcLink,
    DistLink,
    FFNServerError,
    P2PLink,
    ShmLink,
)
from sglang_crosspool.transport.p2p import AttentionEnd, P2PLayout, ShmArena, SymmetricArena
from sglang_crosspool.transport.shm import ShmLayout


@dataclass(frozen=True)
class PoolSpec:
    models: dict  # served name -> checkpoint path
    placement: dict  # name -> per server, expert ids
    device: str  # of the FFN servers
    dtype: str
    transport: str  # "p2p" | "shm" | "cuda-ipc" | "dist" | "nccl"
    max_tokens: int  # per micro-batch
    hidden: int  # largest hidden size over the models
    max_top_k: int
    slots: int = 2  # micro-batches in flight at once
    dist_backend: str = "gloo"  # "dist"; "nccl" always uses nccl
    start_timeout_s: float = 300.0
    attention_device: str = "cpu"  # of this process: where outputs land
    echo: dict | None = None  # benchmarks: servers hold no model, FFN(h) = h (name -> hidden)
    load_format: str = "auto"  # models/checkpoint.open_checkpoint
    step_timeout_s: float = 20.0  # p2p: bound of every device-side wait
    replicas: int = 1  # data-parallel attention workers sharing these servers (shm, cuda-ipc)
    link_dir: str | None = None  # replicas > 1: the folder their sockets live in

    @property
    def servers(self) -> int:
        return len(next(iter(self.placement.values())))


def replica_link(spec: PoolSpec, replica: int, server: int) -> dict:
    """Replica `replica`'s link to FFN server `server`: its control address (bound by the
    replica) and its data path's layout (made by the replica), as FFNServerSpec.clients
    holds them."""
    if spec.transport not in ("shm", "cuda-ipc"):
        raise ValueError(f"data-parallel attention shares FFN servers over shm or cuda-ipc, "
                         f"not {spec.transport!r}")
    tag = hashlib.sha1(spec.link_dir.encode()).hexdigest()[:10]
    link = {"replica": replica,
            "control_addr": f"ipc://{spec.link_dir}/ffn-r{replica}-s{server}.sock",
            "shm": None, "ipc": None}
    if spec.transport == "shm":
        link["shm"] = vars(ShmLayout(f"cp{tag}-r{replica}-{server}", spec.slots,
                                     spec.max_tokens, spec.hidden, spec.max_top_k, spec.dtype))
    else:
        link["ipc"] = vars(IpcLayout(spec.slots, spec.max_tokens, spec.hidden, spec.max_top_k,
                                     spec.dtype))
    return link


class FFNServerPool:
    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.uid = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._dir = tempfile.mkdtemp(prefix=f"crosspool-{self.uid}-")
        self.ctx = zmq.Context()
        self.procs: list[subprocess.Popen] = []
        self._servers: list[FFNServerSpec] = []  # as started; a restart starts them again
        self._restarts = 0
        self.links = []
        self.ready: list[m.Ready] = []
        self.end: AttentionEnd | None = None  # p2p: this side of the crossing
        self._shm_arena: ShmArena | None = None
        self._p2p = spec.transport == "p2p"
        on_cuda = torch.device(spec.attention_device).type == "cuda"
        # p2p on CUDA: the process group only carries SymmetricMemory's start-up exchange.
        self._dist = spec.transport in ("dist", "nccl") or (self._p2p and on_cuda)
        self._backend = "nccl" if spec.transport in ("nccl", "p2p") else spec.dist_backend
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        spec = self.spec
        world = spec.servers + 1
        init_method = f"tcp://127.0.0.1:{_free_port()}" if self._dist else None
        p2p = shm_arena = None
        if self._p2p:
            p2p = P2PLayout(spec.servers, spec.slots, spec.max_tokens, spec.hidden,
                            spec.max_top_k, spec.dtype, spec.step_timeout_s)
            if not self._dist:  # CPU: shared-memory segments, made before the servers start
                shm_arena = self._shm_arena = ShmArena(p2p, f"cp{self.uid}p", create=True)
        if spec.replicas > 1:  # the other replicas watch this process while they attach
            Path(spec.link_dir, "replica0.pid").write_text(str(os.getpid()))
        socks = []
        for i in range(spec.servers):
            sock = self.ctx.socket(zmq.PAIR)
            addr = f"ipc://{self._dir}/ffn{i}.sock"
            sock.bind(addr)
            socks.append(sock)
            shm = ShmLayout(f"cp{self.uid}-{i}", spec.slots, spec.max_tokens, spec.hidden,
                            spec.max_top_k, spec.dtype)
            ipc = IpcLayout(spec.slots, spec.max_tokens, spec.hidden, spec.max_top_k, spec.dtype)
            server = FFNServerSpec(
                server_id=i, models=spec.models,
                experts={name: shares[i] for name, shares in spec.placement.items()},
                with_shared=i == 0, device=spec.device, dtype=spec.dtype, control_addr=addr,
                transport=spec.transport,
                shm=vars(shm) if spec.transport == "shm" else None,
                ipc=vars(ipc) if spec.transport == "cuda-ipc" else None,
                dist={"backend": self._backend, "init_method": init_method,
                      "world_size": world} if self._dist else None,
                p2p=dict(vars(p2p), shm=shm_arena and f"cp{self.uid}p") if p2p else None,
                echo=spec.echo, load_format=spec.load_format,
                clients=tuple(replica_link(spec, r, i) for r in range(1, spec.replicas)))
            self.links.append(self._link(sock, i, shm, ipc))
            self._servers.append(server)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "sglang_crosspool.ffn.server", server.to_json()]))
        if self._dist:
            import torch.distributed as dist

            extra = {}
            if self._p2p:
                extra["device_id"] = _cuda_device(spec.attention_device)
            dist.init_process_group(self._backend, init_method=init_method, rank=0,
                                    world_size=world, **extra)
        if self._p2p:
            # NOTE: collective with every server, which builds its arena before loading weights.
            arena = shm_arena or SymmetricArena(p2p, _cuda_device(spec.attention_device))
            self.end = AttentionEnd(p2p, arena, spec.attention_device)
        self.ready = [self._await_ready(i, sock) for i, sock in enumerate(socks)]

    def _link(self, sock, i: int, shm: ShmLayout, ipc: IpcLayout):
        spec, alive = self.spec, self._alive_check(i)
        if self._p2p:
            return P2PLink(sock, i, alive)
        if self._dist:
            return DistLink(sock, i, alive, getattr(torch, spec.dtype), spec.attention_device,
                            self._backend)
        if spec.transport == "cuda-ipc":
            return CudaIpcLink(sock, i, alive, ipc, spec.attention_device)
        # Creates the segment before the child starts.
        return ShmLink(sock, i, alive, shm, spec.attention_device)

    def _alive_check(self, i: int):
        def check() -> str | None:
            code = self.procs[i].poll() if i < len(self.procs) else None
            return None if code is None else f"(pid {self.procs[i].pid}) exited with code {code}"

        return check

    def _await_ready(self, i: int, sock) -> m.Ready:
        deadline = time.monotonic() + self.spec.start_timeout_s
        while time.monotonic() < deadline:
            if sock.poll(100):
                msg = m.decode(sock.recv())
                if isinstance(msg, m.IpcHandles):  # cuda-ipc: map its buffers, share ours
                    self.links[i].attach(msg.handles)
                    continue
                return msg
            death = self.links[i].alive()
            if death:
                raise FFNServerError(f"FFN server {i} {death} during start-up")
        raise FFNServerError(f"FFN server {i} not ready after {self.spec.start_timeout_s} s")

    def failure(self) -> str | None:
        """Which FFN server exited, or None while all run."""
        for i, link in enumerate(self.links):
            death = link.alive()
            if death:
                return f"FFN server {i} {death}"
        return None

    def can_restart(self) -> bool:
        """Only shm servers come back alone: their segments outlive them, while the other
        transports share a process group, CUDA mappings or a p2p arena with the dead one.
        Not with data-parallel replicas: they would have to attach again."""
        return self.spec.transport == "shm" and self.spec.replicas == 1

    def restart_dead(self) -> list[int]:
        """Starts every FFN server that died again, each on a fresh control socket, and blocks
        until they have loaded their experts; the servers alive drop what was in flight.
        Returns the restarted ones; raises FFNServerError if one does not come up."""
        dead = [i for i, proc in enumerate(self.procs) if proc.poll() is not None]
        for i, link in enumerate(self.links):
            if i in dead:
                link.sock.close(linger=0)
                self._restarts += 1
                # NOTE: a new path: closing the old socket unlinks its path asynchronously.
                addr = f"ipc://{self._dir}/ffn{i}-{self._restarts}.sock"
                sock = self.ctx.socket(zmq.PAIR)
                sock.bind(addr)
                self._servers[i] = dataclasses.replace(self._servers[i], control_addr=addr)
                self.procs[i] = subprocess.Popen([sys.executable, "-m",
                                                  "sglang_crosspool.ffn.server",
                                                  self._servers[i].to_json()])
                link.reconnect(sock)
            else:  # late answers to the failed step must not answer the next one
                while link.sock.poll(200):
                    link.sock.recv()
                link.reconnect(link.sock)
        for i in dead:
            self.ready[i] = self._await_ready(i, self.links[i].sock)
        return dead

    def drain(self) -> None:
        """Drops the late answers to a failed step on every link; what was in flight is
        forgotten."""
        _drain(self.links)

    def set_model(self, name: str, path: str | None, shares=None) -> None:
        """Records the live model set (a model added, or with `path` None removed) in the
        servers' specs, so that a restarted server loads what is served now."""
        for i, server in enumerate(self._servers):
            models, experts = dict(server.models), dict(server.experts)
            if path is None:
                models.pop(name, None)
                experts.pop(name, None)
            else:
                models[name], experts[name] = path, list(shares[i])
            self._servers[i] = dataclasses.replace(server, models=models, experts=experts)

    def set_bytes(self, server: int, ffn_bytes: int) -> None:
        self.ready[server] = dataclasses.replace(self.ready[server], ffn_bytes=ffn_bytes)

    def close(self) -> None:
        for link in self.links:
            # Links let go of what a server shares (cuda-ipc mappings) before it exits.
            link.close()
            try:
                link.sock.send(m.encode(m.Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for link in self.links:
            link.sock.close(linger=0)
        self.links = []
        self.procs = []
        if self.end is not None:
            self.end.close()  # unlinks the CPU arena's segments
            self.end = None
        elif self._shm_arena is not None:
            self._shm_arena.close()
        self._shm_arena = None
        if self._dist:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        self.ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)  # the servers' socket files


def _cuda_device(device: str) -> torch.device:
    dev = torch.device(device)
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteFFNExecutor(FFNExecutor):
    """Runs FFN halves on the FFN servers of a pool; in-flight micro-batches use distinct slots."""

    def __init__(self, pool: FFNServerPool):
        self.pool = pool
        self.links = pool.links
        self._owner = {}  # model -> tensor: expert id -> server
        for model, shares in pool.spec.placement.items():
            self._owner[model] = _owner_table(shares)
        self._free_slots = list(range(pool.spec.slots))[::-1]
        self.broken: str | None = None

    def submit(self, model, layer, hidden, routing: Routing):
        if self.broken:
            raise FFNServerError(self.broken)
        if hidden.shape[0] > self.pool.spec.max_tokens:
            raise ValueError(f"{hidden.shape[0]} tokens exceed the transport's "
                             f"{self.pool.spec.max_tokens}")
        slot = self._free_slots.pop()
        targets = self._targets(model, hidden, routing)
        try:
            for s in targets:
                self.links[s].submit(slot, model, layer, hidden, routing)
        except Exception as e:
            self._break(e)
        return slot, targets

    def _targets(self, model: str, hidden, routing: Routing) -> list[int]:
        """The servers a layer goes to: server 0 (shared experts, dense layers) and the owners
        of the chosen experts. On a GPU every server gets it: choosing would make the host wait
        for the routing every layer, and a server none of whose experts were chosen adds zeros."""
        servers = len(self.links)
        if routing.topk_ids is None:
            return [0]
        if servers == 1 or hidden.is_cuda:
            return list(range(servers))
        used = torch.unique(routing.topk_ids)
        return sorted({0} | set(torch.unique(self._owner[model][used]).tolist()))

    def wait(self, handle):
        slot, targets = handle
        try:
            outs = [self.links[s].wait(slot) for s in targets]
        except FFNServerError as e:
            self._break(e)
        finally:
            self._free_slots.append(slot)
        total = outs[0].clone()
        for out in outs[1:]:
            total += out
        return total

    def _break(self, error: Exception):
        self.broken = str(error)
        raise FFNServerError(self.broken) from error

    def server_bytes(self) -> list[int]:
        return [r.ffn_bytes for r in self.pool.ready]

    def failure(self) -> str | None:
        return self.broken or self.pool.failure()

    def recover(self) -> bool:
        if self.pool.failure() is None and self.pool.spec.transport in ("shm", "cuda-ipc"):
            # A step failed (a server answered Failed) but every server runs: drop the late
            # answers and go on (data-parallel replicas cannot restart servers, this they can).
            self.pool.drain()
            self.broken = None
            self._free_slots = list(range(self.pool.spec.slots))[::-1]
            return True
        if not self.pool.can_restart():
            return False
        self.pool.restart_dead()
        self.broken = None
        self._free_slots = list(range(self.pool.spec.slots))[::-1]
        return True

    def close(self) -> None:
        self.pool.close()

    # -- the model set ----------------------------------------------------------------------

    def live_models_refused(self) -> str | None:
        if self.pool.spec.echo is not None:
            return "an echo pool (benchmarks) serves no model"
        if self.pool.spec.replicas > 1:
            return ("models cannot be loaded, unloaded or moved while serving with "
                    "data-parallel attention (--dp-size > 1) yet")
        return None

    def begin_load(self, name, path, shares, dtype, load_format) -> FFNLoad:
        for i, link in enumerate(self.links):
            link.send_control(m.LoadModel(name, path, tuple(shares[i]), i == 0, load_format))
        return _RemoteLoad(self, name, path, shares)

    def shares(self, name: str) -> list[list[int]]:
        return [list(server.experts[name]) for server in self.pool._servers]

    def begin_reshard(self, name, path, shares, dtype, load_format) -> FFNLoad:
        old = self.shares(name)
        moved = [i for i in range(len(self.links)) if sorted(old[i]) != sorted(shares[i])]
        for i in moved:
            self.links[i].send_control(m.LoadModel(name, path, tuple(shares[i]), i == 0,
                                                   load_format, stage=True))
        return _RemoteReshard(self, name, path, shares, moved)

    def unload_model(self, name: str) -> int:
        self._owner.pop(name, None)
        self.pool.set_model(name, None)
        freed = 0
        for i, link in enumerate(self.links):
            link.send_control(m.UnloadModel(name))
        for i, link in enumerate(self.links):
            reply = link.take_reply(m.Unloaded, name, timeout_ms=int(
                self.pool.spec.start_timeout_s * 1000))
            if reply is None:
                raise FFNServerError(f"FFN server {i} did not answer the unload of {name!r}")
            freed += reply.freed_bytes
            self.pool.set_bytes(i, reply.ffn_bytes)
        return freed


class _RemoteLoad(FFNLoad):
    """A model's expert shares loading on every FFN server; polled between steps."""

    def __init__(self, executor: RemoteFFNExecutor, name: str, path: str, shares):
        self.executor, self.name, self.path, self.shares = executor, name, path, shares
        self.replies: dict[int, object] = {}

    def poll(self) -> bool:
        for i, link in enumerate(self.executor.links):
            if i not in self.replies:
                reply = link.take_reply(m.Loaded, self.name)
                if reply is not None:
                    self.replies[i] = reply
        failed = [(i, r) for i, r in sorted(self.replies.items())
                  if isinstance(r, m.LoadFailed)]
        if failed and len(self.replies) == len(self.executor.links):
            raise FFNLoadError("; ".join(f"FFN server {i} could not load {self.name!r}: "
                                         f"{r.message}" for i, r in failed))
        return len(self.replies) == len(self.executor.links)

    def commit(self) -> int:
        pool = self.executor.pool
        for i, reply in self.replies.items():
            pool.set_bytes(i, reply.ffn_bytes)
        pool.set_model(self.name, self.path, self.shares)
        self.executor._owner[self.name] = _owner_table(self.shares)
        return sum(r.model_bytes for r in self.replies.values())

    def cancel(self) -> None:
        """Drops the shares that did load (the others failed or are still loading: a load
        that finishes later is dropped by the unload, which the server takes after it)."""
        try:
            self.executor.unload_model(self.name)
        except FFNServerError:
            pass  # the engine notices a dead server on its own


class _RemoteReshard(_RemoteLoad):
    """New shares staged on the servers whose share changes; `commit` swaps them in."""

    def __init__(self, executor, name, path, shares, servers: list[int]):
        super().__init__(executor, name, path, shares)
        self.servers = servers
        self.replies = {i: None for i in range(len(executor.links)) if i not in servers}

    def commit(self) -> int:
        pool = self.executor.pool
        self._swap(keep=True)
        pool.set_model(self.name, self.path, self.shares)
        self.executor._owner[self.name] = _owner_table(self.shares)
        return sum(r.model_bytes for r in self.replies.values() if r is not None)

    def cancel(self) -> None:
        try:
            self._swap(keep=False)
        except FFNServerError:
            pass  # the engine notices a dead server on its own

    def _swap(self, keep: bool) -> None:
        links, timeout = self.executor.links, int(self.executor.pool.spec.start_timeout_s * 1e3)
        for i in self.servers:
            links[i].send_control(m.Swap(self.name, keep))
        for i in self.servers:
            reply = links[i].take_reply(m.Swapped, self.name, timeout_ms=timeout)
            if reply is None:
                raise FFNServerError(f"FFN server {i} did not answer the swap of {self.name!r}")
            self.executor.pool.set_bytes(i, reply.ffn_bytes)


def _owner_table(shares) -> torch.Tensor:
    """expert id -> the FFN server that owns it."""
    owner = torch.empty(sum(len(s) for s in shares), dtype=torch.int64)
    for server, experts in enumerate(shares):
        owner[list(experts)] = server
    return owner


class AttachedFFNPool:
    """Replica `replica` (>= 1) of data-parallel attention: links to FFN servers that replica
    0 started. Binds one control socket per server and makes its data path, says Attach, and
    waits for Ready (cuda-ipc: handles both ways first). A server is alive while its process
    is (by pid: it is not this process's child)."""

    def __init__(self, spec: PoolSpec, replica: int):
        self.spec, self.replica = spec, replica
        self.ctx = zmq.Context()
        self.links, self.ready, self._pids = [], [], {}
        self._servers = []  # FFNServerSpec of each server: replica 0 keeps them
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        spec = self.spec
        for i in range(spec.servers):
            link = replica_link(spec, self.replica, i)
            sock = self.ctx.socket(zmq.PAIR)
            sock.bind(link["control_addr"])
            alive = self._alive_check(i)
            if spec.transport == "cuda-ipc":
                self.links.append(CudaIpcLink(sock, i, alive, IpcLayout(**link["ipc"]),
                                              spec.attention_device))
            else:
                self.links.append(ShmLink(sock, i, alive, ShmLayout(**link["shm"]),
                                          spec.attention_device))
        deadline = time.monotonic() + spec.start_timeout_s
        for i, link in enumerate(self.links):
            while not link.sock.poll(100, zmq.POLLOUT):  # until the server has connected
                if time.monotonic() > deadline:
                    raise FFNServerError(f"FFN server {i} of replica 0 did not connect to "
                                         f"replica {self.replica} in {spec.start_timeout_s} s")
            link.sock.send(m.encode(m.Attach(self.replica)))
        for i, link in enumerate(self.links):
            self.ready.append(self._await_ready(i, link, deadline))
            self._pids[i] = self.ready[i].pid

    def _await_ready(self, i: int, link, deadline: float) -> m.Ready:
        pid = self.spec.link_dir and _owner_pid(self.spec.link_dir)
        while time.monotonic() < deadline:
            if pid and not process_running(pid):
                raise FFNServerError(f"replica 0 (pid {pid}), which starts the FFN servers, "
                                     f"exited before FFN server {i} answered replica "
                                     f"{self.replica}")
            if link.sock.poll(100):
                msg = m.decode(link.sock.recv())
                if isinstance(msg, m.IpcHandles):
                    link.attach(msg.handles)
                    continue
                return msg
        raise FFNServerError(f"FFN server {i} did not answer replica {self.replica} in "
                             f"{self.spec.start_timeout_s} s")

    def _alive_check(self, i: int):
        def check() -> str | None:
            pid = self._pids.get(i)
            return None if pid is None or process_running(pid) else f"(pid {pid}) exited"

        return check

    def failure(self) -> str | None:
        for i, link in enumerate(self.links):
            death = link.alive()
            if death:
                return f"FFN server {i} {death}"
        return None

    def can_restart(self) -> bool:
        return False

    def restart_dead(self) -> list[int]:
        raise FFNServerError("a data-parallel replica cannot restart FFN servers")

    def drain(self) -> None:
        _drain(self.links)

    def set_model(self, name: str, path: str | None, shares=None) -> None:
        raise FFNServerError("a data-parallel replica does not change the FFN servers' models")

    def set_bytes(self, server: int, ffn_bytes: int) -> None:
        self.ready[server] = dataclasses.replace(self.ready[server], ffn_bytes=ffn_bytes)

    def close(self) -> None:
        for link in self.links:
            link.close()
            link.sock.close(linger=0)
        self.links = []
        self.ctx.term()


def _drain(links) -> None:
    for link in links:
        while link.sock.poll(200):
            link.sock.recv()
        link.reconnect(link.sock)


def _owner_pid(link_dir: str) -> int | None:
    """Replica 0's pid, which it writes into the link folder before starting the servers."""
    try:
        return int(Path(link_dir, "replica0.pid").read_text())
    except (OSError, ValueError):
        return None


def process_running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
