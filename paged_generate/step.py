"""The block-table metadata of one forward pass, built once by the cache and read by every layer."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .blocks import BlockCopies, SharedPrefix, SlotPlan
from .blocks.tables import NO_COPIES
from .kernels.grouping import GroupMembers, group_members
from .layout import regular_layout, strided_rows

__all__ = ["DenseView", "DeviceSharedPrefix", "DeviceStep", "MaskPattern", "PagedStep", "mark_mask", "mask_pattern"]


@dataclass(frozen=True)
class MaskPattern:
    """What a boolean mask [rows, 1, q_length, kv_length] that transformers built for a paged forward holds, when the
    kernels can apply it: causality for queries at positions q_offset + i over keys kv_offset + j, a sliding window (or
    none), and left padding, which they take as each row's first visible key (`DeviceStep.kv_start`).

    Recorded by the mask function registered with transformers (attention/__init__.py), which sees how the mask was
    built; a mask without one (a user's 4D mask, image tokens attending both ways, a prefix-LM) is applied exactly by
    the PyTorch path.
    """

    window: int | None
    q_offset: int
    kv_offset: int
    kv_length: int

    def matches(self, step: "PagedStep") -> bool:
        """Whether the pattern's positions are the step's (queries after the cached tokens, keys from 0)."""
        return self.kv_offset == 0 and self.kv_length == step.seq_len and self.q_offset == step.past_len


# The masks built for the forward running in this thread (or task), with their patterns: a model builds a few per
# forward (full and sliding layers), and its layers look theirs up by identity.
_marked: ContextVar[tuple] = ContextVar("paged_generate_masks", default=())
_MARKED_KEPT = 4


def mark_mask(mask: torch.Tensor, pattern: MaskPattern) -> None:
    _marked.set(((mask, pattern),) + _marked.get()[: _MARKED_KEPT - 1])


def mask_pattern(mask: torch.Tensor) -> MaskPattern | None:
    """The pattern `mark_mask` recorded for this very mask tensor, or None."""
    for marked, pattern in _marked.get():
        if marked is mask:
            return pattern
    return None


class PagedStep:
    """One forward pass: `query_len` new tokens per row after `past_len` cached ones.

    Every row of a generate() call has the same length, so one `seq_len` describes them all. What every layer reads
    is a plain attribute; what only some paths need is computed on first use.

    tables: int64 [num_rows, num_blocks_per_row], after this step's allocation (never edited: replaced on change)
    copy_src, copy_dst: int64 [num_copies], the copy-on-write copies to make before the writes
    pool_blocks: blocks the allocator can hand out; the layers' pools grow to that
    shared: which leading blocks groups of rows share (beams or samples of a prompt), or None
    slots: for a cache storing full blocks compressed, the slots of the partial blocks (see `blocks/partial.py`), or
        None. Then the copies above are of partial blocks, made slot to slot (`slots.copy_src` / `copy_dst`).
    """

    def __init__(self, *, past_len: int, query_len: int, block_size: int, tables: np.ndarray, copies: BlockCopies,
                 pool_blocks: int, shared: SharedPrefix | None = None, memo: dict | None = None,
                 slots: SlotPlan | None = None):
        self.past_len, self.query_len, self.block_size = past_len, query_len, block_size
        self.tables, self.pool_blocks, self.shared, self.slots = tables, pool_blocks, shared, slots
        self.copy_src, self.copy_dst = copies
        self._memo = {} if memo is None else memo  # the cache's, kept across steps: see `memo`
        self._by_device: dict[torch.device, DeviceStep] = {}
        self.seq_len = past_len + query_len
        self.num_copies = len(self.copy_src)
        self.shares_prefix = (shared is not None and shared.num_blocks > 0 and query_len == 1
                              and shared.max_group_size > 1)
        # Tokens an unsplit decode attention reads again for every extra row of a group (see attention/split_rule.py).
        self.redundant_prefix_tokens = (
            (self.num_rows - shared.num_groups) * shared.num_blocks * block_size if self.shares_prefix else 0)
        # Rows are views of the pools (`row_layout`) and share no prefix: attention can read them in place. (Rows of
        # groups sharing a prefix are not laid out regularly: the layout is not even looked at.)
        self.reads_rows_in_place = not self.shares_prefix and self.row_layout is not None

    @property
    def num_rows(self) -> int:
        return self.tables.shape[0]

    def memo(self, key, derive):
        """`derive(tables)`, computed once per tables array: decode steps between new blocks keep the same array, so
        their block tables are uploaded and inspected only once."""
        cached = self._memo.get(key)
        if cached is None or cached[0] is not self.tables:
            cached = self._memo[key] = (self.tables, derive(self.tables))
        return cached[1]

    @property
    def row_layout(self) -> tuple[int, int] | None:
        """(first, stride) when row r's blocks are first + r * stride + [0, 1, ...] (see `layout.regular_layout`)."""
        return self.memo("row_layout", regular_layout)

    @cached_property
    def slot_mapping(self) -> np.ndarray:
        """int64 [num_rows, query_len]: pool slot (block_id * block_size + offset) of each new token."""
        if self.query_len == 1:  # decode: one column, no fancy indexing
            block, offset = divmod(self.past_len, self.block_size)
            return self.tables[:, block : block + 1] * self.block_size + offset
        positions = np.arange(self.past_len, self.seq_len)
        return self.tables[:, positions // self.block_size] * self.block_size + positions % self.block_size

    def rows_view(self, pool: torch.Tensor) -> torch.Tensor:
        """Every row's K (or V) as a view of `pool` [num_rows, num_kv_heads, reach, head_dim], `reach` >= `seq_len`
        tokens; only for a `row_layout`. A lone row reaches to the end of the pool (later steps slice the same view);
        rows side by side reach their own blocks only, as the last row's run may end the pool."""
        first, _ = self.row_layout
        reach = pool.shape[0] - first if self.num_rows == 1 else self.tables.shape[1]
        return strided_rows(pool, self.row_layout, self.num_rows, reach)

    def on(self, device: torch.device) -> DeviceStep:
        cached = self._by_device.get(device)
        if cached is None:
            cached = self._by_device[device] = DeviceStep(self, device)
        return cached

    # --- compressed storage (`slots` set) ---------------------------------------------------------------------------
    @property
    def num_filled_columns(self) -> int:
        """Blocks per row this step completes; they are quantized as this step writes them."""
        return self.seq_len // self.block_size - self.past_len // self.block_size

    @property
    def tokens_to_fill(self) -> int:
        """The first this many new tokens of each row complete blocks; the others go to its partial block's slot."""
        filled = self.num_filled_columns
        return filled * self.block_size - self.past_len % self.block_size if filled else 0

    @cached_property
    def fill_blocks(self) -> np.ndarray:
        """int64 [num_rows * num_filled_columns]: the blocks this step completes, row-major."""
        bs = self.block_size
        return self.tables[:, self.past_len // bs : self.seq_len // bs].reshape(-1)

    @cached_property
    def slot_mapping_of_partial(self) -> np.ndarray:
        """int64 [num_rows * (query_len - tokens_to_fill)], row-major: where the new tokens that do not complete a
        block go in the side pool (slot * block_size + offset)."""
        if self.slots.slots is None:
            return np.zeros(0, dtype=np.int64)
        positions = np.arange(self.past_len + self.tokens_to_fill, self.seq_len)
        return (self.slots.slots[:, None] * self.block_size + positions % self.block_size).reshape(-1)

    @cached_property
    def dense(self) -> "DenseView":
        """What this step reads, as blocks in the model's dtype (see `DenseView`); the same object from step to step
        until the tables, the slots or the number of full blocks change."""
        num_full = self.seq_len // self.block_size
        slots = self.slots.slots
        cached = self._memo.get("dense")
        if cached is None or cached[0] is not self.tables or cached[1] is not slots or cached[2] != num_full:
            cached = self._memo["dense"] = (self.tables, slots, num_full, DenseView.of(self.tables, num_full, slots))
        return cached[3]

    @cached_property
    def dense_step(self) -> "PagedStep":
        """This step over `dense.tables`: the blocks attention reads once they are dequantized (no copies to make)."""
        view = self.dense
        return PagedStep(past_len=self.past_len, query_len=self.query_len, block_size=self.block_size,
                         tables=view.tables, copies=NO_COPIES, pool_blocks=view.num_blocks, shared=self.shared,
                         memo=view.memo)


@dataclass(frozen=True, eq=False)
class DenseView:
    """The blocks a step of a compressing cache reads, numbered for a small pool of them in the model's dtype: the
    distinct full blocks of all rows, dequantized once each (a group's shared prefix once for the group), then each
    row's partial block from its slot.

    blocks: int64 [num_full_blocks], the distinct full blocks, ascending; they become blocks 0 .. num_full_blocks - 1
    slots: int64 [num_rows] the slots of the rows' partial blocks, which become blocks num_full_blocks + row; or empty
    tables: int64 [num_rows, blocks per row], the rows' tables in that numbering
    memo: what steps over these tables derive from them (uploads, layout), kept while the view lasts
    """

    blocks: np.ndarray
    slots: np.ndarray
    tables: np.ndarray
    memo: dict

    @classmethod
    def of(cls, tables: np.ndarray, num_full: int, slots: np.ndarray | None) -> "DenseView":
        blocks, inverse = np.unique(tables[:, :num_full], return_inverse=True)
        dense = inverse.reshape(tables.shape[0], num_full)
        if slots is not None:
            partial = len(blocks) + np.arange(tables.shape[0], dtype=np.int64)
            dense = np.concatenate([dense, partial[:, None]], axis=1)
        else:
            slots = np.zeros(0, dtype=np.int64)
        return cls(blocks, slots, np.ascontiguousarray(dense, dtype=np.int64), {})

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) + len(self.slots)


class DeviceStep:
    """A step's metadata as tensors on one device (layers of a `device_map` model may sit on several).

    Each field is built on first use, so a path that does not read it (rows read in place never need `block_tables`)
    does not pay for it.

    block_tables: int32 [num_rows, num_blocks_per_row]; uploaded once per tables array
    slot_mapping: int64 [num_rows * query_len], row-major (row 0's new tokens first)
    copy_src, copy_dst: int64 [num_copies]
    seq_lens: int32 [num_rows], tokens per row including this step's
    """

    def __init__(self, step: PagedStep, device: torch.device):
        self.step, self.device = step, device
        self._kv_start_by_mask: dict = {}

    @cached_property
    def block_tables(self) -> torch.Tensor:
        return self.step.memo((self.device, "tables"), lambda tables: _to(tables, torch.int32, self.device))

    @cached_property
    def slot_mapping(self) -> torch.Tensor:
        return _to(self.step.slot_mapping.reshape(-1), torch.int64, self.device)

    @cached_property
    def copy_src(self) -> torch.Tensor:
        return _to(self.step.copy_src, torch.int64, self.device)

    @cached_property
    def copy_dst(self) -> torch.Tensor:
        return _to(self.step.copy_dst, torch.int64, self.device)

    @cached_property
    def seq_lens(self) -> torch.Tensor:
        return torch.full((self.step.num_rows,), self.step.seq_len, dtype=torch.int32, device=self.device)

    # Compressed storage: see `PagedStep.slots`.
    @cached_property
    def fill_blocks(self) -> torch.Tensor:
        return _to(self.step.fill_blocks, torch.int64, self.device)

    @cached_property
    def fill_slots(self) -> torch.Tensor:
        return _to(self.step.slots.fill_slots, torch.int64, self.device)

    @cached_property
    def slot_mapping_of_partial(self) -> torch.Tensor:
        return _to(self.step.slot_mapping_of_partial, torch.int64, self.device)

    @cached_property
    def slot_copy_src(self) -> torch.Tensor:
        return _to(self.step.slots.copy_src, torch.int64, self.device)

    @cached_property
    def slot_copy_dst(self) -> torch.Tensor:
        return _to(self.step.slots.copy_dst, torch.int64, self.device)

    @cached_property
    def partial_slots(self) -> torch.Tensor:
        """int32 [num_rows]: the slot of each row's partial block (-1 where every block is full), as the kernels take
        it; uploaded once while the slots stay the same."""
        step = self.step
        slots = step.slots.slots
        if slots is None:
            return torch.full((step.num_rows,), -1, dtype=torch.int32, device=self.device)
        cached = step._memo.get((self.device, "partial_slots"))
        if cached is None or cached[0] is not slots:
            cached = step._memo[(self.device, "partial_slots")] = (slots, _to(slots, torch.int32, self.device))
        return cached[1]

    @cached_property
    def dense_blocks(self) -> torch.Tensor:
        """`PagedStep.dense`'s blocks and slots on this device, uploaded once per view."""
        return self._dense_upload("blocks")

    @cached_property
    def dense_slots(self) -> torch.Tensor:
        return self._dense_upload("slots")

    def _dense_upload(self, name: str) -> torch.Tensor:
        view = self.step.dense
        key = (self.device, name)
        if key not in view.memo:
            view.memo[key] = _to(getattr(view, name), torch.int64, self.device)
        return view.memo[key]

    @cached_property
    def shared(self) -> DeviceSharedPrefix:
        """The step's groups (`PagedStep.shares_prefix` must hold), as both shared-prefix paths take them."""
        step = self.step
        return step.memo((self.device, "shared"),
                         lambda tables: DeviceSharedPrefix.of(step.shared, tables, step.block_size, self.device))

    def kv_start(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """int32 [num_rows]: first key position each row may see, from transformers' boolean mask
        [num_rows, 1, query_len, seq_len] (left padding; causality and the window are the kernel's own).
        Computed once per mask and forward, not once per layer."""
        if attention_mask is None:
            return None
        cached = self._kv_start_by_mask.get(id(attention_mask))
        if cached is None or cached[0] is not attention_mask:
            seen_by_any_query = attention_mask[:, 0].any(dim=1)  # [num_rows, seq_len]
            kv_start = seen_by_any_query.to(torch.uint8).argmax(dim=-1).to(torch.int32)
            cached = self._kv_start_by_mask[id(attention_mask)] = (attention_mask, kv_start)
        return cached[1]


@dataclass(frozen=True)
class DeviceSharedPrefix:
    """Groups of rows sharing leading blocks, as `shared_prefix_attention` and the Triton kernel take them; the same
    for every step until the tables change.

    row_group: int64 [num_rows]; first_rows: int64 [num_groups], each group's first row; prefix_tables: int64 [num_groups, num_shared_blocks] (all of them shared);
    prefix_len: int32 [num_groups], shared tokens; suffix_tables: int64 [num_rows, num_own_blocks];
    prefix_layout: (first, stride) when the groups' shared blocks are a strided view of the pool (no gather), else None;
    members: the rows of each group side by side (`kernels.group_members`).
    """

    row_group: torch.Tensor
    first_rows: torch.Tensor
    prefix_tables: torch.Tensor
    prefix_len: torch.Tensor
    suffix_tables: torch.Tensor
    prefix_layout: tuple[int, int] | None
    members: GroupMembers
    num_shared_blocks: int

    @classmethod
    def of(cls, shared: SharedPrefix, tables: np.ndarray, block_size: int, device: torch.device) -> "DeviceSharedPrefix":
        num_shared = shared.num_blocks
        prefix = tables[shared.first_rows, :num_shared]
        row_group = _to(shared.row_group, torch.int64, device)
        return cls(
            row_group=row_group,
            first_rows=_to(shared.first_rows, torch.int64, device),
            prefix_tables=_to(prefix, torch.int64, device),
            prefix_len=torch.full((shared.num_groups,), num_shared * block_size, dtype=torch.int32, device=device),
            suffix_tables=_to(tables[:, num_shared:], torch.int64, device),
            prefix_layout=regular_layout(prefix),
            members=group_members(row_group, shared.num_groups, max_group_size=shared.max_group_size),
            num_shared_blocks=num_shared,
        )

    @cached_property
    def kernel_args(self) -> dict:
        """The grouping as `kernels.shared_prefix_paged_attention` takes it."""
        return dict(row_group=self.row_group, prefix_tables=self.prefix_tables, prefix_len=self.prefix_len,
                    suffix_tables=self.suffix_tables, members=self.members)


def _to(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if array.size == 0:
        return torch.empty(array.shape, dtype=dtype, device=device)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)  # torch refuses read-only arrays; a copy of a few ints
    return torch.from_numpy(array).to(device=device, dtype=dtype, non_blocking=True)
