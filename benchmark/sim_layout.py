"""The simulator's view of a plan: attention workers, their KV page budgets and models.

In: a plan (`sglang_crosspool.planner.load_plan`) and one pool mode. Out: a `Layout` - the
attention workers (each a set of GPUs with one `crosspool_scheduler.GlobalScheduler`, and a
prefix cache if asked) and, per served model, its replicas as (worker, scheduler key).

Devices that one model replica's attention spans are joined into one worker (union-find):
`monolithic` (packed) gives one worker per GPU, `static` one per group of GPUs its models
share, `crosspool` one per group of KV-pool GPUs that models share with TP. `SimKV` holds the
plan's page budget per GPU and each model's block layout (`static`: the model's slice as a
quota); a block maps pages on every GPU of its replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crosspool_scheduler import GlobalScheduler, PrefixCache, SchedulerLimits

from benchmark.sim_costs import Placement, Shape

# -- KV accounting ------------------------------------------------------------------------------


@dataclass
class _Key:
    devices: tuple[int, ...]
    block_tokens: int
    pages_per_block: int  # on each of its devices
    virtual_blocks: int
    quota_pages: int | None = None  # static: the model's slice on each device
    blocks: int = 0  # mapped blocks
    refs: dict[int, int] = field(default_factory=dict)  # block -> holders


class SimKV:
    """The scheduler's `KVAllocator` over page budgets per GPU, without memory behind it.

    A block of a key maps `pages_per_block` pages on every GPU of the key's replica (TP ranks
    each hold their heads' share). Blocks are reference counted as `KVPool`'s are (the prefix
    cache shares them). Counts pages mapped and unmapped, for the VMM cost."""

    def __init__(self, budgets: dict[int, int]):
        self.budget = dict(budgets)
        self.used = {d: 0 for d in budgets}
        self.keys: dict[str, _Key] = {}
        self.mapped = 0  # pages mapped since the last `take_counts`
        self.unmapped = 0
        self._next = 0

    def add(self, key: str, devices: tuple[int, ...], block_tokens: int, pages_per_block: int,
            virtual_blocks: int, quota_pages: int | None = None) -> None:
        self.keys[key] = _Key(devices, block_tokens, pages_per_block, virtual_blocks,
                              quota_pages)

    def block_tokens(self, model: str) -> int:
        return self.keys[model].block_tokens

    def pages_per_block(self, model: str) -> int:
        return self.keys[model].pages_per_block

    def max_blocks(self, model: str) -> int:
        k = self.keys[model]
        pages = min(self.budget[d] for d in k.devices)
        if k.quota_pages is not None:
            pages = min(pages, k.quota_pages)
        return min(k.virtual_blocks, pages // k.pages_per_block)

    def can_alloc(self, model: str, n: int) -> bool:
        k = self.keys[model]
        pages = n * k.pages_per_block
        if k.quota_pages is not None and (k.blocks * k.pages_per_block + pages) > k.quota_pages:
            return False
        if k.blocks + n > k.virtual_blocks:
            return False
        return all(self.used[d] + pages <= self.budget[d] for d in k.devices)

    def alloc_blocks(self, model: str, n: int) -> list[int] | None:
        if not self.can_alloc(model, n):
            return None
        k = self.keys[model]
        k.blocks += n
        for d in k.devices:
            self.used[d] += n * k.pages_per_block
        self.mapped += n * k.pages_per_block * len(k.devices)
        blocks = list(range(self._next, self._next + n))
        self._next += n
        k.refs.update((b, 1) for b in blocks)
        return blocks

    def free_blocks(self, model: str, blocks: list[int]) -> None:
        k = self.keys[model]
        last = 0
        for b in blocks:
            k.refs[b] -= 1
            if k.refs[b] == 0:
                del k.refs[b]
                last += 1
        k.blocks -= last
        for d in k.devices:
            self.used[d] -= last * k.pages_per_block
        self.unmapped += last * k.pages_per_block * len(k.devices)

    def retain(self, model: str, blocks: list[int]) -> None:
        refs = self.keys[model].refs
        for b in blocks:
            refs[b] += 1

    @property
    def free_pages(self) -> int:
        """Free pages of the fullest GPU (what the prefix cache's eviction checks against)."""
        return min(self.budget[d] - self.used[d] for d in self.budget)

    @property
    def used_pages(self) -> int:
        return sum(self.used.values())

    def take_counts(self) -> tuple[int, int]:
        """Pages mapped and unmapped since the last call (per GPU: the busiest one's share)."""
        n = max(1, len(self.budget))
        out = (self.mapped // n, self.unmapped // n)
        self.mapped = self.unmapped = 0
        return out


# -- workers and the layout a plan gives each mode ----------------------------------------------


@dataclass
class Worker:
    """One attention worker: its GPUs, scheduler and the models (keys) it runs."""

    name: str
    devices: tuple[int, ...]
    kv: SimKV
    sched: GlobalScheduler | None = None
    keys: dict[str, tuple[Shape, Placement]] = field(default_factory=dict)
    pipeline_models: bool = False  # two models' batches a step (`--pipeline-models`)
    busy: bool = False
    busy_s: float = 0.0
    steps: int = 0


@dataclass
class Layout:
    mode: str
    workers: list[Worker]
    replicas: dict[str, list[tuple[Worker, str]]]  # served model -> (worker, key) per replica
    context: dict[str, int]  # served model -> context length


def build_layout(plan, mode: str, limits: SchedulerLimits, gpus_per_node: int | None = None,
                 prefix_cache: bool = False, pipeline_models: bool = False) -> Layout:
    """The plan's pool mode as attention workers (see the module docstring)."""
    mp = plan.mode(mode)
    per_node = gpus_per_node or plan.inputs.devices
    node = {d: d // per_node for d in range(plan.inputs.devices)}
    pages = {d.index: int(d.kv_pages) for d in mp.devices}
    keys = []  # (key, model, devices, tp, row)
    for row in mp.models:
        if not row.fits:
            continue
        devs = list(row.devices)
        reps = row.parallel.replica_devices()
        for r, span in enumerate(reps):
            key = row.name if len(reps) == 1 else f"{row.name}#{r}"
            keys.append((key, row.name, tuple(devs[i] for i in span), row.parallel.replicas[r],
                         row))
    parent = {d: d for d in pages}

    def find(d):
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    for _, _, devs, _, _ in keys:
        for d in devs[1:]:
            parent[find(d)] = find(devs[0])
    groups: dict[int, list[int]] = {}
    for _, _, devs, _, _ in keys:
        for d in devs:
            groups.setdefault(find(d), [])
            if d not in groups[find(d)]:
                groups[find(d)].append(d)
    workers = {root: Worker(f"{mode}-gpu{'+'.join(map(str, sorted(ds)))}", tuple(sorted(ds)),
                            SimKV({d: pages[d] for d in ds})) for root, ds in groups.items()}
    info = {m.name: m for m in plan.models}
    replicas: dict[str, list[tuple[Worker, str]]] = {}
    for key, name, devs, tp, row in keys:
        w = workers[find(devs[0])]
        virtual = -(-info[name].max_position_embeddings * limits.max_running_requests
                    // int(row.block_tokens))
        quota = int(row.kv_pages) if mode == "static" else None
        w.kv.add(key, devs, int(row.block_tokens), int(row.pages_per_block), virtual, quota)
        w.keys[key] = (Shape.from_info(info[name]), _placement(mp, name, devs, tp, node))
        replicas.setdefault(name, []).append((w, key))
    for w in workers.values():
        cache = PrefixCache(w.kv, list(w.keys)) if prefix_cache else None
        w.sched = GlobalScheduler(w.kv, list(w.keys), limits, cache=cache)
        w.pipeline_models = pipeline_models and mode == "crosspool"
    context = {name: info[name].max_position_embeddings for name in replicas}
    return Layout(mode, list(workers.values()), replicas, context)


def _placement(mp, name: str, devs: tuple[int, ...], tp: int, node: dict[int, int]) -> Placement:
    if mp.mode != "crosspool" or mp.placement is None:
        return Placement(tp=tp)
    m = mp.placement.model(name)
    servers = {s for s, ids in enumerate(m.experts) if ids}
    servers |= {s for s in (m.shared_server, m.dense_server) if s is not None}
    ffn_devs = {mp.placement.servers[s].device for s in servers}
    inter = any(node[f] != node[d] for f in ffn_devs for d in devs)
    return Placement(tp=tp, crosspool=True, ffn_servers=max(1, len(servers)), inter_node=inter)
