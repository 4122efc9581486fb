"""Reference-counted pool of fixed-size KV blocks: pure bookkeeping, no tensors of the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OutOfBlocksError

__all__ = ["BlockAllocator", "ByteCap"]

_NO_LIMIT = 2**31 - 1  # block ids are int32 in the device-side tables


@dataclass(frozen=True)
class ByteCap:
    """A cap on the bytes the blocks in use hold (`enable_paged_cache(max_cache_bytes=...)`), summed over layers.

    A block costs `full_bytes` once full and `partial_bytes` while partially filled: the same in the model's dtype;
    with full blocks stored compressed, their compressed K/V and scales, and a partial block its K/V in the model's dtype.
    """

    max_bytes: int
    full_bytes: int
    partial_bytes: int

    def held(self, num_blocks: int, num_partial: int) -> int:
        """Bytes of `num_blocks` blocks in use, `num_partial` of them partial."""
        return (num_blocks - num_partial) * self.full_bytes + num_partial * self.partial_bytes

    @property
    def max_blocks(self) -> int:
        """The most blocks that can be in use under the cap (all of them full)."""
        return self.max_bytes // self.full_bytes


class BlockAllocator:
    """Hands out block ids of a pool that grows on demand up to `max_blocks`.

    A block's reference count is the number of block-table entries pointing at it; a block whose count falls to 0 goes
    back on the free list at once. All methods take and return numpy int64 arrays so that whole rows are handled
    without Python loops.

    Example
    -------
    >>> a = BlockAllocator(block_size=16)
    >>> ids = a.allocate(3)            # counts 1
    >>> a.incref(ids[:1])              # shared by a second table: count 2
    >>> a.decref(ids)                  # ids[1:] are free again
    >>> int(a.num_used)
    1
    """

    def __init__(self, *, block_size: int, capacity: int = 0, max_blocks: int | None = None,
                 byte_cap: ByteCap | None = None):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.byte_cap = byte_cap
        self.ref_counts = np.zeros(0, dtype=np.int64)
        self._free_stack = np.zeros(0, dtype=np.int64)  # free ids; the top of the stack is at num_free - 1
        self.num_free = 0
        self.peak_used = 0
        self.grow(capacity)

    @property
    def capacity(self) -> int:
        return len(self.ref_counts)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def can_allocate(self, num_blocks: int, num_partial: int = 0) -> bool:
        """Whether `num_blocks` more blocks fit under the caps, `num_partial` of the blocks then in use being partial
        (they may cost more bytes than full ones: see `ByteCap`)."""
        if self.num_used + num_blocks > self._limit():
            return False
        cap = self.byte_cap
        return cap is None or cap.held(self.num_used + num_blocks, num_partial) <= cap.max_bytes

    def shortage(self, num_blocks: int, num_partial: int = 0) -> OutOfBlocksError:
        """The error saying that `num_blocks` more blocks (`num_partial` of those then in use partial) do not fit."""
        cap = self.byte_cap
        over_bytes = cap is not None and cap.held(self.num_used + num_blocks, num_partial) > cap.max_bytes
        return OutOfBlocksError(
            needed=num_blocks, in_use=self.num_used, max_blocks=self._limit(), block_size=self.block_size,
            max_cache_bytes=cap.max_bytes if over_bytes else None,
            needed_bytes=cap.held(self.num_used + num_blocks, num_partial) if over_bytes else None)

    def grow(self, new_capacity: int) -> None:
        """Extend the pool to `new_capacity` ids (never shrinks). New ids are handed out lowest first."""
        new_capacity = min(new_capacity, self._limit())
        old_capacity = self.capacity
        if new_capacity <= old_capacity:
            return
        new_ids = np.arange(new_capacity - 1, old_capacity - 1, -1, dtype=np.int64)
        self.ref_counts = np.concatenate([self.ref_counts, np.zeros(new_capacity - old_capacity, dtype=np.int64)])
        self._free_stack = np.concatenate([new_ids, self._free_stack[: self.num_free]])
        self.num_free += len(new_ids)

    def allocate(self, num_blocks: int) -> np.ndarray:
        """Take `num_blocks` free ids (count 1 each), growing the pool geometrically when it runs dry."""
        if num_blocks == 0:
            return np.zeros(0, dtype=np.int64)
        if not self.can_allocate(num_blocks):
            raise self.shortage(num_blocks)
        if num_blocks > self.num_free:
            self.grow(max(self.num_used + num_blocks, self.capacity + self.capacity // 4))
        top = self.num_free
        ids = self._free_stack[top - num_blocks : top][::-1].copy()
        self.num_free -= num_blocks
        self.ref_counts[ids] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return ids

    def next_id(self) -> int:
        """The id `allocate` would hand out first."""
        return int(self._free_stack[self.num_free - 1]) if self.num_free else self.capacity

    def take(self, ids: np.ndarray) -> bool:
        """Take these particular ids (count 1 each), growing the pool to reach them, if all are free, distinct and
        under `max_blocks`; else take nothing and return False. Lets a row's next block follow its last one."""
        if len(ids) == 0:
            return True
        top = int(ids.max())
        if int(ids.min()) < 0 or top >= self._limit() or not self.can_allocate(len(ids)):
            return False
        known = ids[ids < self.capacity]
        if self.ref_counts[known].any() or len(np.unique(ids)) != len(ids):
            return False
        if top >= self.capacity:
            self.grow(max(top + 1, self.capacity + self.capacity // 4))
        free = self._free_stack[: self.num_free]
        self._free_stack = free[~np.isin(free, ids)]  # the other free ids keep their order
        self.num_free = len(self._free_stack)
        self.ref_counts[ids] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return True

    def incref(self, ids: np.ndarray, times: int = 1) -> None:
        np.add.at(self.ref_counts, ids, times)

    def replace_references(self, new_ids: np.ndarray, old_ids: np.ndarray) -> None:
        """Table entries `old_ids` become `new_ids` (a fork, select or beam reorder): counts move by the difference;
        blocks left unreferenced are freed. One pass over the pool's counts, however many entries move."""
        delta = np.bincount(new_ids, minlength=self.capacity) - np.bincount(old_ids, minlength=self.capacity)
        self.ref_counts += delta
        if (self.ref_counts < 0).any():
            raise AssertionError(f"negative reference count on blocks {np.flatnonzero(self.ref_counts < 0)}")
        self._push_free(np.flatnonzero((delta < 0) & (self.ref_counts == 0)))

    def decref(self, ids: np.ndarray) -> None:
        """Drop one reference per entry of `ids` (repeats allowed); blocks reaching 0 are freed."""
        if len(ids) == 0:
            return
        np.subtract.at(self.ref_counts, ids, 1)
        counts = self.ref_counts[ids]
        if counts.min() > 0:  # nothing freed (the common case: copies of shared blocks)
            return
        if (counts < 0).any():
            raise AssertionError(f"negative reference count on blocks {np.unique(ids[counts < 0])}")
        self._push_free(np.unique(ids[counts == 0]))

    def free_all(self) -> None:
        """Return every block to the free list (end of a call, or an error)."""
        self.ref_counts[:] = 0
        self._free_stack = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self.num_free = self.capacity

    def _push_free(self, ids: np.ndarray) -> None:
        n = len(ids)
        if n == 0:
            return
        stack = self._free_stack
        if self.num_free + n > len(stack):
            stack = np.concatenate([stack, np.zeros(self.num_free + n - len(stack), dtype=np.int64)])
        stack[self.num_free : self.num_free + n] = ids[::-1]
        self._free_stack = stack
        self.num_free += n

    def _limit(self) -> int:
        limit = self.max_blocks if self.max_blocks is not None else _NO_LIMIT
        return limit if self.byte_cap is None else min(limit, self.byte_cap.max_blocks)
