"""Scatter this step's keys and values into their cache slots."""

import torch

from ._triton import check_launchable, next_power_of_2, on_tensors_device, tl, triton


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], any strides
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], any strides
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], head_dim stride 1
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], same strides as key_cache
    slot_mapping_ptr,  # [num_tokens] int64, block_id * block_size + offset, -1 = skip
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_v_tok,
    stride_v_head,
    stride_v_dim,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    # Padding tokens (slot -1) store nothing; masking keeps the program branch-free. The
    # comparison is done on a block: the interpreter mis-types (block & scalar-bool) masks.
    mask = (offs_d < HEAD_DIM) & ((tl.zeros([HEAD_DIM_PAD], tl.int64) + slot) >= 0)
    block = slot // BLOCK_SIZE
    cache_offsets = block * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot + head * stride_c_head + offs_d
    k = tl.load(key_ptr + token * stride_k_tok + head * stride_k_head + offs_d * stride_k_dim, mask=mask)
    v = tl.load(value_ptr + token * stride_v_tok + head * stride_v_head + offs_d * stride_v_dim, mask=mask)
    tl.store(key_cache_ptr + cache_offsets, k, mask=mask)
    tl.store(value_cache_ptr + cache_offsets, v, mask=mask)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block_id * block_size + offset; -1 = skip
) -> None:
    """``key_cache.view(-1, num_kv_heads, head_dim)[slot] = key[token]`` for every slot >= 0 (same for V).

    Slots must be distinct (two tokens writing one slot race) and in range (not checked: it
    would need a device sync).
    """
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key/value must be [num_tokens, num_kv_heads, head_dim], got {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError(
            "key_cache/value_cache must share a [num_blocks, block_size, num_kv_heads, head_dim] shape and strides"
        )
    num_tokens, num_kv_heads, head_dim = key.shape
    _, block_size, cache_heads, cache_head_dim = key_cache.shape
    if (cache_heads, cache_head_dim) != (num_kv_heads, head_dim):
        raise ValueError(
            f"key heads/head_dim {(num_kv_heads, head_dim)} do not match the cache's {(cache_heads, cache_head_dim)}"
        )
    if key.dtype != key_cache.dtype or value.dtype != key_cache.dtype or value_cache.dtype != key_cache.dtype:
        raise TypeError(
            f"dtypes differ: key {key.dtype}, value {value.dtype}, caches {key_cache.dtype}/{value_cache.dtype}"
        )
    if key_cache.stride(-1) != 1:
        raise ValueError("the cache's head_dim must be contiguous")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (num_tokens,):
        raise ValueError(
            f"slot_mapping must be int64 [{num_tokens}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    check_launchable(_write_kv_kernel, key, value, key_cache, value_cache, slot_mapping)
    launch_write_kv(key, value, key_cache, value_cache, slot_mapping)


@on_tensors_device
def launch_write_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    """``write_kv`` without its argument checks, for callers that validated the shapes once per step."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = key_cache.shape[1]
    if num_tokens == 0 or num_kv_heads == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        num_warps=1 if head_dim <= 128 else 2,
    )
