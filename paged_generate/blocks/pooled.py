"""The block ids of one model's storage in a KV pool, shared by every call of that model (see paged_generate/pool.py)."""

from __future__ import annotations

import numpy as np

from .allocator import BlockAllocator

__all__ = ["PooledAllocator"]


class PooledAllocator(BlockAllocator):
    """A `BlockAllocator` whose ids only the pool adds or removes, as it grows or trims the storage behind them.

    - `allocate` never grows: the pool makes room (evicting cached blocks, growing the storage) before a forward plans
      its blocks, while no other forward of the model reads the storage (see `KVPool`).
    - Free ids are handed out lowest first, so that the ids above the highest one in use stay free and their storage
      can be released (`shrink`).

    Example
    -------
    >>> allocator = PooledAllocator(block_size=16)
    >>> allocator.grow(8)          # the pool grew the storage to 8 blocks
    >>> allocator.allocate(3)      # array([0, 1, 2])
    >>> allocator.shrink(allocator.highest_used() + 1)
    """

    def __init__(self, *, block_size: int):
        self._sorted = True
        super().__init__(block_size=block_size)

    def can_allocate(self, num_blocks: int, num_partial: int = 0) -> bool:
        return num_blocks <= self.num_free  # the pool's budget was applied when it made room

    def allocate(self, num_blocks: int) -> np.ndarray:
        if num_blocks > self.num_free:
            raise self.shortage(num_blocks)
        if not self._sorted:
            free = self._free_stack[: self.num_free]
            self._free_stack[: self.num_free] = np.sort(free)[::-1]  # the lowest on top
            self._sorted = True
        return super().allocate(num_blocks)

    def take(self, ids: np.ndarray) -> bool:
        return len(ids) == 0  # rows are not laid out in runs of their own in a shared pool

    def highest_used(self) -> int:
        """The highest id in use, -1 for none."""
        used = np.flatnonzero(self.ref_counts)
        return int(used[-1]) if len(used) else -1

    def shrink(self, capacity: int) -> None:
        """Drop the ids from `capacity` on, all free (the pool released their storage)."""
        if capacity >= self.capacity:
            return
        if self.ref_counts[capacity:].any():
            raise AssertionError(f"shrinking to {capacity} blocks would drop blocks in use")
        free = self._free_stack[: self.num_free]
        self._free_stack = free[free < capacity].copy()
        self.num_free = len(self._free_stack)
        self.ref_counts = self.ref_counts[:capacity].copy()

    def free_all(self) -> None:
        super().free_all()
        self._sorted = True

    def _push_free(self, ids: np.ndarray) -> None:
        if len(ids):
            self._sorted = False
        super()._push_free(ids)
