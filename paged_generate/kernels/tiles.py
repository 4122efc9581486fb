"""The inner loop every paged attention kernel shares: online softmax over key tiles read through a block table.

With QUANTIZED, the blocks hold int8 / fp8 K/V with one fp32 scale per (block, kv head), dequantized in registers and
never written back: a tile is converted to the query's dtype exactly (int8 and e4m3 values are representable in
fp16 / bf16) and the scales, one per key, multiply the scores (K) and the probabilities (V). The same products as
scaling the tile first (`kernels.quantized_reference`), without an fp32 copy of it.

Kernel modules do not use ``from __future__ import annotations``: Triton reads constexpr parameters from their
annotations, which must be the real ``tl.constexpr`` objects.
"""

from ._triton import tl, triton
from .bf16 import round_to_bf16
from .softcap import tanh


@triton.jit
def attend_tiles(
    q,  # [BLOCK_M, HEAD_DIM_PAD] query tile
    m_i,  # [BLOCK_M] fp32 running max (log2 units)
    l_i,  # [BLOCK_M] fp32 running sum
    acc,  # [BLOCK_M, HEAD_DIM_PAD] fp32 unnormalised P @ V
    q_pos,  # [BLOCK_M] absolute position of each query
    q_lo,  # [BLOCK_M] first key position each query may see (left padding)
    m_valid,  # [BLOCK_M] live tile rows
    key_cache_ptr,
    value_cache_ptr,
    table_ptr,  # block table whose entry 0 holds position table_pos
    table_pos,  # a multiple of BLOCK_SIZE
    load_lo,  # keys outside [load_lo, load_hi) are neither read nor seen
    load_hi,
    tile_begin,  # tiles [tile_begin, tile_end) of TILE_N absolute positions
    tile_end,
    head_offset,  # int64 kv head offset into the cache
    stride_c_block,
    stride_c_slot,
    scale,
    softcap,
    sliding_window,
    key_scales_ptr,  # [num_blocks, num_kv_heads] fp32 (QUANTIZED only)
    value_scales_ptr,
    stride_s_block,
    kv_head,  # this program's kv head: the column of the scales
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANTIZED: tl.constexpr,
):
    """Online-softmax attention of the query tile over key tiles read through one block table."""
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    for tile in range(tile_begin, tile_end):
        k_pos = tile * TILE_N + offs_n
        local = k_pos - table_pos
        # Slots outside [load_lo, load_hi) may never have been written (NaN garbage, -1 blocks),
        # and 0 * NaN poisons P @ V: mask them at the load.
        kv_valid = (k_pos >= load_lo) & (k_pos < load_hi)
        if TILE_N <= BLOCK_SIZE:
            # table_pos is block aligned, so the tile lies inside one block.
            block_id = tl.load(table_ptr + (tile * TILE_N - table_pos) // BLOCK_SIZE).to(tl.int64)
            slot_offsets = block_id * stride_c_block + (local % BLOCK_SIZE).to(tl.int64) * stride_c_slot
            if QUANTIZED:  # one block: one scale each
                k_scale = tl.load(key_scales_ptr + block_id * stride_s_block + kv_head)
                v_scale = tl.load(value_scales_ptr + block_id * stride_s_block + kv_head)
        else:
            block_ids = tl.load(table_ptr + local // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
            slot_offsets = block_ids * stride_c_block + (local % BLOCK_SIZE).to(tl.int64) * stride_c_slot
            if QUANTIZED:  # [1, TILE_N]: each key's block's scale, along the scores' key axis
                scale_offsets = block_ids * stride_s_block + kv_head
                k_scale = tl.load(key_scales_ptr + scale_offsets, mask=kv_valid, other=0.0)[None, :]
                v_scale = tl.load(value_scales_ptr + scale_offsets, mask=kv_valid, other=0.0)[None, :]
        kv_offsets = slot_offsets[:, None] + head_offset + offs_d[None, :]
        kv_mask = kv_valid[:, None] & d_valid[None, :]
        k = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_PAD]
        v = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if QUANTIZED:
            k = k.to(q.dtype)  # exact
        if EMULATE_BF16:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if QUANTIZED:
            s = s * k_scale
        if USE_SOFTCAP:
            s = (softcap * LOG2E) * tanh(s * (scale / softcap))
        else:
            s = s * (scale * LOG2E)

        visible = m_valid[:, None] & kv_valid[None, :]
        visible = visible & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= q_lo[:, None])
        if SLIDING_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if QUANTIZED:  # P @ (V * scale) as (P * scale) @ V
            v = v.to(q.dtype)  # exact
            p_v = p * v_scale
        else:
            p_v = p
        # P is rounded to the cache dtype for the tensor-core dot, as flash-attention does.
        if EMULATE_BF16:
            acc += tl.dot(round_to_bf16(p_v), v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(p_v.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def split_tiles(load_lo, load_hi, split, num_splits, TILE_N: tl.constexpr):
    """This split's share [begin, end) of the tiles covering keys [load_lo, load_hi) (empty if none)."""
    tile_begin = load_lo // TILE_N
    tile_end = tl.cdiv(load_hi, TILE_N)
    per_split = tl.cdiv(tl.maximum(tile_end - tile_begin, 0), num_splits)
    begin = tile_begin + split * per_split
    return begin, tl.minimum(begin + per_split, tile_end)
