"""Paged attention over the block-table KV cache: decode and prefill in one kernel.

One program owns one (row, tile of query tokens, kv head, kv split). Its tile stacks the
query tokens x the q heads that share the kv head (GQA), so every K/V tile is loaded once
for the whole group and the M dimension of ``tl.dot`` reaches 16 even for decode. Keys are
walked in tiles of ``TILE_N`` logical positions, translated through the block table inside
the kernel, with an online (flash) softmax. With more than one split, each program writes a
partial (max, sum, acc) and ``split_reduce`` merges them (flash-decoding).

With QUANTIZED, full blocks hold int8 / fp8 K/V and their scales, and each row's partial last block sits in a side
pool in the query's dtype (``partial_slots``): the keys before the row's last block boundary are read compressed and
dequantized in registers, the rest from the side pool, in one online softmax.
"""

import torch

from ._triton import (check_launchable, kernel_is_interpreted, multiprocessor_count, next_power_of_2, on_tensors_device,
                      tl, triton)
from .bf16 import round_to_bf16
from .limits import MAX_BLOCK_SIZE, MAX_HEAD_DIM, MIN_BLOCK_SIZE, QUANTIZED_DTYPES, SUPPORTED_DTYPES
from .split_reduce import launch_split_reduce, warm_up_split_reduce
from .tiles import attend_tiles, split_tiles

MAX_SPLITS = 64  # cap of the automatic choice
MAX_FORCED_SPLITS = 1024  # the reduce kernel loads a head's split maxima as one tile
# Below this many keys per split the partial write + reduce costs more than the parallelism buys.
MIN_KEYS_PER_SPLIT = 256


# Integer arguments that differ between steps of one generate() call (the tables widen as rows grow) or between
# prompts: Triton would otherwise compile a new variant each time one of them turns 1 or a multiple of 16.
GROWING_ARGS = ("stride_bt_row", "query_len", "num_q_blocks")


@triton.jit(do_not_specialize=GROWING_ARGS)
def _paged_attention_kernel(
    out_ptr,  # [num_rows, query_len, num_q_heads, head_dim] contiguous (written with one split)
    part_max_ptr,  # [num_rows, query_len, num_q_heads, num_splits] fp32 (written with several splits)
    part_sum_ptr,  # [num_rows, query_len, num_q_heads, num_splits] fp32 (written with several splits)
    part_acc_ptr,  # [num_rows, query_len, num_q_heads, num_splits, head_dim] fp32 (written with several splits)
    query_ptr,  # [num_rows, num_q_heads, query_len, head_dim], any strides
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], head_dim stride 1
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], same strides as key_cache
    block_tables_ptr,  # [num_rows, max_blocks_per_row] int32, column stride 1, -1 padded
    seq_lens_ptr,  # [num_rows] int32, tokens per row including this step's queries
    kv_start_ptr,  # [num_rows] int32, first non-padding key position (HAS_KV_START only)
    stride_q_row,
    stride_q_head,
    stride_q_tok,
    stride_q_dim,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_row,
    query_len,
    num_q_heads,
    num_q_blocks,
    scale,
    softcap,
    sliding_window,
    key_scales_ptr,  # [num_blocks, num_kv_heads] fp32 (QUANTIZED only)
    value_scales_ptr,
    partial_key_ptr,  # [num_slots, block_size, num_kv_heads, head_dim], query dtype, key_cache's strides (QUANTIZED)
    partial_value_ptr,
    partial_slots_ptr,  # [num_rows] int32, the slot of the row's partial last block (QUANTIZED only)
    stride_s_block,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # power of two >= HEAD_DIM; tl.arange needs it
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    GROUP: tl.constexpr,  # q heads per kv head
    GROUP_PAD: tl.constexpr,  # power of two >= GROUP
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD, >= 16 for tl.dot
    TILE_N: tl.constexpr,  # keys per inner iteration, >= 16 for tl.dot
    HAS_KV_START: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,  # interpreting bf16: see bf16.py
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else None (backend default)
    QUANTIZED: tl.constexpr,  # compressed full blocks + partial blocks in a side pool
):
    pid_rq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    row = pid_rq // num_q_blocks
    q_block = pid_rq % num_q_blocks
    row64 = row.to(tl.int64)

    seq_len = tl.load(seq_lens_ptr + row)
    if HAS_KV_START:
        kv_lo = tl.maximum(tl.load(kv_start_ptr + row), 0)
    else:
        kv_lo = 0

    # Tile row m holds query token m // GROUP_PAD and q head kv_head * GROUP + m % GROUP_PAD.
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    q_head = kv_head * GROUP + head_in_group
    m_valid = (q_idx < query_len) & (head_in_group < GROUP)
    q_pos = seq_len - query_len + q_idx
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM

    q_ptrs = (
        query_ptr
        + row64 * stride_q_row
        + q_head[:, None].to(tl.int64) * stride_q_head
        + q_idx[:, None].to(tl.int64) * stride_q_tok
        + offs_d[None, :] * stride_q_dim
    )
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)

    # Keys any query of this tile can see: [k_begin, k_end). Tiles outside are never visited; slots before kv_start
    # may never have been written (NaN garbage, even -1 blocks), so they are masked at the load.
    first_q_pos = seq_len - query_len + q_block * BLOCK_Q
    last_q_pos = tl.minimum(first_q_pos + BLOCK_Q - 1, seq_len - 1)
    k_end = tl.maximum(last_q_pos + 1, 0)
    k_begin = kv_lo
    if SLIDING_WINDOW:
        k_begin = tl.maximum(k_begin, first_q_pos - sliding_window + 1)
    my_begin, my_end = split_tiles(k_begin, k_end, split, num_splits, TILE_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    q_lo = tl.full([BLOCK_M], kv_lo, tl.int32)
    head_offset = kv_head.to(tl.int64) * stride_c_head
    table = block_tables_ptr + row64 * stride_bt_row
    if QUANTIZED:
        # Keys before the row's last block boundary are in full, compressed blocks; the rest in its partial block.
        full_len = seq_len // BLOCK_SIZE * BLOCK_SIZE
        m_i, l_i, acc = attend_tiles(
            q, m_i, l_i, acc, q_pos, q_lo, m_valid, key_cache_ptr, value_cache_ptr, table, 0,
            k_begin, tl.minimum(k_end, full_len), my_begin, tl.minimum(my_end, tl.cdiv(full_len, TILE_N)),
            head_offset, stride_c_block, stride_c_slot, scale, softcap, sliding_window,
            key_scales_ptr, value_scales_ptr, stride_s_block, kv_head,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, EMULATE_BF16, DOT_PRECISION, True,
        )  # fmt: skip
        m_i, l_i, acc = attend_tiles(
            q, m_i, l_i, acc, q_pos, q_lo, m_valid, partial_key_ptr, partial_value_ptr, partial_slots_ptr + row,
            full_len, tl.maximum(k_begin, full_len), k_end, tl.maximum(my_begin, full_len // TILE_N), my_end,
            head_offset, stride_c_block, stride_c_slot, scale, softcap, sliding_window,
            key_scales_ptr, value_scales_ptr, stride_s_block, kv_head,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, EMULATE_BF16, DOT_PRECISION, False,
        )  # fmt: skip
    else:
        m_i, l_i, acc = attend_tiles(
            q, m_i, l_i, acc, q_pos, q_lo, m_valid, key_cache_ptr, value_cache_ptr, table, 0,
            k_begin, k_end, my_begin, my_end, head_offset, stride_c_block, stride_c_slot,
            scale, softcap, sliding_window, key_scales_ptr, value_scales_ptr, stride_s_block, kv_head,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, EMULATE_BF16, DOT_PRECISION, False,
        )  # fmt: skip

    # Flat (row, query token, q head) index: the layout of out and of the partials.
    out_index = (row64 * query_len + q_idx) * num_q_heads + q_head
    # A runtime branch, not a constexpr: the split count changes as rows grow, and one compiled variant serves both.
    if num_splits > 1:
        part = out_index * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=m_valid)
        tl.store(part_sum_ptr + part, l_i, mask=m_valid)
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=m_valid[:, None] & d_valid[None, :],
        )
    else:
        # No visible key leaves l = 0 and acc = 0: output zeros.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if EMULATE_BF16:
            out = round_to_bf16(out)
        tl.store(
            out_ptr + out_index[:, None] * HEAD_DIM + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_valid[:, None] & d_valid[None, :],
        )


def kernel_meta(
    *,
    query_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    has_kv_start: bool,
    sliding_window: bool,
    softcap: bool,
    emulate_bf16: bool = False,
    quantized: bool = False,
) -> dict:
    """The kernel's constexprs and launch options for one shape (also used to AOT-compile it in tests); `dtype` is the
    query's (a compressed cache's pools hold int8 / fp8)."""
    group = num_q_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    # Prefill takes ~64 tile rows; decode only what the group needs, but at least 16 since tl.dot has a minimum M.
    # fp32 dots run in exact fp32 (FMA, no tensor cores), whose operands take 2x the registers: small tiles there.
    target_m = 64 if query_len > 1 and dtype != torch.float32 else 16
    block_q = max(1, min(next_power_of_2(query_len), target_m // group_pad))
    block_m = max(16, block_q * group_pad)
    head_dim_pad = max(16, next_power_of_2(head_dim))
    return dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_m // group_pad,
        BLOCK_M=block_m,
        # Key tiles span several blocks when blocks are small (block ids looked up per key): the online softmax then
        # rescales once per TILE_N keys, not once per block. Register pressure grows with head_dim.
        TILE_N=tile_n(head_dim_pad, dtype, quantized),
        HAS_KV_START=has_kv_start,
        SLIDING_WINDOW=sliding_window,
        USE_SOFTCAP=softcap,
        EMULATE_BF16=emulate_bf16,
        # fp32 caches exist for accuracy (tests, debugging): keep that dot in true fp32, not
        # tf32. None: the backend's default for 16-bit inputs (where the option does not apply).
        DOT_PRECISION="ieee" if dtype == torch.float32 or emulate_bf16 else None,
        QUANTIZED=quantized,
        # What keeps sm_90 below 255 registers without spills (see tests/kernels/test_kernel_gpu_compile.py).
        num_warps=8 if block_m * head_dim_pad * dtype.itemsize >= 64 * 256 * 2 else 4,
    )


def tile_n(head_dim_pad: int, dtype: torch.dtype, quantized: bool = False) -> int:
    """Keys per inner iteration of the attention kernels. Compressed tiles hold their scales too, and are one step
    narrower: 64-key tiles of 64-query blocks spill on sm_90 (tests/kernels/test_kernel_gpu_compile.py)."""
    if dtype == torch.float32:
        return 16
    widest = 32 if head_dim_pad >= 256 else 64
    return widest // 2 if quantized else widest


def choose_num_splits(num_programs: int, max_kv_len: int, device: torch.device) -> int:
    """KV splits per (row, q tile, kv head) so that few long rows still fill the GPU.

    Only shapes are used (``max_kv_len`` is the block-table width in tokens, not the
    seq_lens maximum) so the choice needs no device sync and is stable under CUDA graphs.
    """
    sm_count = multiprocessor_count(device)
    if num_programs >= sm_count:
        return 1
    wanted = triton.cdiv(2 * sm_count, num_programs)  # about two waves
    worthwhile = max(1, max_kv_len // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, worthwhile, MAX_SPLITS))


def _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, kv_start, scale, sliding_window, softcap):
    if query.dim() != 4:
        raise ValueError(f"query must be [num_rows, num_q_heads, query_len, head_dim], got {tuple(query.shape)}")
    if key_cache.dim() != 4:
        raise ValueError(
            f"key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("value_cache must have key_cache's shape and strides")
    if key_cache.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cache dtype must be one of {SUPPORTED_DTYPES}, got {key_cache.dtype}")
    if query.dtype != key_cache.dtype or value_cache.dtype != key_cache.dtype:
        raise TypeError(
            f"query/key_cache/value_cache dtypes differ: {query.dtype}, {key_cache.dtype}, {value_cache.dtype}"
        )
    num_rows, num_q_heads, _, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim of query ({head_dim}) and cache ({cache_head_dim}) differ")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}")
    if key_cache.stride(-1) != 1:
        raise ValueError("the cache's head_dim must be contiguous")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_rows:
        raise ValueError(
            f"block_tables must be int32 [{num_rows}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (num_rows,):
        raise ValueError(f"seq_lens must be int32 [{num_rows}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if kv_start is not None and (kv_start.dtype != torch.int32 or kv_start.shape != (num_rows,)):
        raise ValueError(f"kv_start must be int32 [{num_rows}], got {kv_start.dtype} {tuple(kv_start.shape)}")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale)}")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")


def paged_attention(
    query: torch.Tensor,  # [num_rows, num_q_heads, query_len, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_rows, max_blocks_per_row] int32, -1 padded
    seq_lens: torch.Tensor,  # [num_rows] int32, includes this step's query tokens
    *,
    scale: float,
    kv_start: torch.Tensor | None = None,  # [num_rows] int32, first non-padding key position
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    key_scales: torch.Tensor | None = None,  # [num_blocks, num_kv_heads] fp32: the caches are compressed
    value_scales: torch.Tensor | None = None,
    partial_key_cache: torch.Tensor | None = None,  # [num_slots, block_size, num_kv_heads, head_dim], query dtype
    partial_value_cache: torch.Tensor | None = None,
    partial_slots: torch.Tensor | None = None,  # [num_rows] int32, slot of the row's partial last block
) -> torch.Tensor:  # [num_rows, query_len, num_q_heads, head_dim], query dtype
    """Causal attention of ``query`` against each row's paged K/V (see ``paged_attention_reference``).

    Query token i of row r sits at position ``seq_lens[r] - query_len + i`` and sees keys
    ``kv_start[r] <= k <= position`` (and ``k > position - sliding_window``); a query that
    sees no key outputs zeros. ``num_splits`` forces the number of KV splits (1 = no
    flash-decoding); by default it is chosen from the grid size and an SM count.

    Compressed caches (``key_scales`` given, see ``quantized_reference``): the caches hold int8 / fp8 full blocks,
    each with a scale per kv head; a row's tokens past its last block boundary (``seq_lens[r] // block_size`` full
    blocks) are read from ``partial_*_cache[partial_slots[r]]`` instead.
    """
    quantized = dict(key_scales=key_scales, value_scales=value_scales, partial_key_cache=partial_key_cache,
                     partial_value_cache=partial_value_cache, partial_slots=partial_slots)
    dense_key, dense_value = check_quantized(key_cache, value_cache, num_rows=query.shape[0], **quantized)
    _check_inputs(query, dense_key, dense_value, block_tables, seq_lens, kv_start, scale, sliding_window, softcap)
    tensors = [query, key_cache, value_cache, block_tables, seq_lens] + ([kv_start] if kv_start is not None else [])
    tensors += [t for t in quantized.values() if t is not None]
    check_launchable(_paged_attention_kernel, *tensors)
    return launch_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, scale=scale,
                                  kv_start=kv_start, sliding_window=sliding_window, softcap=softcap,
                                  num_splits=num_splits, **quantized)


def check_quantized(key_cache, value_cache, *, num_rows, key_scales, value_scales, partial_key_cache,
                    partial_value_cache, partial_slots) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the compressed-cache arguments (all None, or all given and consistent); returns the pools whose dtype
    and strides the other checks see: the partial pools (the query's dtype) when compressed, else the caches."""
    given = [t is not None for t in (key_scales, value_scales, partial_key_cache, partial_value_cache, partial_slots)]
    if not any(given):
        return key_cache, value_cache
    if not all(given):
        raise ValueError("compressed caches need key_scales, value_scales, partial_key_cache, partial_value_cache and "
                         "partial_slots together")
    if key_cache.dtype not in QUANTIZED_DTYPES or value_cache.dtype != key_cache.dtype:
        raise TypeError(f"compressed caches must be one of {QUANTIZED_DTYPES}, got {key_cache.dtype}, "
                        f"{value_cache.dtype}")
    num_blocks, _, num_kv_heads, _ = key_cache.shape
    for name, scales in (("key_scales", key_scales), ("value_scales", value_scales)):
        if scales.dtype != torch.float32 or scales.shape != (num_blocks, num_kv_heads) or scales.stride(1) != 1:
            raise ValueError(f"{name} must be float32 [{num_blocks}, {num_kv_heads}] with contiguous heads, got "
                             f"{scales.dtype} {tuple(scales.shape)}")
    if value_scales.stride() != key_scales.stride():
        raise ValueError("value_scales must have key_scales' strides")
    for name, pool in (("partial_key_cache", partial_key_cache), ("partial_value_cache", partial_value_cache)):
        if pool.shape[1:] != key_cache.shape[1:] or pool.stride() != key_cache.stride():
            raise ValueError(f"{name} must be [num_slots, *key_cache.shape[1:]] with key_cache's strides, got "
                             f"{tuple(pool.shape)} strides {pool.stride()}")
    if partial_slots.dtype != torch.int32 or partial_slots.shape != (num_rows,):
        raise ValueError(f"partial_slots must be int32 [{num_rows}], got {partial_slots.dtype} "
                         f"{tuple(partial_slots.shape)}")
    return partial_key_cache, partial_value_cache


@on_tensors_device
def launch_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, *, scale, kv_start=None,
                           sliding_window=None, softcap=None, num_splits=None, key_scales=None, value_scales=None,
                           partial_key_cache=None, partial_value_cache=None, partial_slots=None) -> torch.Tensor:
    """``paged_attention`` without its argument checks, for callers that validated the shapes once per step."""
    num_rows, num_q_heads, query_len, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    out = torch.empty(num_rows, query_len, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    kv_start = kv_start.contiguous() if kv_start is not None else None

    meta = kernel_meta(
        query_len=query_len,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=query.dtype,
        has_kv_start=kv_start is not None,
        sliding_window=sliding_window is not None,
        softcap=softcap is not None,
        emulate_bf16=query.dtype == torch.bfloat16 and kernel_is_interpreted(_paged_attention_kernel),
        quantized=key_scales is not None,
    )
    num_q_blocks = triton.cdiv(query_len, meta["BLOCK_Q"])
    if num_splits is None:
        num_splits = 1
        if num_q_blocks == 1:  # decode-like; prefill has enough programs already
            num_splits = choose_num_splits(num_rows * num_kv_heads, block_tables.shape[1] * block_size, query.device)
    if not 1 <= num_splits <= MAX_FORCED_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_FORCED_SPLITS}], got {num_splits}")
    split = num_splits > 1
    # Without splits the partials are never touched; fp32 all the same, so both cases launch one compiled variant.
    parts = num_splits if split else 0
    part_max = torch.empty(num_rows, query_len, num_q_heads, parts, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(*part_max.shape, head_dim, dtype=torch.float32, device=query.device)

    grid = (num_rows * num_q_blocks, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        out,
        part_max,
        part_sum,
        part_acc,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        kv_start if kv_start is not None else seq_lens,  # never read without HAS_KV_START
        query.stride(0),
        query.stride(1),
        query.stride(2),
        query.stride(3),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        query_len,
        num_q_heads,
        num_q_blocks,
        float(scale),
        float(softcap) if softcap is not None else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        **quantized_args(key_cache, value_cache, seq_lens, key_scales, value_scales, partial_key_cache,
                         partial_value_cache, partial_slots),
        **meta,
    )
    if split:
        launch_split_reduce(out, part_max, part_sum, part_acc)
    elif num_q_blocks == 1:
        warm_up_split_reduce(out, head_dim)  # rows growing past the split threshold then compile nothing mid-call
    return out


def quantized_args(key_cache, value_cache, seq_lens, key_scales, value_scales, partial_key_cache, partial_value_cache,
                   partial_slots) -> dict:
    """The kernels' compressed-cache arguments; placeholders (never read without QUANTIZED) when not compressed."""
    if key_scales is None:
        return dict(key_scales_ptr=seq_lens, value_scales_ptr=seq_lens, partial_key_ptr=key_cache,
                    partial_value_ptr=value_cache, partial_slots_ptr=seq_lens, stride_s_block=0)
    return dict(key_scales_ptr=key_scales, value_scales_ptr=value_scales, partial_key_ptr=partial_key_cache,
                partial_value_ptr=partial_value_cache, partial_slots_ptr=partial_slots,
                stride_s_block=key_scales.stride(0))
