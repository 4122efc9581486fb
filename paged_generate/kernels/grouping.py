"""Member lists of groups of rows, as the shared-prefix attention paths read them (plain PyTorch, no Triton)."""

from typing import NamedTuple

import torch

__all__ = ["GroupMembers", "group_members"]


class GroupMembers(NamedTuple):
    """Rows of each group, side by side: group g's rows are ``member_rows[group_start[g]:group_start[g + 1]]``."""

    member_rows: torch.Tensor  # int32 [num_rows]
    group_start: torch.Tensor  # int32 [num_groups + 1]
    max_group_size: int
    row_slot: torch.Tensor  # int64 [num_rows], each row's place among its group's members


def group_members(row_group: torch.Tensor, num_groups: int, max_group_size: int | None = None) -> GroupMembers:
    """The member lists of ``row_group`` (int64 [num_rows], values in [0, num_groups)).

    They depend only on the grouping, so a caller builds them once per step and passes them to every layer. Without
    ``max_group_size`` (an upper bound of the group sizes; a smaller one leaves rows unserved) this reads the largest
    group size back from the device (one sync).
    """
    device = row_group.device
    row_group = row_group.long()
    order = torch.argsort(row_group, stable=True)
    counts = torch.zeros(num_groups, dtype=torch.int64, device=device)
    counts.index_add_(0, row_group, torch.ones_like(row_group))
    starts = torch.cumsum(counts, 0)
    group_start = torch.zeros(num_groups + 1, dtype=torch.int32, device=device)
    group_start[1:] = starts
    row_slot = torch.empty_like(order)
    row_slot[order] = torch.arange(len(order), device=device) - (starts - counts)[row_group[order]]
    if max_group_size is None:
        max_group_size = int(counts.max()) if num_groups else 0
    return GroupMembers(order.to(torch.int32), group_start, int(max_group_size), row_slot)
