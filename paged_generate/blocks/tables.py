"""Block tables of the rows of one generate() call: fork, append with copy-on-write, select, crop, free."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .allocator import BlockAllocator
from .groups import SharedPrefix
from .partial import PartialBlocks, SlotPlan
from .sizes import cdiv

__all__ = ["BlockCopies", "BlockTables"]

_NO_BLOCKS = np.zeros(0, dtype=np.int64)
_NO_BLOCKS.flags.writeable = False


class BlockCopies(NamedTuple):
    """Copy-on-write copies a step makes before writing: block copy_src[i] -> copy_dst[i], int64 [num_copies] each,
    all of them in one batched copy."""

    copy_src: np.ndarray
    copy_dst: np.ndarray


NO_COPIES = BlockCopies(_NO_BLOCKS, _NO_BLOCKS)


class BlockTables:
    """One row of block ids per sequence; every row holds `seq_len` tokens (generate() left-pads, so lengths agree).

    `tables` is a dense [num_rows, ceil(seq_len / block_size)] int64 array, replaced (never edited in place) whenever
    it changes. Rows share blocks by reference; the allocator's counts always equal the number of table entries
    pointing at each block.
    """

    def __init__(self, allocator: BlockAllocator, num_rows: int = 0, row_stride: int | None = None,
                 partial: PartialBlocks | None = None):
        """`row_stride`: blocks between the first blocks of consecutive rows, when the rows are expected to grow side
        by side to that many blocks each (see `_fresh_columns`). `partial`: the slots of partial blocks, for caches
        that compress full blocks (see `blocks/partial.py`); kept up to date with every change of the tables."""
        self.allocator = allocator
        self.row_stride = row_stride
        self.partial = partial
        self.block_size = allocator.block_size
        self.tables = np.zeros((num_rows, 0), dtype=np.int64)
        self.seq_len = 0
        # Only fork and select can make rows share a tail block; until then appends skip the sharing check.
        self._tails_may_be_shared = False
        # Which leading blocks groups of rows share: set by fork, kept by selects.
        self.shared: SharedPrefix | None = None

    @property
    def num_rows(self) -> int:
        return self.tables.shape[0]

    @property
    def slot_plan(self) -> SlotPlan | None:
        """The slots of the latest append (compressing caches only)."""
        return self.partial.plan if self.partial is not None else None

    def blocks_needed_to_append(self, num_tokens: int) -> int:
        """Blocks `append(num_tokens)` would take: copies of shared partial blocks plus fresh blocks."""
        return len(self._rows_to_copy()) + self.num_rows * self._num_new_columns(num_tokens)

    def append(self, num_tokens: int) -> BlockCopies:
        """Reserve slots for `num_tokens` more tokens in every row; returns the copies to make before writing.

        A row whose last, partially filled block is also referenced by another row gets its own copy first (the first
        row referencing a block keeps it). Nothing changes when the allocator cannot supply the blocks.
        """
        if num_tokens == 1 and self.seq_len % self.block_size and not self._tails_may_be_shared:
            # Most decode steps: every row's last block has room and is its own; nothing to allocate or copy.
            self.seq_len += 1
            if self.partial is not None:
                self.partial.after_append(self.tables, self.seq_len - 1, self.seq_len, *NO_COPIES)
            return NO_COPIES
        rows_to_copy = self._rows_to_copy()
        needed = len(rows_to_copy) + self.num_rows * self._num_new_columns(num_tokens)
        # After the append every row's partial last block is its own (fresh, or copied on write).
        num_partial = self.num_rows if self.partial is not None and (self.seq_len + num_tokens) % self.block_size else 0
        if not self.allocator.can_allocate(needed, num_partial):
            raise self.allocator.shortage(needed, num_partial)  # before any state changes
        copies = self._copy_tails(rows_to_copy)
        num_new = self._num_new_columns(num_tokens)
        if num_new:
            self.tables = np.concatenate([self.tables, self._fresh_columns(num_new)], axis=1)
        self.seq_len += num_tokens
        if self.partial is not None:
            self.partial.after_append(self.tables, self.seq_len - num_tokens, self.seq_len, *copies)
            self.partial.note(self.allocator.num_used)
        return copies

    def _fresh_columns(self, num_new: int) -> np.ndarray:
        """[num_rows, num_new] new block ids, from the allocator in its order; except for rows given a `row_stride`,
        which are first placed that many blocks apart and then continue their own runs, while those ids are free.
        Such rows stay strided views of the pool, which attention reads in place (rows handed blocks in turn would
        interleave, and attention would gather them every step)."""
        if self.row_stride and self.num_rows > 1:
            if self.tables.shape[1]:
                wanted = self.tables[:, -1:] + 1 + np.arange(num_new)
            else:
                first = self.allocator.next_id()
                wanted = first + self.row_stride * np.arange(self.num_rows)[:, None] + np.arange(num_new)
            if self.allocator.take(wanted.ravel()):
                return wanted
        return self.allocator.allocate(self.num_rows * num_new).reshape(self.num_rows, num_new)

    def fork(self, repeats: int) -> None:
        """Row i becomes rows i*repeats .. i*repeats+repeats-1, all sharing its blocks (no copy)."""
        if repeats != 1:
            self.fork_rows(np.repeat(np.arange(self.num_rows), repeats))

    def fork_rows(self, source_rows: np.ndarray) -> None:
        """New row j shares all the blocks of old row `source_rows[j]` (no copy); rows forked from one row form a
        group sharing its full blocks. Every old row must appear (a dropped row's blocks are released, as `select`)."""
        self._share(source_rows)
        if self.shared is None:
            full_blocks = self.seq_len // self.block_size  # a partial block is copied on write: not shared for long
            self.shared = SharedPrefix.of(source_rows, full_blocks)

    def select(self, row_indices: np.ndarray) -> None:
        """New row j is old row `row_indices[j]`; indices may repeat (shared) or be dropped (freed)."""
        self._share(row_indices)

    def _share(self, source_rows: np.ndarray) -> None:
        new_tables = self.tables[source_rows]
        self.allocator.replace_references(new_tables.ravel(), self.tables.ravel())
        self.tables = new_tables
        self._tails_may_be_shared = True
        if self.shared is not None:
            self.shared = self.shared.forked(source_rows)
        if self.partial is not None:
            self.partial.after_share(self.allocator.ref_counts)

    def crop(self, new_seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Forget the tokens from position `new_seq_len` on; blocks left empty are released.

        With `partial` slots: returns (blocks, slots), the full blocks that are partial again and the slots their
        tokens go back to (see `PartialBlocks.after_crop`); None otherwise."""
        if new_seq_len >= self.seq_len:
            return None if self.partial is None else (_NO_BLOCKS, _NO_BLOCKS)
        keep = cdiv(new_seq_len, self.block_size)
        self.allocator.decref(self.tables[:, keep:].ravel())
        self.tables = self.tables[:, :keep]
        self.seq_len = new_seq_len
        self._tails_may_be_shared = True  # a shared full block may now be a partial tail
        if self.shared is not None:
            self.shared = self.shared.cropped(new_seq_len // self.block_size)
        if self.partial is None:
            return None
        reopened = self.partial.after_crop(self.tables, new_seq_len, self.allocator.ref_counts)
        self.partial.note(self.allocator.num_used)
        return reopened

    def free(self) -> None:
        """Drop every row (the call's blocks go back to the free list)."""
        self.allocator.decref(self.tables.ravel())
        self.tables = np.zeros((0, 0), dtype=np.int64)
        self.seq_len = 0
        self.shared = None
        if self.partial is not None:
            self.partial.clear()

    def _num_new_columns(self, num_tokens: int) -> int:
        return cdiv(self.seq_len + num_tokens, self.block_size) - self.tables.shape[1]

    def _rows_to_copy(self) -> np.ndarray:
        """Rows whose last block is partial and referenced elsewhere, except the first row holding each such block
        (it keeps the block when the other references are all tails about to be copied)."""
        if not (self._tails_may_be_shared and self.seq_len % self.block_size and self.num_rows):
            return _NO_BLOCKS
        tails = self.tables[:, -1]
        shared = np.flatnonzero(self.allocator.ref_counts[tails] > 1)  # most rows' tails are their own
        if not len(shared):
            return _NO_BLOCKS
        # The rows holding shared tails, grouped by block (stable: the first holder of each block comes first).
        holders = shared[np.argsort(tails[shared], kind="stable")]
        held = tails[holders]
        first = np.empty(len(holders), dtype=bool)
        first[0] = True
        np.not_equal(held[1:], held[:-1], out=first[1:])  # the first holder of each block
        if self.allocator.ref_counts[held[first]].sum() == len(holders):
            return holders[~first]  # every reference is one of these tails: each first holder keeps its block
        return holders  # references from elsewhere too (a crop left a shared full block partial): every holder copies

    def _copy_tails(self, rows: np.ndarray) -> BlockCopies:
        self._tails_may_be_shared = False
        if not len(rows):
            return NO_COPIES
        src = self.tables[rows, -1]
        dst = self.allocator.allocate(len(rows))
        self.allocator.decref(src)
        self.tables = self.tables.copy()  # replaced, not edited: a step's tables never change under it
        self.tables[rows, -1] = dst
        return BlockCopies(src, dst)
