"""Where rows' tokens sit in a pool, and how attention reads them: in place as strided views when the rows' blocks are
laid out regularly, gathered through the block tables otherwise.

Pools are [num_blocks, block_size, num_kv_heads, head_dim]; rows are handed to attention as transformers lays K/V out,
[num_rows, num_kv_heads, num_tokens, head_dim].
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["gather_kv_rows", "gather_rows", "regular_layout", "strided_rows"]


def regular_layout(tables: np.ndarray) -> tuple[int, int] | None:
    """(first, stride) if tables[r, j] == first + r * stride + j for every r, j (stride >= 0), else None.

    Rows so laid out are strided views of the pool: a lone row holding consecutive blocks, rows placed side by side,
    or groups' shared blocks all at one place (stride 0)."""
    if not tables.size:
        return None
    first = int(tables[0, 0])
    stride = int(tables[1, 0] - first) if tables.shape[0] > 1 else 0
    expected = first + stride * np.arange(tables.shape[0])[:, None] + np.arange(tables.shape[1])[None, :]
    return (first, stride) if stride >= 0 and np.array_equal(tables, expected) else None


def strided_rows(pool: torch.Tensor, layout: tuple[int, int], num_rows: int, num_blocks: int) -> torch.Tensor:
    """Rows laid out as `layout` (see `regular_layout`), `num_blocks` blocks each, as a view of the pool:
    [num_rows, num_kv_heads, num_blocks * block_size, head_dim]. No copy.

    The pool may be a strided view (the K or V half of a fused pool) whose blocks follow each other:
    stride(0) == block_size * stride(1)."""
    first, stride = layout
    _, block_size, heads, head_dim = pool.shape
    block_stride, token_stride, head_stride, _ = pool.stride()
    view = pool.as_strided(
        (num_rows, num_blocks * block_size, heads, head_dim),
        (stride * block_stride, token_stride, head_stride, 1),
        pool.storage_offset() + first * block_stride,
    )
    return view.transpose(1, 2)


def gather_rows(pool: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Rows' first `num_tokens` tokens read through their block tables (int [num_rows, blocks], entries >= 0):
    [num_rows, num_kv_heads, num_tokens, head_dim], a copy of the blocks viewed as transformers lays K/V out."""
    num_rows, blocks_per_row = block_tables.shape
    _, block_size, heads, head_dim = pool.shape
    gathered = pool.index_select(0, block_tables.reshape(-1))  # [num_rows * blocks_per_row, block_size, heads, dim]
    return gathered.as_strided((num_rows, heads, num_tokens, head_dim),
                               (blocks_per_row * block_size * heads * head_dim, head_dim, heads * head_dim, 1))


def gather_kv_rows(kv: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`gather_rows` of both halves of a fused pool kv [num_blocks, block_size, 2, num_kv_heads, head_dim] at once:
    K and V [num_rows, num_kv_heads, num_tokens, head_dim], strided views of one copy."""
    num_rows, blocks_per_row = block_tables.shape
    _, block_size, _, heads, head_dim = kv.shape
    gathered = kv.index_select(0, block_tables.reshape(-1))  # [num_rows * blocks_per_row, block_size, 2, heads, dim]
    shape = (num_rows, heads, num_tokens, head_dim)
    strides = (blocks_per_row * block_size * 2 * heads * head_dim, head_dim, 2 * heads * head_dim, 1)
    return gathered.as_strided(shape, strides), gathered.as_strided(shape, strides, heads * head_dim)
