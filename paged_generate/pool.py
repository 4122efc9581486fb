"""`KVPool`: one store of KV blocks for many generate() calls and models, with automatic prefix caching.

Without a pool, every generate() call sizes its own block pools and frees them at its end. With one
(`enable_paged_cache(model, pool=pool)`), the blocks outlive the calls:

- Each enabled model gets its own block ids and storage in the pool (one per block size and `kv_cache_dtype`), and
  every block any model holds counts against the pool's one budget, `max_cache_bytes`.
- Prefix caching: after a call's prompt forward, the full blocks of its prompts stay in the pool, found by their
  tokens (`blocks/prefix.py`). A later call whose rows begin with cached blocks starts from them, and its prompt
  forward computes only the rest. Cached blocks no call references are evicted least recently used first when a call
  needs room; `OutOfBlocksError` is raised only when nothing is left to evict (the call's blocks are then freed).
- Storage: the pool's storage for a model grows geometrically as its calls need blocks. With a budget, it grows up
  to the budget before cached blocks are evicted; without one, cached blocks are evicted before it grows (so it stays
  the size the calls' own blocks needed, and the cache lives in the room they leave). It shrinks by itself when a
  call ends while no forward of that model runs: without a budget, when the storage is more than twice the most
  blocks the model held at once since the previous call ended (so calls alike in size never shrink and regrow it);
  with one, when all models' storage together exceeds the budget (then every model with no forward running is
  trimmed). Trimming releases the storage above the highest block in use. `trim()` does that at once for every
  model, `clear()` forgets every cached block and trims.

Threads: the bookkeeping (allocation, the prefix index, eviction, storage growth) happens under one lock; forwards
run without it. A forward is planned (its blocks allocated) before it starts, by a forward pre-hook on the model, and
the storage of a model only grows or shrinks while none of its forwards runs.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .blocks.prefix import PrefixIndex
from .blocks.pooled import PooledAllocator
from .errors import OutOfBlocksError
from .kv_ops import grown
from .patches.compat import CACHE_KWARG
from .patches.weights_version import weights_fingerprint
from .pooled_cache import PooledCache

__all__ = ["KVPool", "PoolStats"]

_GROWTH = 4  # storage grows by at least a quarter of itself


@dataclass(frozen=True)
class PoolStats:
    """What a `KVPool` holds now, over every model using it.

    bytes_held: bytes of the blocks in use (by running calls, or by caches returned to a caller) and cached
    blocks_held: those blocks
    cached_blocks: blocks kept for their prompts (some may be in use too)
    hits: prompt blocks later calls found cached (each block of each prompt computed once per call), since creation
    evictions: cached blocks evicted to make room, since creation
    storage_bytes: bytes of the pool's storage: blocks held, and free ones not yet released (see `KVPool.trim`)
    max_cache_bytes: the budget, None for none
    """

    bytes_held: int
    blocks_held: int
    cached_blocks: int
    hits: int
    evictions: int
    storage_bytes: int
    max_cache_bytes: int | None


class _Space:
    """One model's blocks in the pool, for one block size and kv_cache_dtype: the ids (`PooledAllocator`), every
    layer's storage (tensors [capacity, ...] each), the prefix index, and the model's calls now running."""

    def __init__(self, pool: "KVPool", *, block_size: int, kv_cache_dtype: str, block_bytes: int):
        self.pool = pool
        self.block_size, self.kv_cache_dtype = block_size, kv_cache_dtype
        self.block_bytes = block_bytes  # one block over every layer: the unit of the budget
        self.allocator = PooledAllocator(block_size=block_size)
        self.index = PrefixIndex()
        self.storage: dict[int, list[torch.Tensor]] = {}  # layer index -> its tensors, [capacity, ...] each
        self.in_flight = 0  # forwards running on the storage
        self.growth_pending = 0  # threads waiting to resize the storage: no forward starts meanwhile
        self.caches = weakref.WeakSet()  # live caches, whose layers adopt resized storage
        self.fingerprint = None  # of the model's weights when its cached blocks were computed
        self.recent_peak = 0  # the most blocks held at once since a call of the model last ended

    @property
    def bytes_held(self) -> int:
        return self.allocator.num_used * self.block_bytes

    @property
    def storage_bytes(self) -> int:
        return self.allocator.capacity * self.block_bytes

    def layer_tensors(self, layer_index: int, empty) -> list[torch.Tensor]:
        """The storage of one layer; made at the current capacity from `empty()` (its tensors with 0 blocks) by the
        first forward that reaches the layer."""
        with self.pool._lock:
            tensors = self.storage.get(layer_index)
            if tensors is None:
                tensors = self.storage[layer_index] = [grown(t, self.allocator.capacity) for t in empty()]
            return tensors

    def evictable(self) -> np.ndarray:
        return self.index.evictable(self.allocator.ref_counts)

    def evict(self, blocks: np.ndarray) -> int:
        removed = self.index.remove(blocks)
        self.allocator.decref(removed)
        return len(removed)

    def forget_prefixes(self) -> None:
        """Drop every cached block (blocks calls still reference are freed when those calls end)."""
        self.allocator.decref(self.index.clear())

    def resize(self, capacity: int) -> None:
        """Grow or shrink the storage to `capacity` blocks (no forward of the model may be running)."""
        assert self.in_flight == 0
        if capacity == self.allocator.capacity:
            return
        if capacity < self.allocator.capacity:
            self.allocator.shrink(capacity)
        for layer_index, tensors in self.storage.items():
            self.storage[layer_index] = [grown(t, capacity) if capacity > t.shape[0] else t[:capacity].clone()
                                         for t in tensors]
        if capacity > self.allocator.capacity:
            self.allocator.grow(capacity)
        for cache in list(self.caches):
            for layer in cache.layers:
                if layer.is_initialized:
                    layer.adopt(self.storage[layer.layer_index])

    def trim(self) -> None:
        self.resize(self.allocator.highest_used() + 1)


class KVPool:
    """KV blocks shared by the generate() calls of one or several enabled models, with one memory budget and
    automatic prefix caching (see the module docstring for the policy).

    Parameters
    ----------
    max_cache_bytes : the most bytes of K/V blocks the pool holds at once, over every model (blocks of running calls
        and cached ones); None for no cap. A block's bytes are its K/V over all layers of its model (compressed for a
        `kv_cache_dtype` of "int8" / "fp8"; the partial blocks such caches keep in the model's dtype are not
        counted).
    prefix_caching : keep the full blocks of prompts for later calls (True), or only share the budget (False).

    Example
    -------
    >>> pool = KVPool(max_cache_bytes=2 << 30)
    >>> enable_paged_cache(model, pool=pool)
    >>> enable_paged_cache(draft_model, pool=pool)
    >>> for question in questions:                     # each call computes only what follows the shared document
    ...     model.generate(tokenizer(document + question, return_tensors="pt").input_ids, max_new_tokens=32)
    >>> pool.stats().hits, cache_stats(model).prefix_hit_tokens
    """

    def __init__(self, max_cache_bytes: int | None = None, *, prefix_caching: bool = True):
        if max_cache_bytes is not None and (isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int)
                                            or max_cache_bytes <= 0):
            raise ValueError(f"KVPool: max_cache_bytes must be a positive int, or None for no cap; got "
                             f"{max_cache_bytes!r}.")
        self.max_cache_bytes = max_cache_bytes
        self.prefix_caching = bool(prefix_caching)
        self._lock = threading.Condition(threading.RLock())
        self._models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {settings: _Space}
        self._spaces: weakref.WeakSet = weakref.WeakSet()  # every space, also of models gone while calls hold blocks
        self._dropped: deque = deque()  # tables of caches dropped by their callers, freed at the next bookkeeping
        self._stamp = 0
        self._hits = 0
        self._evictions = 0

    def __repr__(self) -> str:
        return f"KVPool(max_cache_bytes={self.max_cache_bytes}, prefix_caching={self.prefix_caching})"

    # --- public ----------------------------------------------------------------------------------------------------
    def stats(self) -> PoolStats:
        with self._lock:
            self._drain()
            spaces = list(self._spaces)
            return PoolStats(
                bytes_held=sum(space.bytes_held for space in spaces),
                blocks_held=sum(space.allocator.num_used for space in spaces),
                cached_blocks=sum(space.index.num_cached for space in spaces),
                hits=self._hits,
                evictions=self._evictions,
                storage_bytes=sum(space.storage_bytes for space in spaces),
                max_cache_bytes=self.max_cache_bytes,
            )

    def clear(self) -> None:
        """Forget every cached block and release the free storage (`trim`). Blocks that running calls (or caches
        returned to callers) hold stay until those are done."""
        with self._lock:
            self._drain()
            for space in list(self._spaces):
                space.forget_prefixes()
        self.trim()

    def trim(self) -> None:
        """Release the storage above the highest block each model holds, waiting for forwards running meanwhile."""
        with self._lock:
            self._drain()
            for space in list(self._spaces):
                self._exclusively(space, space.trim)

    # --- for enable_paged_cache and generate() ----------------------------------------------------------------------
    def forget_model(self, model) -> None:
        """`model` was disabled: drop its cached blocks and release its free storage (blocks its running calls, or
        caches returned to callers, hold stay until those are done)."""
        with self._lock:
            self._drain()
            for space in list(self._models.pop(model, {}).values()):
                space.forget_prefixes()
                self._exclusively(space, space.trim)

    def new_cache(self, model, *, block_size: int, kv_cache_dtype: str, backend: str, block_bytes,
                  prefix_caching: bool) -> PooledCache:
        """A cache for one generate() call of `model` (the transformers model), whose blocks are this pool's;
        `block_bytes(model)`: one block's bytes over every layer, as the budget counts them."""
        with self._lock:
            self._drain()
            space = self._space_of(model, block_size, kv_cache_dtype, block_bytes(model), backend)
            fingerprint = weights_fingerprint(model)
            if space.fingerprint != fingerprint:  # the weights changed: what was cached is stale
                space.forget_prefixes()
                space.fingerprint = fingerprint
            cache = PooledCache.from_model(model, space=space, prefix_caching=prefix_caching and self.prefix_caching,
                                           block_size=block_size, backend=backend, kv_cache_dtype=kv_cache_dtype)
            space.caches.add(cache)
            return cache

    def _space_of(self, model, block_size: int, kv_cache_dtype: str, block_bytes: int, backend: str = "auto") -> _Space:
        spaces = self._models.setdefault(model, {})
        # The model's dtype too: a model cast after it was enabled must not write into storage of its former dtype;
        # and the backend, which decides how storage is laid out (K and V fused on the PyTorch path).
        key = (block_size, kv_cache_dtype, block_bytes, model.dtype, backend)
        space = spaces.get(key)
        if space is None:
            space = spaces[key] = _Space(self, block_size=block_size, kv_cache_dtype=kv_cache_dtype,
                                         block_bytes=block_bytes)
            self._spaces.add(space)
        return space

    # --- under the lock ---------------------------------------------------------------------------------------------
    def _next_stamp(self) -> int:
        self._stamp += 1
        return self._stamp

    def _prepare_forward(self, space: _Space, blocks_needed) -> None:
        """Make sure `blocks_needed()` blocks can be allocated in `space` now: within the budget (evicting cached
        blocks of any model), and free in the space's storage (evicting its cached blocks or growing it)."""
        self._drain()
        while True:
            while space.growth_pending:
                self._lock.wait()
            needed = blocks_needed()
            self._fit_budget(space, needed)
            short = needed - space.allocator.num_free
            if short <= 0:
                return
            if self.max_cache_bytes is None:
                evictable = space.evictable()
                if len(evictable):
                    self._evictions += space.evict(evictable[:short])
                    continue
            self._grow(space, needed)

    def _fit_budget(self, space: _Space, needed: int) -> None:
        if self.max_cache_bytes is None:
            return
        spaces = list(self._spaces)
        deficit = sum(s.bytes_held for s in spaces) + needed * space.block_bytes - self.max_cache_bytes
        if deficit <= 0:
            return
        candidates = [(s, s.evictable()) for s in spaces]
        candidates = [(s, blocks) for s, blocks in candidates if len(blocks)]
        if not candidates:
            raise self._shortage(space, needed)
        owner = np.concatenate([np.full(len(blocks), i) for i, (_, blocks) in enumerate(candidates)])
        blocks = np.concatenate([blocks for _, blocks in candidates])
        last_used = np.concatenate([s.index.last_used[b] for s, b in candidates])
        depth = np.concatenate([s.index.depth[b] for s, b in candidates])
        block_bytes = np.array([s.block_bytes for s, _ in candidates])[owner]
        order = np.lexsort((-depth, last_used))
        freed = np.cumsum(block_bytes[order])
        if freed[-1] < deficit:
            raise self._shortage(space, needed)
        chosen = order[: int(np.searchsorted(freed, deficit)) + 1]
        for i, (s, _) in enumerate(candidates):
            mine = blocks[chosen[owner[chosen] == i]]
            if len(mine):
                self._evictions += s.evict(mine)

    def _shortage(self, space: _Space, needed: int) -> OutOfBlocksError:
        return OutOfBlocksError(needed=needed, in_use=space.allocator.num_used,
                                max_blocks=self.max_cache_bytes // space.block_bytes, block_size=space.block_size,
                                budget_bytes=self.max_cache_bytes)

    def _grow(self, space: _Space, needed: int) -> None:
        def grow():
            allocator = space.allocator
            required = allocator.num_used + needed
            target = max(required, allocator.capacity + allocator.capacity // _GROWTH)
            if self.max_cache_bytes is not None:
                target = max(required, min(target, self.max_cache_bytes // space.block_bytes))
                self._trim_idle_others(space, target)
            space.resize(target)

        self._exclusively(space, grow)

    def _trim_idle_others(self, space: _Space, target: int) -> None:
        """With a budget: when the storage of every model would exceed it, release the free storage of models with
        no forward running."""
        others = [s for s in self._spaces if s is not space]
        if sum(s.storage_bytes for s in others) + target * space.block_bytes <= self.max_cache_bytes:
            return
        for other in others:
            if other.in_flight == 0 and other.growth_pending == 0:
                other.trim()

    def _exclusively(self, space: _Space, action) -> None:
        """Run `action` once no forward of the space runs; forwards starting meanwhile wait for it."""
        space.growth_pending += 1
        try:
            while space.in_flight:
                self._lock.wait()
            action()
        finally:
            space.growth_pending -= 1
            self._lock.notify_all()

    def _entered_flight(self, space: _Space, books) -> None:
        books.in_flight = True
        space.in_flight += 1
        space.recent_peak = max(space.recent_peak, space.allocator.num_used)

    def _leave_flight(self, space: _Space, books) -> None:
        if books.in_flight:
            books.in_flight = False
            space.in_flight -= 1
            if space.growth_pending:
                self._lock.notify_all()

    def _after_release(self, space: _Space, cache) -> None:
        """A call ended: forget it, and release free storage as the module docstring says."""
        space.caches.discard(cache)
        if space.in_flight or space.growth_pending:
            return
        if self.max_cache_bytes is not None and sum(s.storage_bytes for s in self._spaces) > self.max_cache_bytes:
            for other in list(self._spaces):
                if other.in_flight == 0 and other.growth_pending == 0:
                    other.trim()
        elif space.allocator.capacity > 2 * space.recent_peak:
            space.trim()
        space.recent_peak = space.allocator.num_used

    def _release_dropped(self, space: _Space, books) -> None:
        """Finalizer of a cache: its caller dropped it (or it was released). May run in any thread, at any point a
        garbage collection runs: the blocks are freed at the next bookkeeping, not here."""
        if books.tables is not None or books.in_flight:
            self._dropped.append((space, books))

    def _drain(self) -> None:
        while self._dropped:
            space, books = self._dropped.popleft()
            if books.tables is not None:
                space.index.touch(books.tables.tables.ravel(), self._next_stamp())
                books.tables.free()
                books.tables = None
            self._leave_flight(space, books)


def install_forward_gate(model) -> tuple:
    """Hooks on `model` (the transformers model) planning each forward of a pooled cache before it starts and marking
    its end (see `PooledCache.enter_forward`). Returns the hook handles."""

    def before(module, args, kwargs):
        cache = kwargs.get(CACHE_KWARG)
        if isinstance(cache, PooledCache):
            shape = _rows_and_tokens(args, kwargs)
            if shape is not None:
                cache.enter_forward(*shape)

    def after(module, args, kwargs, output):
        cache = kwargs.get(CACHE_KWARG)
        if isinstance(cache, PooledCache):
            cache.leave_forward()

    return (model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True, always_call=True))


def _rows_and_tokens(args, kwargs) -> tuple[int, int] | None:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return value.shape[0], value.shape[1]
    if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 2:
        return args[0].shape[0], args[0].shape[1]
    return None
