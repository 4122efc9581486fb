"""KV writes and block copies on a layer's pools, by the Triton kernels or by PyTorch.

The pools were validated when the layer created them, so the kernels launch without their per-call checks."""

from __future__ import annotations

import torch

from . import kernels

__all__ = ["copy_blocks", "grown", "tokens_major", "write_kv"]


def write_kv(key, value, key_cache, value_cache, slot_mapping, *, use_triton: bool = False, fused=None) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim].

    fused: the pool [num_blocks, block_size, 2, num_kv_heads, head_dim] whose halves the caches are, if they are:
    PyTorch then writes K and V in one indexed copy."""
    if use_triton:
        return kernels.launch_write_kv(key, value, key_cache, value_cache, slot_mapping)
    if fused is not None:
        fused.flatten(0, 1).index_copy_(0, slot_mapping, torch.stack((key, value), 1))
        return
    key_cache.flatten(0, 1).index_copy_(0, slot_mapping, key)  # [num_blocks * block_size, num_kv_heads, head_dim]
    value_cache.flatten(0, 1).index_copy_(0, slot_mapping, value)


def copy_blocks(key_cache, value_cache, src: torch.Tensor, dst: torch.Tensor, *, use_triton: bool = False,
                fused=None) -> None:
    """Copy whole blocks src[i] -> dst[i] of both pools (one launch with the kernels, one indexed copy per pool else,
    or for the fused pool holding both: see `write_kv`)."""
    if use_triton:
        return kernels.launch_copy_blocks(key_cache, value_cache, src, dst)
    if fused is not None:
        fused.index_copy_(0, dst, fused.index_select(0, src))
        return
    key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
    value_cache.index_copy_(0, dst, value_cache.index_select(0, src))


def tokens_major(states: torch.Tensor) -> torch.Tensor:
    """[num_rows, num_kv_heads, query_len, head_dim] -> [num_rows * query_len, num_kv_heads, head_dim], row-major."""
    if states.shape[2] == 1:  # decode: a view, no copy
        return states[:, :, 0]
    return states.transpose(1, 2).reshape(-1, states.shape[1], states.shape[3])


def grown(pool: torch.Tensor, capacity: int) -> torch.Tensor:
    """`pool` [num_blocks, ...] with zero blocks appended up to `capacity`.

    Zeros, not empty: attention reads whole blocks and masks the slots past a row's length with weight 0, and
    0 * NaN garbage would still be NaN.
    """
    grown_pool = torch.zeros((capacity, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    grown_pool[: pool.shape[0]] = pool
    return grown_pool
