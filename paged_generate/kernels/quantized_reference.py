"""Compressed caches as the references read them: dequantize every full block, then read as usual.

A compressed cache holds full blocks as int8 / fp8 with one fp32 scale per (block, kv head), and each row's partially
filled last block in a side pool in the query's dtype, at ``partial_slots[row]``. Dequantizing is ``q * scale``
computed in fp32 and rounded to the query's dtype, as the cache's PyTorch path does (``paged_generate.quantize``;
kernels import nothing of the package, so it is restated here). The kernels compute the same products in another
order (the scales multiply the scores and the probabilities, see ``tiles.py``): they differ by rounding only.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_pool", "dequantized_caches"]


def dequantize_pool(cache: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache [num_blocks, block_size, num_kv_heads, head_dim] int8 / fp8, scales fp32 [num_blocks, num_kv_heads] ->
    the blocks in ``dtype``."""
    return (cache.float() * scales[:, None, :, None]).to(dtype)


def dequantized_caches(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] int8 / fp8
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_rows, max_blocks] int, -1 padded
    seq_lens: torch.Tensor,  # [num_rows] int32
    *,
    key_scales: torch.Tensor,  # [num_blocks, num_kv_heads] fp32
    value_scales: torch.Tensor,
    partial_key_cache: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_dim], query dtype
    partial_value_cache: torch.Tensor,
    partial_slots: torch.Tensor,  # [num_rows] int32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache, block_tables) of an ordinary cache holding the same K/V: the dequantized blocks, then
    the partial pool's slots as blocks ``num_blocks + slot``, which each row's table names at its last block
    boundary (when ``seq_lens[r]`` is not a multiple of block_size)."""
    dtype, (num_blocks, block_size) = partial_key_cache.dtype, key_cache.shape[:2]
    keys = torch.cat([dequantize_pool(key_cache, key_scales, dtype), partial_key_cache])
    values = torch.cat([dequantize_pool(value_cache, value_scales, dtype), partial_value_cache])
    tables = block_tables.clone()
    for row, seq_len in enumerate(seq_lens.tolist()):
        if seq_len % block_size:
            tables[row, seq_len // block_size] = num_blocks + int(partial_slots[row])
    return keys, values, tables
