"""Blocks still being filled, for caches that store full blocks compressed: each row's partially filled last block
keeps its tokens in the model's dtype, in a slot of a small side pool, until it is full and is quantized once.

Slots are addressed apart from block ids: the block tables, reference counts and copy-on-write stay as they are, and
a block id names a compressed block once full, or a slot (`slot_of[block]`) while partial. Every row of a call has the
same length, so the partial blocks are exactly the last column of the tables when `seq_len % block_size != 0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PartialBlocks", "SlotPlan"]

_NONE = np.zeros(0, dtype=np.int64)
_NONE.flags.writeable = False


@dataclass(frozen=True, eq=False)
class SlotPlan:
    """What one forward does with the slots, beside its block tables (int64 arrays of slot ids).

    slots: [num_rows], the slot of each row's partial last block after the step; None when the rows end on a block
        boundary (every block full). The same array object from step to step while it does not change.
    fill_slots: [num_rows], the slots holding the first tokens of the blocks this step completes, or None when the
        step starts on a block boundary or completes nothing. Released: the layers read them before writing.
    copy_src, copy_dst: copy-on-write of shared partial blocks, slot to slot, made before anything else.
    capacity: slots the layers' side pools must hold.
    """

    slots: np.ndarray | None
    fill_slots: np.ndarray | None
    copy_src: np.ndarray
    copy_dst: np.ndarray
    capacity: int


class PartialBlocks:
    """Slot bookkeeping of the partial blocks of one cache, and the peak of (full, partial) blocks held.

    `BlockTables` calls it after each change of the tables; see `SlotPlan` for what a step gets.

    Example
    -------
    >>> partial = PartialBlocks(block_size=16)
    >>> tables = BlockTables(allocator, num_rows=1, partial=partial)
    >>> tables.append(20)           # one full block (quantized at once), one partial block with 4 tokens in a slot
    >>> tables.slot_plan.slots
    array([0])
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slot_of = np.full(0, -1, dtype=np.int64)  # [block ids seen]: the block's slot, -1 for none
        self.block_in_slot = np.full(0, -1, dtype=np.int64)  # [capacity]: the block a slot holds, -1 for free
        self._free = np.zeros(0, dtype=np.int64)  # free slots; the top of the stack is at the end
        self._frontier: list[tuple[int, int]] = []  # (full, partial) block counts no other noted pair exceeds
        self.plan = SlotPlan(None, None, _NONE, _NONE, 0)

    @property
    def capacity(self) -> int:
        return len(self.block_in_slot)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    # --- after each change of the tables -------------------------------------------------------------------------
    def after_append(self, tables: np.ndarray, past_len: int, seq_len: int, copy_src: np.ndarray,
                     copy_dst: np.ndarray) -> SlotPlan:
        """Slots for an append of `seq_len - past_len` tokens that left `tables` [num_rows, blocks] and made the
        copy-on-write block copies `copy_src -> copy_dst` (partial blocks, all of them)."""
        bs = self.block_size
        old_col, old_fill = divmod(past_len, bs)
        new_col, new_fill = divmod(seq_len, bs)
        previous = self.plan
        if previous.slots is not None and old_fill and new_fill and new_col == old_col and not len(copy_src):
            # Most decode steps: every row writes into the partial block it already has a slot for.
            if previous.fill_slots is not None or len(previous.copy_src):
                self.plan = SlotPlan(previous.slots, None, _NONE, _NONE, self.capacity)
            return self.plan
        src_slots = self.slot_of[copy_src]
        dst_slots = self._assign(copy_dst)
        fill_slots = self.slot_of[tables[:, old_col]] if old_fill and new_col > old_col else None
        slots = None
        if new_fill:
            last = tables[:, new_col]
            slots = self.slot_of[last] if old_fill and new_col == old_col else self._assign(last)
            slots.flags.writeable = False
        if fill_slots is not None:  # after the new slots are taken: a layer reads these before it writes those
            self._release(fill_slots)
        self.plan = SlotPlan(slots, fill_slots, src_slots, dst_slots, self.capacity)
        return self.plan

    def after_share(self, ref_counts: np.ndarray) -> None:
        """Rows were forked, selected or reordered: the slots of blocks no row references any more are free."""
        held = self.block_in_slot >= 0
        if held.any():
            blocks = self.block_in_slot[held]
            dropped = blocks[ref_counts[blocks] == 0]
            if len(dropped):
                self._release(self.slot_of[dropped])
        # The plan's arrays follow the rows of the step that made it: the next append builds them anew.
        self.plan = SlotPlan(None, None, _NONE, _NONE, self.capacity)

    def after_crop(self, tables: np.ndarray, seq_len: int, ref_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows were cut to `seq_len` tokens. Returns (blocks, slots): full blocks that are partial again, and the
        slots they now take; their tokens are re-derived by dequantizing the block into its slot (they keep the
        values they had since the block was quantized, and more tokens can be written after them)."""
        self.after_share(ref_counts)
        col, fill = divmod(seq_len, self.block_size)
        blocks, slots = _NONE, _NONE
        if fill and tables.shape[0]:
            last = np.unique(tables[:, col])
            blocks = last[self._slot_or_none(last) < 0]
            slots = self._assign(blocks)
        return blocks, slots

    def clear(self) -> None:
        """Every slot free (the rows were dropped)."""
        self.slot_of[:] = -1
        self.block_in_slot[:] = -1
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self.plan = SlotPlan(None, None, _NONE, _NONE, self.capacity)

    # --- memory --------------------------------------------------------------------------------------------------
    def note(self, blocks_in_use: int) -> None:
        """Record the blocks held now: `blocks_in_use - num_used` full (compressed) ones and `num_used` partial."""
        pair = (blocks_in_use - self.num_used, self.num_used)
        if any(full >= pair[0] and part >= pair[1] for full, part in self._frontier):
            return
        self._frontier = [(f, p) for f, p in self._frontier if not (f <= pair[0] and p <= pair[1])] + [pair]

    def peak_bytes(self, full_block_bytes: int, partial_block_bytes: int) -> int:
        """The most bytes held at any noted time, a full block costing `full_block_bytes`, a partial one
        `partial_block_bytes` (any weights: the noted pairs no other exceeds are kept)."""
        return max((f * full_block_bytes + p * partial_block_bytes for f, p in self._frontier), default=0)

    # --- slots ---------------------------------------------------------------------------------------------------
    def _assign(self, blocks: np.ndarray) -> np.ndarray:
        """Fresh slots for `blocks` (distinct), recorded as theirs."""
        count = len(blocks)
        if count == 0:
            return _NONE
        if count > len(self._free):
            self._grow(self.capacity + max(count - len(self._free), self.capacity // 4, 1))
        slots = self._free[len(self._free) - count :][::-1].copy()
        self._free = self._free[: len(self._free) - count]
        self._reach(int(blocks.max()))
        self.slot_of[blocks] = slots
        self.block_in_slot[slots] = blocks
        return slots

    def _release(self, slots: np.ndarray) -> None:
        slots = np.unique(slots[slots >= 0])
        held = slots[self.block_in_slot[slots] >= 0]
        self.slot_of[self.block_in_slot[held]] = -1
        self.block_in_slot[held] = -1
        self._free = np.concatenate([self._free, held[::-1]])

    def _slot_or_none(self, blocks: np.ndarray) -> np.ndarray:
        self._reach(int(blocks.max()) if len(blocks) else 0)
        return self.slot_of[blocks]

    def _reach(self, block: int) -> None:
        if block >= len(self.slot_of):
            grown = np.full(max(block + 1, 2 * len(self.slot_of)), -1, dtype=np.int64)
            grown[: len(self.slot_of)] = self.slot_of
            self.slot_of = grown

    def _grow(self, capacity: int) -> None:
        added = np.arange(capacity - 1, self.capacity - 1, -1, dtype=np.int64)
        self.block_in_slot = np.concatenate([self.block_in_slot, np.full(len(added), -1, dtype=np.int64)])
        self._free = np.concatenate([added, self._free])  # new slots below the old free ones: lowest used first
