"""Groups of rows that hold the same leading blocks: the beams or samples of one prompt, or rows of equal prompts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["SharedPrefix"]


@dataclass(frozen=True, eq=False)
class SharedPrefix:
    """Every row of group g holds the same first `num_blocks` blocks.

    row_group: int64 [num_rows], the group of each row; groups are numbered 0, 1, ... in the order of their first row
    (build with `SharedPrefix.of`). Groups may have any size and their rows need not be adjacent.
    """

    row_group: np.ndarray
    num_blocks: int

    @classmethod
    def of(cls, row_group: np.ndarray, num_blocks: int) -> "SharedPrefix":
        """Number the groups of `row_group` (any labels) by their first row."""
        row_group = np.asarray(row_group, dtype=np.int64)
        labels, first, inverse = np.unique(row_group, return_index=True, return_inverse=True)
        if not np.array_equal(labels, np.arange(len(labels))) or not np.all(first[1:] > first[:-1]):
            rank = np.empty(len(labels), dtype=np.int64)
            rank[np.argsort(first)] = np.arange(len(labels))
            row_group = rank[inverse.reshape(-1)]
        row_group.flags.writeable = False
        return cls(row_group, num_blocks)

    @property
    def num_rows(self) -> int:
        return len(self.row_group)

    @cached_property
    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.row_group)

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    @cached_property
    def max_group_size(self) -> int:
        return int(self.group_sizes.max()) if self.num_rows else 0

    @cached_property
    def first_rows(self) -> np.ndarray:
        """int64 [num_groups]: the first row of each group (its table holds the shared blocks)."""
        return np.unique(self.row_group, return_index=True)[1]

    @cached_property
    def uniform_size(self) -> int | None:
        """The group size when group g is exactly rows [g * size, (g + 1) * size) for every g, else None."""
        if not self.num_rows:
            return None
        size = self.num_rows // self.num_groups
        contiguous = size * self.num_groups == self.num_rows
        return size if contiguous and np.array_equal(self.row_group, np.arange(self.num_rows) // size) else None

    def forked(self, source_rows: np.ndarray) -> "SharedPrefix":
        """New row j is a copy of old row source_rows[j] (fork, beam reorder, select): it stays in that row's group."""
        row_group = self.row_group[source_rows]
        if np.array_equal(row_group, self.row_group):
            return self
        return SharedPrefix.of(row_group, self.num_blocks)

    def cropped(self, num_blocks: int) -> "SharedPrefix":
        return self if num_blocks >= self.num_blocks else SharedPrefix(self.row_group, num_blocks)
