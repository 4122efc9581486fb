"""`PooledCache`: the paged cache of one generate() call whose blocks live in a `KVPool` (see pool.py).

The call's block tables reference the pool's blocks of its model; its layers read and write the pool's storage. What
the call adds is its own: the rows it holds, the figures of the call. Every change of the pool's bookkeeping (the
model's allocator, the prefix index) happens under the pool's lock; forwards run without it, planned beforehand by
`enter_forward` (the pool then knows no forward of the model is reading its storage while it grows it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .blocks import BlockTables
from .cache import CompressedLayer, PagedCache, PagedLayer
from .stats import CacheStats

__all__ = ["PooledCache"]


class PooledLayer(PagedLayer):
    """A `PagedLayer` whose pools are the pool's storage for this layer of the model (shared by its calls)."""

    def __init__(self, cache: "PooledCache", layer_index: int):
        super().__init__(cache)
        self.layer_index = layer_index

    def _new_pools(self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> dict:
        def empty():  # the layout this layer takes (fused or a pool each), with no blocks
            return list(PagedLayer._new_pools(self, 0, key_states, value_states).values())

        return _as_pools(self.cache.space.layer_tensors(self.layer_index, empty))

    def _grow_pools(self, capacity: int) -> None:
        self.adopt(self.cache.space.storage[self.layer_index])

    def adopt(self, tensors: list) -> None:
        """The pool grew or trimmed this layer's storage: read and write the new tensors."""
        self._set_pools(**_as_pools(tensors))
        self._views = None


def _as_pools(tensors: list) -> dict:
    """A layer's storage in the pool ([K and V fused] or [keys, values]) as `PagedLayer._set_pools` takes it."""
    return dict(fused=tensors[0]) if len(tensors) == 1 else dict(keys=tensors[0], values=tensors[1])


class PooledCompressedLayer(CompressedLayer):
    """A `CompressedLayer` whose compressed full blocks and scales are the pool's; the slots of the call's partial
    blocks stay the call's own."""

    def __init__(self, cache: "PooledCache", layer_index: int):
        super().__init__(cache)
        self.layer_index = layer_index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        storage = self.storage
        self.adopt(self.cache.space.layer_tensors(
            self.layer_index, lambda: [storage.keys, storage.values, storage.key_scales, storage.value_scales]))

    def adopt(self, tensors: list) -> None:
        storage = self.storage
        storage.keys, storage.values, storage.key_scales, storage.value_scales = tensors
        self.keys, self.values = storage.keys, storage.values


@dataclass(eq=False)
class _Books:
    """What a dropped cache still holds in the pool, for its finalizer: its tables, and whether a forward of it
    was left in flight (interrupted by KeyboardInterrupt, which skips the forward's closing hook)."""

    tables: BlockTables | None
    in_flight: bool = False


class PooledCache(PagedCache):
    """A `PagedCache` whose blocks are a `KVPool`'s: what it holds counts against the pool's budget, its prompt's
    full blocks stay cached after it (`cache_prompt`) and a later call's rows begin with them (`attach_prefix`).

    Made by the pool for a generate() call (`KVPool` docs); released at its end, or when the caller drops it (a cache
    returned for multi-turn use), its blocks go back to the pool.
    """

    def __init__(self, *, space, prefix_caching: bool, num_layers: int, block_size: int = 16, backend: str = "auto",
                 kv_cache_dtype: str = "auto", max_blocks: int | None = None):
        super().__init__(num_layers=num_layers, block_size=block_size, backend=backend, kv_cache_dtype=kv_cache_dtype)
        self.space = space
        self.prefix_caching = prefix_caching
        self.allocator = space.allocator
        self.tables = BlockTables(self.allocator, partial=self.partial)
        layer_class = PooledLayer if self.partial is None else PooledCompressedLayer
        self.layers = [layer_class(self, index) for index in range(num_layers)]
        self.prefix_hit_tokens = 0
        self._peak_own_blocks = 0
        self._peak_storage_blocks = 0
        self._counted_tables = None
        self._books = _Books(self.tables)
        weakref.finalize(self, space.pool._release_dropped, space, self._books)

    @property
    def lock(self):
        return self.space.pool._lock

    # --- forwards --------------------------------------------------------------------------------------------------
    def enter_forward(self, num_rows: int, query_len: int) -> None:
        """Before a forward of `num_rows` rows and `query_len` new tokens each: make room in the pool and plan the
        step (allocate its blocks); the forward is then in flight until `leave_forward`."""
        with self.lock:
            self.space.pool._prepare_forward(self.space, lambda: self._blocks_needed(num_rows, query_len))
            self._planned = True
            try:
                self._plan(num_rows, query_len)
            finally:
                self._planned = False
            self.space.pool._entered_flight(self.space, self._books)
            self._ahead = query_len

    # Planned ahead, the step's tokens are already counted in the tables; until the first layer takes the step, the
    # model (building its masks and positions) must still see the length before it.
    _ahead = 0

    def step_for(self, layer, num_rows: int, query_len: int):
        self._ahead = 0
        return super().step_for(layer, num_rows, query_len)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tables.seq_len - self._ahead

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.tables.seq_len - self._ahead + query_length, 0

    def leave_forward(self) -> None:
        with self.lock:
            self.space.pool._leave_flight(self.space, self._books)

    def _blocks_needed(self, num_rows: int, query_len: int) -> int:
        if self.tables.seq_len == 0 and self.tables.num_rows != num_rows:
            return num_rows * (-(-query_len // self.block_size))
        return self.tables.blocks_needed_to_append(query_len)

    _planned = False

    def _plan(self, num_rows: int, query_len: int):
        with self.lock:
            if not self._planned:  # within the budget still, evicting cached blocks if need be
                self.space.pool._fit_budget(self.space, self._blocks_needed(num_rows, query_len))
            if not self._planned and self._blocks_needed(num_rows, query_len) > self.allocator.num_free:
                raise RuntimeError(
                    "paged-generate: a forward on a pooled cache was not planned before it ran (its inputs carried "
                    "neither input_ids nor inputs_embeds), and the pool must grow for it. Pass input_ids or "
                    "inputs_embeds to the model's forward."
                )
            step = super()._plan(num_rows, query_len)
            self._books.tables = self.tables
            self._note_own_blocks()
            return step

    def _note_own_blocks(self) -> None:
        tables = self.tables.tables
        if tables is not self._counted_tables:
            self._counted_tables = tables
            self._peak_own_blocks = max(self._peak_own_blocks, len(np.unique(tables)))
        self._peak_storage_blocks = max(self._peak_storage_blocks, self.allocator.capacity)

    # --- prefixes --------------------------------------------------------------------------------------------------
    def attach_prefix(self, keys: list[list[bytes]]) -> int:
        """Before a call's prompt forward: rows whose first blocks the pool holds begin with them. `keys[r]`: the keys
        of row r's blocks that may be reused (`blocks.prefix.block_keys`; never the block of the prompt's last
        token, which must be computed for its logits). Every row takes the shortest hit of them all, so that the
        forward computes the same number of tokens in each. Returns the tokens per row now held (0: none)."""
        if self.tables.seq_len:
            raise RuntimeError("attach_prefix: the cache already holds tokens")
        pool, space = self.space.pool, self.space
        with self.lock:
            pool._drain()
            found = [space.index.lookup(row_keys) for row_keys in keys]
            hit = min(len(blocks) for blocks in found) if found else 0
            if hit == 0:
                return 0
            tables = np.stack([blocks[:hit] for blocks in found])  # [num_rows, hit]
            self.allocator.incref(tables.ravel())
            space.index.touch(tables.ravel(), pool._next_stamp())
            pool._hits += tables.size
            held = BlockTables(self.allocator, num_rows=len(keys), partial=self.partial)
            held.tables, held.seq_len = tables, hit * self.block_size
            self.tables = self._books.tables = held
        for layer in self.layers:
            layer.num_written = held.seq_len
        self.prefix_hit_tokens = held.seq_len * len(keys)
        return held.seq_len

    def cache_prompt(self, keys: list[list[bytes]]) -> None:
        """After a call's prompt forward: its rows' full prompt blocks, holding `keys[r]` (each row's full blocks), stay
        in the pool for later calls."""
        space = self.space
        with self.lock:
            stamp = self.space.pool._next_stamp()
            tables = self.tables.tables
            for row, row_keys in enumerate(keys):
                added = space.index.insert(row_keys, tables[row, : len(row_keys)], stamp)
                self.allocator.incref(added)

    # --- bookkeeping under the pool's lock ----------------------------------------------------------------------
    def select_rows(self, indices) -> None:
        with self.lock:
            super().select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        with self.lock:
            super().batch_repeat_interleave(repeats)

    def fork_rows(self, source_rows: np.ndarray) -> None:
        with self.lock:
            super().fork_rows(source_rows)

    def crop(self, tokens_to_remove: int) -> None:
        with self.lock:
            super().crop(tokens_to_remove)

    def reset(self) -> None:
        with self.lock:
            self.space.index.touch(self.tables.tables.ravel(), self.space.pool._next_stamp())
            super().reset()
            self._ahead = 0

    def start_call(self) -> None:
        super().start_call()
        self._peak_own_blocks = len(np.unique(self.tables.tables))
        self._peak_storage_blocks = self.allocator.capacity
        self.prefix_hit_tokens = 0

    def release(self) -> CacheStats:
        """Give the call's blocks back to the pool (its cached prompt blocks stay cached); returns its figures."""
        with self.lock:
            stats = self.stats()
            self.reset()
            for layer in self.layers:
                layer.release()
            self._books.tables = None
            self.space.pool._leave_flight(self.space, self._books)
            self.space.pool._after_release(self.space, self)
        return stats

    def stats(self) -> CacheStats:
        self._note_peaks()
        bytes_per_token = sum(layer.bytes_per_token for layer in self.layers)
        return CacheStats(
            block_size=self.block_size,
            peak_blocks=self._peak_own_blocks,
            peak_kv_bytes=self._peak_own_blocks * self.space.block_bytes,
            pool_bytes=self._peak_storage_blocks * self.space.block_bytes,
            dense_kv_bytes=self._max_rows * self._max_seq_len * bytes_per_token,
            rows=self._max_rows,
            max_seq_len=self._max_seq_len,
            prefill_rows=self.prefill_rows,
            kv_cache_dtype=self.kv_cache_dtype,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )

    def kv_bytes(self) -> int:
        """Bytes of the blocks this cache references now."""
        return len(np.unique(self.tables.tables)) * self.space.block_bytes
