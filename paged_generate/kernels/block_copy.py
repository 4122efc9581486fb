"""Copy whole cache blocks (copy-on-write when rows that share a block diverge)."""

import torch

from ._triton import check_launchable, on_tensors_device, tl, triton

# Elements per program: big enough to amortise the launch index math, small enough to
# spread one block (block_size * heads * head_dim, often 16K-64K elements) over many SMs.
CHUNK = 1024


@triton.jit
def _copy_blocks_kernel(
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    src_ptr,  # [n] int64 source block ids
    dst_ptr,  # [n] int64 destination block ids
    block_numel,  # block_size * num_kv_heads * head_dim
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    src = tl.load(src_ptr + pair).to(tl.int64) * block_numel
    dst = tl.load(dst_ptr + pair).to(tl.int64) * block_numel
    # K and V in the same program: one launch per step however many blocks are copied.
    tl.store(key_cache_ptr + dst + offs, tl.load(key_cache_ptr + src + offs, mask=mask), mask=mask)
    tl.store(value_cache_ptr + dst + offs, tl.load(value_cache_ptr + src + offs, mask=mask), mask=mask)


def copy_blocks(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    src: torch.Tensor,  # [n] int64 source block ids
    dst: torch.Tensor,  # [n] int64 destination block ids
) -> None:
    """``cache[dst[i]] = cache[src[i]]`` for K and V. No dst may also be a src or repeat
    (programs run in any order); ids are not range-checked (that would need a device sync)."""
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache/value_cache must share a [num_blocks, block_size, num_kv_heads, head_dim] shape")
    if not key_cache.is_contiguous() or not value_cache.is_contiguous():
        raise ValueError("key_cache and value_cache must be contiguous")
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"key_cache is {key_cache.dtype} but value_cache is {value_cache.dtype}")
    if src.dtype != torch.int64 or dst.dtype != torch.int64 or src.dim() != 1 or dst.shape != src.shape:
        raise ValueError(
            f"src/dst must be int64 [n], got {src.dtype} {tuple(src.shape)}, {dst.dtype} {tuple(dst.shape)}"
        )
    check_launchable(_copy_blocks_kernel, key_cache, value_cache, src, dst)
    launch_copy_blocks(key_cache, value_cache, src, dst)


@on_tensors_device
def launch_copy_blocks(key_cache, value_cache, src, dst) -> None:
    """``copy_blocks`` without its argument checks, for callers that validated the shapes once per step."""
    block_numel = key_cache[0].numel() if key_cache.shape[0] else 0
    if src.numel() == 0 or block_numel == 0:
        return
    grid = (src.numel(), triton.cdiv(block_numel, CHUNK))
    _copy_blocks_kernel[grid](
        key_cache, value_cache, src.contiguous(), dst.contiguous(), block_numel, CHUNK=CHUNK, num_warps=4
    )
