"""What a layer hands attention to read its paged K/V in one forward: `PagedRead`, its compressed form, and the
dequantized view attention's PyTorch path reads instead of compressed pools."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

import torch

from .layout import gather_rows, strided_rows
from .step import DeviceStep, PagedStep

__all__ = ["CompressedRead", "DenseRead", "PagedRead", "forget_handed_over", "handed_over", "paged_read_of"]


class PagedRead:
    """What attention needs to read one layer's paged K/V in this forward, handed over with the layer's pools.

    A layer whose attention has paged work to do returns its pools as "K/V" and hands this over (`paged_read_of`
    finds it again from the pool the attention function received); anything else attention receives is ordinary K/V.
    `quantized`: the pools hold compressed full blocks (`CompressedRead`); `storage_args`: what the Triton kernels take
    besides the pools to read them (nothing here).
    """

    __slots__ = ("layer", "step", "device_step")  # made per layer and step: kept light

    quantized = False
    storage_args = MappingProxyType({})

    def __init__(self, layer, step: PagedStep, device_step: DeviceStep):
        self.layer, self.step, self.device_step = layer, step, device_step  # the PagedLayer, this forward's step

    @property
    def keys(self) -> torch.Tensor:  # [num_blocks, block_size, num_kv_heads, head_dim]
        return self.layer.keys

    @property
    def values(self) -> torch.Tensor:
        return self.layer.values

    @property
    def use_triton(self) -> bool:
        return self.layer.use_triton

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """The dtypes attention computes K and V in (a compressed cache's: those of its partial blocks)."""
        return self.keys.dtype, self.values.dtype

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's K and V [num_rows, num_kv_heads, seq_len, head_dim] (see `PagedLayer.rows`)."""
        return self.layer.rows(self.step)


class CompressedRead(PagedRead):
    """A read of pools whose full blocks are compressed (`compressed.CompressedPools`): the Triton kernels read them
    as they are; the PyTorch path reads `dequantized()`."""

    __slots__ = ()
    quantized = True

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        storage = self.layer.storage
        return storage.partial_keys.dtype, storage.partial_values.dtype

    @property
    def storage_args(self) -> dict:
        storage = self.layer.storage
        return dict(key_scales=storage.key_scales, value_scales=storage.value_scales,
                    partial_key_cache=storage.partial_keys, partial_value_cache=storage.partial_values,
                    partial_slots=self.device_step.partial_slots)

    def dequantized(self) -> "DenseRead":
        """The step's blocks in the model's dtype, each distinct full block dequantized once (see `PagedStep.dense`)."""
        dense_step = self.step.dense_step
        device_step = dense_step.on(self.device_step.device)
        keys, values = self.layer.storage.dequantized(self.step, self.device_step)
        return DenseRead(keys, values, dense_step, device_step)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dequantized().rows()


@dataclass(frozen=True)
class DenseRead:
    """Pools of the blocks one step reads, in the model's dtype, and the step over their numbering: read like a
    `PagedRead` of an uncompressed layer by attention's PyTorch paths."""

    keys: torch.Tensor  # [num_dense_blocks, block_size, num_kv_heads, head_dim]
    values: torch.Tensor
    step: PagedStep
    device_step: DeviceStep

    quantized = False
    use_triton = False

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step
        if step.row_layout is None:
            tables = self.device_step.block_tables
            return gather_rows(self.keys, tables, step.seq_len), gather_rows(self.values, tables, step.seq_len)
        width = step.tables.shape[1]
        return tuple(strided_rows(pool, step.row_layout, step.num_rows, width)[:, :, : step.seq_len]
                     for pool in (self.keys, self.values))


# The read a layer handed over last in this thread (or task): attention runs right after its layer's update.
handed_over: ContextVar[PagedRead | None] = ContextVar("paged_generate_read", default=None)


def forget_handed_over() -> None:
    """Drop the last read handed over (end of a generate() call), so that it keeps no cache alive."""
    handed_over.set(None)


def paged_read_of(key: torch.Tensor) -> PagedRead | None:
    """The `PagedRead` whose pools attention received as `key`, or None for ordinary K/V."""
    read = handed_over.get()
    return read if read is not None and read.layer.keys is key else None
