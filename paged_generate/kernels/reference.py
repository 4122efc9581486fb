"""Plain PyTorch references of the paged-cache kernels (no Triton needed).

They define the semantics the Triton kernels must match and run on any device and
dtype. Attention computes in ``query.dtype`` (the gathered K/V blocks are cast to it),
so a float64 query gives a float64 ground truth without copying the whole pool.
"""

from __future__ import annotations

import torch

from .quantized_reference import dequantized_caches


def attention_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    kv_start: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """Boolean ``[num_queries, num_keys]``: key k is visible to query p iff ``kv_start <= k <= p``
    and, with a window W, ``k > p - W`` (transformers' ``kv_idx > q_idx - sliding_window``)."""
    p = query_positions[:, None]
    k = key_positions[None, :]
    visible = (k >= kv_start) & (k <= p)
    if sliding_window is not None:
        visible &= k > p - sliding_window
    return visible


def paged_attention_reference(
    query: torch.Tensor,  # [num_rows, num_q_heads, query_len, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_rows, max_blocks_per_row] int32, -1 padded
    seq_lens: torch.Tensor,  # [num_rows] int32, includes this step's query tokens
    *,
    scale: float,
    kv_start: torch.Tensor | None = None,  # [num_rows] int32
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,  # accepted for signature parity; splitting is a kernel detail
    **quantized,  # compressed caches: key_scales, value_scales, partial_key_cache, partial_value_cache, partial_slots
) -> torch.Tensor:  # [num_rows, query_len, num_q_heads, head_dim]
    """Gathers each row's blocks and runs masked softmax attention in ``query.dtype``.

    Only slots in ``[kv_start[r], seq_lens[r])`` are read; queries with no visible key get zeros. A compressed cache
    is read as ``dequantized_caches`` turns it into an ordinary one (dequantize, then attend).
    """
    del num_splits
    if quantized.get("key_scales") is not None:
        key_cache, value_cache, block_tables = dequantized_caches(key_cache, value_cache, block_tables, seq_lens,
                                                                  **quantized)
    num_rows, num_q_heads, query_len, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    out = torch.zeros(num_rows, query_len, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    for r in range(num_rows):
        seq_len = int(seq_lens[r])
        start = max(int(kv_start[r]), 0) if kv_start is not None else 0
        if start >= seq_len:
            continue  # no visible key at all: zeros
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[r, :num_blocks].long()
        # Slots outside [start, seq_len) may hold garbage (even NaN); never read them.
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[start:seq_len]
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[start:seq_len]
        k = k.to(query.dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq_len - start, D]
        v = v.to(query.dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(query[r], k.transpose(1, 2)) * scale  # [H, query_len, seq_len - start]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
        k_pos = torch.arange(start, seq_len, device=query.device)
        visible = attention_mask(q_pos, k_pos, start, sliding_window)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Fully masked queries (e.g. left-padding tokens) output zeros, not NaN.
        probs = torch.where(visible.any(dim=-1)[:, None], probs, torch.zeros_like(probs))
        out[r] = torch.matmul(probs, v).transpose(0, 1)
    return out


def write_kv_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block_id * block_size + offset; -1 = skip
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_blocks, block_size = key_cache.shape[:2]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)


def copy_blocks_reference(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    src: torch.Tensor,  # [n] int64 source block ids
    dst: torch.Tensor,  # [n] int64 destination block ids
) -> None:
    # Advanced indexing reads all sources before writing, so this assumes no dst is also a src.
    key_cache[dst] = key_cache[src]
    value_cache[dst] = value_cache[src]
