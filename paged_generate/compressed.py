"""One layer's K/V when full blocks are stored compressed (`kv_cache_dtype="int8"` or `"fp8"`).

Full blocks sit quantized in pools addressed by block id, with a scale per block and KV head (`quantize.py`); each
row's partially filled last block keeps its tokens in the model's dtype in a small side pool addressed by slot
(`blocks/partial.py`), until the block is full and is quantized once. A step writes in this order: copy-on-write
copies of shared partial blocks (slot to slot), then the blocks it completes (their earlier tokens from the slots,
the rest from the new K/V, quantized together), then the remaining new tokens into the slots.
"""

from __future__ import annotations

import torch

from .kv_ops import copy_blocks, grown, tokens_major, write_kv
from .quantize import dequantize_blocks, quantize_blocks, storage_dtype
from .step import DeviceStep, PagedStep

__all__ = ["CompressedPools"]


class CompressedPools:
    """One layer's storage for a compressing cache; pools start empty and grow with the cache's bookkeeping.

    keys, values: [num_blocks, block_size, num_kv_heads, head_dim] int8 / float8_e4m3fn, full blocks by block id
    key_scales, value_scales: fp32 [num_blocks, num_kv_heads]
    partial_keys, partial_values: [num_slots, block_size, num_kv_heads, head_dim] in the model's dtype, by slot
    """

    def __init__(self, kv_cache_dtype: str, key_states: torch.Tensor, value_states: torch.Tensor, block_size: int):
        # key_states / value_states: [num_rows, num_kv_heads, query_len, head_dim], for shapes, dtype and device
        self.kv_cache_dtype = kv_cache_dtype
        self.dtype, device = key_states.dtype, key_states.device
        heads = key_states.shape[1]
        stored = storage_dtype(kv_cache_dtype)

        def pools(dtype, head_dim):
            return torch.zeros((0, block_size, heads, head_dim), dtype=dtype, device=device)

        self.keys, self.values = pools(stored, key_states.shape[-1]), pools(stored, value_states.shape[-1])
        self.key_scales = torch.zeros((0, heads), dtype=torch.float32, device=device)
        self.value_scales = torch.zeros((0, heads), dtype=torch.float32, device=device)
        self.partial_keys = pools(self.dtype, key_states.shape[-1])
        self.partial_values = pools(self.dtype, value_states.shape[-1])
        elements = block_size * heads * (key_states.shape[-1] + value_states.shape[-1])
        # What one block costs: compressed (data and both scales) once full, in the model's dtype while partial.
        self.full_block_bytes = elements * self.keys.element_size() + 2 * heads * 4
        self.partial_block_bytes = elements * key_states.element_size()

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[0]

    @property
    def num_slots(self) -> int:
        return self.partial_keys.shape[0]

    def pool_bytes(self, num_blocks: int, num_slots: int) -> int:
        return num_blocks * self.full_block_bytes + num_slots * self.partial_block_bytes

    def provide(self, num_blocks: int, num_slots: int) -> None:
        """Grow the pools to `num_blocks` blocks and `num_slots` slots (never shrinks)."""
        if self.num_blocks < num_blocks:
            self.keys, self.values = grown(self.keys, num_blocks), grown(self.values, num_blocks)
            self.key_scales = grown(self.key_scales, num_blocks)
            self.value_scales = grown(self.value_scales, num_blocks)
        if self.num_slots < num_slots:
            self.partial_keys = grown(self.partial_keys, num_slots)
            self.partial_values = grown(self.partial_values, num_slots)

    def store(self, step: PagedStep, device_step: DeviceStep, key_states: torch.Tensor, value_states: torch.Tensor,
              *, use_triton: bool) -> None:
        """Write one step's new K/V [num_rows, num_kv_heads, query_len, head_dim] (see the module docstring)."""
        if len(step.slots.copy_src):
            copy_blocks(self.partial_keys, self.partial_values, device_step.slot_copy_src, device_step.slot_copy_dst,
                        use_triton=use_triton)
        fill = step.tokens_to_fill
        if fill:
            self._complete(step, device_step, key_states[:, :, :fill], self.keys, self.key_scales, self.partial_keys)
            self._complete(step, device_step, value_states[:, :, :fill], self.values, self.value_scales,
                           self.partial_values)
        if fill < step.query_len:
            write_kv(tokens_major(key_states[:, :, fill:]), tokens_major(value_states[:, :, fill:]),
                     self.partial_keys, self.partial_values, device_step.slot_mapping_of_partial, use_triton=use_triton)

    def _complete(self, step: PagedStep, device_step: DeviceStep, states: torch.Tensor, pool: torch.Tensor,
                  scales: torch.Tensor, partial: torch.Tensor) -> None:
        """Quantize the blocks this step completes: their tokens from earlier steps (in the slots) and `states`
        [num_rows, num_kv_heads, tokens_to_fill, head_dim]."""
        num_rows, heads, _, head_dim = states.shape
        tokens = states.transpose(1, 2)  # [num_rows, tokens_to_fill, num_kv_heads, head_dim]
        earlier = step.past_len % step.block_size
        if earlier:
            tokens = torch.cat([partial[device_step.fill_slots, :earlier], tokens], dim=1)
        blocks = tokens.reshape(num_rows * step.num_filled_columns, step.block_size, heads, head_dim)
        quantized, block_scales = quantize_blocks(blocks, self.kv_cache_dtype)
        # As bytes: index_copy_ has no float8 kernel on CPU.
        pool.view(torch.uint8).index_copy_(0, device_step.fill_blocks, quantized.view(torch.uint8))
        scales.index_copy_(0, device_step.fill_blocks, block_scales)

    def reopen(self, blocks: torch.Tensor, slots: torch.Tensor) -> None:
        """Full blocks that a crop made partial again: their tokens, dequantized, go back to their slots (int64 [n])."""
        for pool, scales, partial in ((self.keys, self.key_scales, self.partial_keys),
                                      (self.values, self.value_scales, self.partial_values)):
            partial[slots] = dequantize_blocks(pool[blocks], scales[blocks], self.dtype)

    def dequantized(self, step: PagedStep, device_step: DeviceStep) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks `step.dense` names, in the model's dtype: K and V [num_dense_blocks, block_size, num_kv_heads,
        head_dim], each distinct full block dequantized once, then the rows' partial blocks."""
        blocks, slots = device_step.dense_blocks, device_step.dense_slots

        def dense(pool, scales, partial):
            full = dequantize_blocks(pool.index_select(0, blocks), scales.index_select(0, blocks), self.dtype)
            return torch.cat([full, partial.index_select(0, slots)]) if len(slots) else full

        return (dense(self.keys, self.key_scales, self.partial_keys),
                dense(self.values, self.value_scales, self.partial_values))

    def held_bytes(self, num_full: int, num_partial: int) -> int:
        return num_full * self.full_block_bytes + num_partial * self.partial_block_bytes
