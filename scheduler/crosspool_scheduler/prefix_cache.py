"""The prefix cache: per model, a radix tree from token ids to KV blocks (SGLang's
RadixAttention, in whole blocks), and one LRU eviction over the cached blocks of every model.

In: a request's tokens (matched when it is admitted, inserted as its blocks fill up) and the
`KVAllocator`, whose reference counts keep a shared block mapped. Out: the longest cached
prefix of a request, in whole blocks; cached blocks given back to the pool under pressure.

    admit:   match(tokens) -> node, blocks    take(req, node, blocks): lock + a reference each
    advance: update(req): its newly full blocks join the tree; the lock moves down its path
    finish:  release(req): unlock (the scheduler then drops the request's references)
    pressure: evict(model, n): LRU unlocked leaves, trimmed from their ends, until n fit

Ownership: the tree holds one reference on each block it caches; a request holds one on each
block of its page table, cached or its own. The pool unmaps a block when its count reaches 0,
so a block shared by the tree and N requests is mapped once and unmapped once.
A request *locks* the tree path it uses, from its node up to the root. A node with lock 0 is
held by the tree alone, so evicting it really unmaps its pages: only such blocks count as
evictable. A model's tree is keyed by its own tokens: no other model ever sees its blocks.

Eviction takes the least recently used unlocked leaf across all models and trims blocks from
its end (a prefix never goes before its extensions), until the request's blocks fit. A
per-model floor keeps that many pages of a model's cache from eviction for other models'
requests; its own requests may still evict them.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from crosspool_scheduler.kv import KVAllocator
from crosspool_scheduler.request import SchedReq

Chunk = tuple  # the token ids of one block


@dataclass(eq=False)
class Node:
    """A run of whole blocks: `key[i]` holds the tokens of `blocks[i]`."""

    parent: Node | None = field(repr=False)
    key: list[Chunk]
    blocks: list[int]
    children: dict[Chunk, Node] = field(default_factory=dict, repr=False)
    lock: int = 0  # requests whose path runs through this node
    last_use: int = 0


@dataclass
class _Tree:
    model: str
    block_tokens: int
    root: Node = field(default_factory=lambda: Node(None, [], []))
    cached_blocks: int = 0
    evictable_blocks: int = 0
    nodes: int = 0  # below the root (counted, not walked: stats are read every step)


class PrefixCache:
    def __init__(self, kv: KVAllocator, models: list[str],
                 floor_pages: dict[str, int] | None = None):
        self.kv = kv
        self.trees = {m: _Tree(m, kv.block_tokens(m)) for m in models}
        self.floor_pages = dict(floor_pages or {})
        self._clock = itertools.count(1)
        self.evicted_blocks = 0

    # -- admission -----------------------------------------------------------------------------

    def match(self, req: SchedReq, limit: int) -> tuple[Node, list[int]]:
        """The deepest node holding a prefix of the request's first `limit` tokens, and the
        blocks of that prefix. Splits a node where the match ends inside it."""
        tree = self.trees[req.model]
        chunks = self._chunks(tree, req, 0, limit)
        node, i = tree.root, 0
        while i < len(chunks):
            child = node.children.get(chunks[i])
            if child is None:
                break
            k = _common(child.key, chunks, i)
            if k < len(child.key):  # the match ends inside this node
                node = self._split(tree, child, k)
                break
            node, i = child, i + k
        return node, _path_blocks(node)

    def take(self, req: SchedReq, node: Node, blocks: list[int]) -> None:
        """The request starts from a matched prefix: locks its path, holds its blocks."""
        self._lock(self.trees[req.model], node)
        self._touch(node)
        if blocks:
            self.kv.retain(req.model, blocks)
        req.blocks = list(blocks)
        req.num_computed = len(blocks) * self.trees[req.model].block_tokens
        req.cache_node = node
        req.cache_len = req.num_computed

    # -- while it runs -------------------------------------------------------------------------

    def update(self, req: SchedReq) -> None:
        """Inserts the request's full blocks computed since the last call and moves its lock to
        the end of what it inserted. Where the tree already has a block for the same tokens
        (computed by another request meanwhile), the tree keeps its own."""
        tree = self.trees[req.model]
        t = tree.block_tokens
        full = req.num_computed // t * t
        if full <= req.cache_len:
            return
        start = req.cache_len
        chunks = self._chunks(tree, req, start, full)
        blocks = req.blocks[start // t: full // t]
        node, i = req.cache_node or tree.root, 0
        while i < len(chunks):
            child = node.children.get(chunks[i])
            if child is None:
                child = Node(node, chunks[i:], blocks[i:])
                node.children[chunks[i]] = child
                tree.nodes += 1
                self.kv.retain(req.model, child.blocks)
                tree.cached_blocks += len(child.blocks)
                tree.evictable_blocks += len(child.blocks)
                node = child
                break
            k = _common(child.key, chunks, i)
            node = child if k == len(child.key) else self._split(tree, child, k)
            i += k
        self._lock(tree, node)
        if req.cache_node is not None:
            self._unlock(tree, req.cache_node)
        req.cache_node, req.cache_len = node, full
        self._touch(node)

    def release(self, req: SchedReq) -> None:
        """The request no longer uses its path (finished, aborted or retracted)."""
        if req.cache_node is not None:
            self._unlock(self.trees[req.model], req.cache_node)
        req.cache_node, req.cache_len = None, 0

    # -- eviction ------------------------------------------------------------------------------

    def evictable_pages(self, for_model: str | None = None) -> int:
        """Pages eviction could give back; with `for_model`, what its requests may take (other
        models' caches only down to their floors)."""
        total = 0
        for m, tree in self.trees.items():
            pages = tree.evictable_blocks * self.kv.pages_per_block(m)
            if for_model is not None and m != for_model:
                spare = tree.cached_blocks * self.kv.pages_per_block(m) - self.floor_pages.get(m, 0)
                pages = max(0, min(pages, spare))
            total += pages
        return total

    def evict(self, model: str, n: int) -> bool:
        """Evicts cached blocks until `n` blocks of `model` can be allocated; returns whether
        they can. Evicts nothing when the evictable pages could not make room anyway."""
        short = n * self.kv.pages_per_block(model) - self.kv.free_pages
        if short > self.evictable_pages(model):
            return False
        if short > 0:
            self._evict(list(self.trees), model, lambda: self.kv.free_pages >= n *
                        self.kv.pages_per_block(model))
        if not self.kv.can_alloc(model, n):  # the model's own range or quota is what binds
            self._evict([model], model, lambda: self.kv.can_alloc(model, n))
        return self.kv.can_alloc(model, n)

    def flush(self) -> None:
        """Drops every cached block; only with no request holding a path."""
        for tree in self.trees.values():
            if tree.evictable_blocks != tree.cached_blocks:
                raise RuntimeError(f"model {tree.model}: flush while requests use the cache")
        for tree in self.trees.values():
            self._empty(tree)

    # -- the model set -------------------------------------------------------------------------

    def add_model(self, model: str) -> None:
        self.trees[model] = _Tree(model, self.kv.block_tokens(model))

    def drop_model(self, model: str) -> int:
        """Frees a model's whole cache and forgets the model (no request may use it); returns
        the blocks freed."""
        tree = self.trees[model]
        if tree.evictable_blocks != tree.cached_blocks:
            raise RuntimeError(f"model {model}: dropped while requests use its cache")
        freed = self._empty(tree)
        del self.trees[model]
        self.floor_pages.pop(model, None)
        return freed

    def _empty(self, tree: _Tree) -> int:
        blocks = [b for node in _nodes(tree.root) for b in node.blocks]
        if blocks:
            self.kv.free_blocks(tree.model, blocks)
        tree.root = Node(None, [], [])
        tree.cached_blocks = tree.evictable_blocks = tree.nodes = 0
        return len(blocks)

    def _evict(self, models: list[str], for_model: str, done) -> None:
        heap = []
        tie = itertools.count()
        for m in models:
            for node in _nodes(self.trees[m].root):
                if _evictable_leaf(node):
                    heap.append((node.last_use, next(tie), m, node))
        heapq.heapify(heap)
        while heap and not done():
            _, _, m, node = heapq.heappop(heap)
            tree = self.trees[m]
            ppb = self.kv.pages_per_block(m)
            allowed = len(node.blocks)
            if m != for_model:
                spare = tree.cached_blocks * ppb - self.floor_pages.get(m, 0)
                allowed = min(allowed, max(0, spare // ppb))
            first = node.key[0]
            while allowed and node.blocks and not done():
                node.key.pop()
                self.kv.free_blocks(m, [node.blocks.pop()])
                tree.cached_blocks -= 1
                tree.evictable_blocks -= 1
                self.evicted_blocks += 1
                allowed -= 1
            if not node.blocks:
                parent = node.parent
                del parent.children[first]
                tree.nodes -= 1
                if _evictable_leaf(parent):
                    heapq.heappush(heap, (parent.last_use, next(tie), m, parent))

    # -- accounting ----------------------------------------------------------------------------

    def blocks(self) -> dict[str, tuple[int, int]]:
        """Per model: (cached blocks, of which evictable)."""
        return {m: (t.cached_blocks, t.evictable_blocks) for m, t in self.trees.items()}

    def stats(self) -> dict:
        return {
            "evicted_blocks": self.evicted_blocks,
            "models": {m: {"cached_blocks": t.cached_blocks,
                           "evictable_blocks": t.evictable_blocks,
                           "nodes": t.nodes}
                       for m, t in self.trees.items()},
        }

    # -- helpers -------------------------------------------------------------------------------

    def _chunks(self, tree: _Tree, req: SchedReq, start: int, end: int) -> list[Chunk]:
        t = tree.block_tokens
        end = start + (end - start) // t * t
        tokens = req.tokens(start, end)
        return [tuple(tokens[i: i + t]) for i in range(0, len(tokens), t)]

    def _split(self, tree: _Tree, node: Node, k: int) -> Node:
        """Cuts `node` after k blocks; the new upper node takes its place. The lower part keeps
        the node's identity (a request's lock on it still covers all it did)."""
        upper = Node(node.parent, node.key[:k], node.blocks[:k], lock=node.lock,
                     last_use=node.last_use)
        node.parent.children[node.key[0]] = upper
        node.key, node.blocks = node.key[k:], node.blocks[k:]
        node.parent = upper
        upper.children[node.key[0]] = node
        tree.nodes += 1
        return upper

    def _touch(self, node: Node) -> None:
        now = next(self._clock)
        while node is not None:
            node.last_use = now
            node = node.parent

    @staticmethod
    def _lock(tree: _Tree, node: Node) -> None:
        while node.parent is not None:
            if node.lock == 0:
                tree.evictable_blocks -= len(node.blocks)
            node.lock += 1
            node = node.parent

    @staticmethod
    def _unlock(tree: _Tree, node: Node) -> None:
        while node.parent is not None:
            node.lock -= 1
            if node.lock == 0:
                tree.evictable_blocks += len(node.blocks)
            node = node.parent


def _common(key: list[Chunk], chunks: list[Chunk], start: int) -> int:
    k = 0
    while k < len(key) and start + k < len(chunks) and key[k] == chunks[start + k]:
        k += 1
    return k


def _path_blocks(node: Node) -> list[int]:
    parts = []
    while node is not None:
        parts.append(node.blocks)
        node = node.parent
    return [b for part in reversed(parts) for b in part]


def _nodes(root: Node):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def _evictable_leaf(node: Node) -> bool:
    return node.parent is not None and not node.children and node.lock == 0
