"""PyTorch reference of ``shared_prefix_paged_attention``: the unsplit computation.

Each row's full block table is its group's prefix blocks followed by its own blocks, and
``paged_attention_reference`` over those tables is the ground truth the split (cascade)
kernel must reproduce.
"""

from __future__ import annotations

import torch

from .reference import paged_attention_reference


def full_block_tables(
    row_group: torch.Tensor,  # int64 [num_rows]
    prefix_tables: torch.Tensor,  # [num_groups, max_prefix_blocks]
    prefix_len: torch.Tensor,  # [num_groups], multiples of block_size
    suffix_tables: torch.Tensor,  # [num_rows, max_suffix_blocks]
    seq_lens: torch.Tensor,  # int32 [num_rows]
    block_size: int,
) -> torch.Tensor:  # int32 [num_rows, max_blocks], -1 padded
    """Every row's blocks in position order: ``prefix_tables[g, :prefix_len[g] / block_size]``, then the
    ``ceil((seq_lens[r] - prefix_len[g]) / block_size)`` blocks of ``suffix_tables[r]``."""
    groups = row_group.cpu().tolist()
    prefix_blocks = [int(n) // block_size for n in prefix_len.cpu().tolist()]
    rows = []
    for r, (g, seq_len) in enumerate(zip(groups, seq_lens.cpu().tolist())):
        own_tokens = seq_len - prefix_blocks[g] * block_size
        if own_tokens < 0:
            raise ValueError(f"row {r} has {seq_len} tokens, fewer than its group's {prefix_blocks[g] * block_size}")
        own_blocks = (own_tokens + block_size - 1) // block_size
        rows.append(torch.cat([prefix_tables[g, : prefix_blocks[g]].cpu(), suffix_tables[r, :own_blocks].cpu()]))
    width = max((len(t) for t in rows), default=0)
    tables = torch.full((len(rows), width), -1, dtype=torch.int32)
    for r, t in enumerate(rows):
        tables[r, : len(t)] = t.to(torch.int32)
    return tables.to(seq_lens.device)


def shared_prefix_paged_attention_reference(
    query: torch.Tensor,  # [num_rows, num_q_heads, 1, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    *,
    row_group: torch.Tensor,
    prefix_tables: torch.Tensor,
    prefix_len: torch.Tensor,
    suffix_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_start: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    members=None,  # the kernel's launch options, accepted for signature parity
    num_splits: int | None = None,
    suffix_splits: int | None = None,
    **quantized,  # compressed caches, as `paged_attention_reference` takes them
) -> torch.Tensor:  # [num_rows, 1, num_q_heads, head_dim]
    """``paged_attention_reference`` of each row over its full table (computed in ``query.dtype``)."""
    del members, num_splits, suffix_splits
    if query.shape[2] != 1:
        raise ValueError(f"shared-prefix attention is for decode (query_len 1), got query_len {query.shape[2]}")
    tables = full_block_tables(row_group, prefix_tables, prefix_len, suffix_tables, seq_lens, key_cache.shape[1])
    return paged_attention_reference(
        query, key_cache, value_cache, tables, seq_lens, scale=scale, kv_start=kv_start,
        sliding_window=sliding_window, softcap=softcap, **quantized,
    )  # fmt: skip
