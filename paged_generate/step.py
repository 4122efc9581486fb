"""The block-table metadata of one forward pass, built once and read by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from .block_tables import AppendPlan
from .shared_prefix import SharedPrefix, prefix_view

__all__ = ["DeviceSharedPrefix", "DeviceStep", "PagedStep"]


class DeviceStep:
    """A step's metadata as tensors on one device (layers of a `device_map` model may sit on several).

    Each field is built on first use, so a path that does not read it (the PyTorch path reading regular rows as views
    of the pool never needs `block_tables`) does not pay for it.

    block_tables: int32 [num_rows, num_blocks_per_row]; reused across steps while the tables are unchanged
    slot_mapping: int64 [num_rows * query_len], row-major (row 0's new tokens first)
    copy_src, copy_dst: int64 [num_copies]
    seq_lens: int32 [num_rows], tokens per row including this step's
    """

    def __init__(self, step: "PagedStep", device: torch.device):
        self.step, self.device = step, device
        self._kv_start_by_mask: dict = {}

    @cached_property
    def block_tables(self) -> torch.Tensor:
        # The tables array is replaced, never edited, when it changes: identity says whether the upload is current.
        return self.step.memo(self.device, lambda tables: _to(tables, torch.int32, self.device))

    @cached_property
    def slot_mapping(self) -> torch.Tensor:
        return _to(self.step.plan.slot_mapping.reshape(-1), torch.int64, self.device)

    @cached_property
    def copy_src(self) -> torch.Tensor:
        return _to(self.step.plan.copy_src, torch.int64, self.device)

    @cached_property
    def copy_dst(self) -> torch.Tensor:
        return _to(self.step.plan.copy_dst, torch.int64, self.device)

    @cached_property
    def seq_lens(self) -> torch.Tensor:
        return torch.full((self.step.num_rows,), self.step.seq_len, dtype=torch.int32, device=self.device)

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
    """Groups of rows sharing leading blocks, as `shared_prefix_attention` takes them, on one device.

    row_group: int64 [num_rows]; prefix_tables: int64 [num_groups, num_shared_blocks] (all of them shared);
    suffix_tables: int64 [num_rows, num_own_blocks]; suffix_len: tokens after the prefix, the same in every row
    prefix_layout: (first block, block stride between groups) when group g's shared blocks are
        first + g * stride + [0, 1, ...], so the prefix K/V is a strided view of the pool (no gather); else None.
    """

    row_group: torch.Tensor
    prefix_tables: torch.Tensor
    suffix_tables: torch.Tensor
    suffix_len: int
    prefix_layout: tuple[int, int] | None
    group_size: int
    _kernel_args: dict = field(default_factory=dict, repr=False, compare=False)

    def kernel_args(self, block_size: int) -> dict:
        """The grouping as the Triton shared-prefix kernel takes it, built once per step and device."""
        if not self._kernel_args:
            from .kernels import group_members

            num_groups, num_shared = self.prefix_tables.shape
            self._kernel_args.update(
                row_group=self.row_group,
                prefix_tables=self.prefix_tables,
                prefix_len=torch.full((num_groups,), num_shared * block_size, dtype=torch.int32,
                                      device=self.row_group.device),
                suffix_tables=self.suffix_tables,
                members=group_members(self.row_group, num_groups, max_group_size=self.group_size),
            )
        return self._kernel_args


@dataclass
class PagedStep:
    """One forward pass: `query_len` new tokens per row after `past_len` cached ones.

    Every row of a generate() call has the same length, so one `seq_len` describes them all.
    """

    past_len: int
    query_len: int
    block_size: int
    tables: np.ndarray  # [num_rows, num_blocks_per_row], after this step's allocation
    plan: AppendPlan
    pool_blocks: int  # blocks the allocator can hand out; the layers' pools grow to that
    shared: SharedPrefix | None = None
    tables_memo: dict = field(default_factory=dict, repr=False)  # the cache's, kept across steps
    _by_device: dict = field(default_factory=dict, repr=False)
    _shared_by_device: dict = field(default_factory=dict, repr=False)
    # Read by every layer, so attributes rather than properties:
    seq_len: int = field(init=False)  # past_len + query_len
    num_copies: int = field(init=False)  # copy-on-write block copies before the writes
    reads_rows_in_place: bool = field(init=False)  # rows are views of the pools (`row_layout`), no prefix to split

    def __post_init__(self):
        self.seq_len = self.past_len + self.query_len
        self.num_copies = len(self.plan.copy_src)
        self.reads_rows_in_place = self.row_layout is not None and not self.shares_prefix

    @property
    def num_rows(self) -> int:
        return self.tables.shape[0]

    def on(self, device: torch.device) -> DeviceStep:
        cached = self._by_device.get(device)
        if cached is None:
            cached = self._by_device[device] = DeviceStep(self, device)
        return cached

    def memo(self, key, derive):
        """`derive(tables)`, computed once per tables array: decode steps between new blocks keep the same array (it
        is replaced, never edited, when it changes), so their block tables are uploaded and inspected only once."""
        cached = self.tables_memo.get(key)
        if cached is None or cached[0] is not self.tables:
            cached = self.tables_memo[key] = (self.tables, derive(self.tables))
        return cached[1]

    @property
    def row_layout(self) -> tuple[int, int] | None:
        """(first, stride) when row r's blocks are first + r * stride + [0, 1, ...]: rows are then strided views of
        the pool and attention can read them in place (a fresh pool hands a lone row consecutive blocks)."""
        return self.memo("row_layout", lambda tables: _regular_layout(tables) if tables.size else None)

    @property
    def shares_prefix(self) -> bool:
        """A decode step whose rows come in groups holding the same leading blocks (beams or samples of a prompt)."""
        shared = self.shared
        return shared is not None and shared.group_size > 1 and shared.num_blocks > 0 and self.query_len == 1

    def rows_view(self, pool: torch.Tensor) -> torch.Tensor:
        """Every row's K (or V) as a strided view of `pool` [num_rows, num_kv_heads, reach, head_dim], `reach` >=
        `seq_len` tokens; only for a `row_layout`. A lone row reaches to the end of the pool (later steps slice the
        same view); rows side by side (stride 0: all share, else runs `stride` apart) reach their own blocks only, as
        the last row's run may end the pool."""
        first, _ = self.row_layout
        reach = pool.shape[0] - first if self.num_rows == 1 else self.tables.shape[1]
        return prefix_view(pool, self.row_layout, self.num_rows, reach)

    def shared_on(self, device: torch.device) -> DeviceSharedPrefix:
        cached = self._shared_by_device.get(device)
        if cached is None:
            cached = self._shared_by_device[device] = self._build_shared(device)
        return cached

    def _build_shared(self, device: torch.device) -> DeviceSharedPrefix:
        group_size, num_shared = self.shared.group_size, self.shared.num_blocks
        prefix = self.tables[::group_size, :num_shared]
        return DeviceSharedPrefix(
            row_group=_to(np.arange(self.num_rows) // group_size, torch.int64, device),
            prefix_tables=_to(prefix, torch.int64, device),
            suffix_tables=_to(self.tables[:, num_shared:], torch.int64, device),
            suffix_len=self.seq_len - num_shared * self.block_size,
            prefix_layout=_regular_layout(prefix),
            group_size=group_size,
        )


def _regular_layout(prefix: np.ndarray) -> tuple[int, int] | None:
    """(first, stride) if prefix[g, j] == first + g * stride + j for all g, j; else None."""
    first = int(prefix[0, 0])
    stride = int(prefix[1, 0] - first) if prefix.shape[0] > 1 else 0
    expected = first + stride * np.arange(prefix.shape[0])[:, None] + np.arange(prefix.shape[1])[None, :]
    return (first, stride) if stride >= 0 and np.array_equal(prefix, expected) else None


def _to(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if array.size == 0:
        return torch.empty(array.shape, dtype=dtype, device=device)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype, non_blocking=True)
