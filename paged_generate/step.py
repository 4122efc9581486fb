"""The block-table metadata of one forward pass, built once and read by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .block_tables import AppendPlan

__all__ = ["DeviceStep", "PagedStep"]


@dataclass(frozen=True)
class DeviceStep:
    """A step's metadata as tensors on one device (layers of a `device_map` model may sit on several).

    block_tables: int32 [num_rows, num_blocks_per_row]
    slot_mapping: int64 [num_rows * query_len], row-major (row 0's new tokens first)
    copy_src, copy_dst: int64 [num_copies]
    """

    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    copy_src: torch.Tensor
    copy_dst: torch.Tensor


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
    _by_device: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return self.past_len + self.query_len

    @property
    def num_rows(self) -> int:
        return self.tables.shape[0]

    def on(self, device: torch.device) -> DeviceStep:
        cached = self._by_device.get(device)
        if cached is None:
            cached = self._by_device[device] = DeviceStep(
                block_tables=_to(self.tables, torch.int32, device),
                slot_mapping=_to(self.plan.slot_mapping.reshape(-1), torch.int64, device),
                copy_src=_to(self.plan.copy_src, torch.int64, device),
                copy_dst=_to(self.plan.copy_dst, torch.int64, device),
            )
        return cached


def _to(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if array.size == 0:
        return torch.empty(array.shape, dtype=dtype, device=device)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype, non_blocking=True)
