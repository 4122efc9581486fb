"""Shared-prefix (cascade) decode attention over the paged KV cache.

Rows that share their leading blocks (the beams or samples of one prompt) form a group. The
attention of all the group's queries over the shared blocks is one matrix-matrix product per
(group, kv head): each shared K/V tile is loaded once and multiplied by a query tile that stacks
members x q heads per kv head. Each row then attends to its own blocks, and the two partial
softmaxes are merged exactly (FlashInfer's cascade attention, Hydragen, bifurcated attention).

Launches (all on the caller's stream, in order):

1. ``_prefix_kernel``: one program per (query tile of a group, group x kv head, prefix split), the first two
   folded into the grid's x axis (CUDA caps y and z at 65,535; 2,048 prompts x 32 kv heads exceed that);
   writes the partial softmax state (max in log2 units, sum, unnormalised P @ V) of each query.
2. ``_suffix_kernel``: one program per (row, kv head, suffix split) over the row's own blocks.
   With one suffix split it also merges the prefix partials and writes the output (unless its query tile is too
   wide to hold a second accumulator: ``CAN_MERGE``); with more it writes partials as well and
3. ``split_reduce`` merges them all.

Partial states use ``split_reduce``'s layout ``[num_rows, 1, num_q_heads, num_slots(, head_dim)]``:
slots ``[0, prefix_splits)`` belong to the prefix kernel, the rest to the suffix kernel.

With QUANTIZED (compressed caches, see ``attention.py``), shared blocks are full, hence compressed, and dequantized in
registers; a row's own keys past its last block boundary come from its partial block in the side pool.
"""

import torch

from ._triton import check_launchable, kernel_is_interpreted, next_power_of_2, on_tensors_device, tl, triton
from .attention import (MAX_FORCED_SPLITS, _check_inputs, check_quantized, choose_num_splits, kernel_meta,
                        quantized_args, tile_n)
from .bf16 import round_to_bf16
from .grouping import GroupMembers, group_members
from .split_reduce import launch_split_reduce, warm_up_split_reduce
from .tiles import attend_tiles, split_tiles

# Queries (members x q heads per kv head) per prefix program. Bigger groups take several tiles,
# which re-read the prefix (mostly from L2: the tiles of one prefix split run side by side).
PREFIX_MAX_M = 64


def prefix_grid(m_tiles: int, num_groups: int, num_kv_heads: int, num_splits: int) -> tuple[int, int]:
    """The prefix kernel's grid: (query tile, kv head, group) folded into x, whose limit is 2**31 - 1; splits in y."""
    return m_tiles * num_kv_heads * num_groups, num_splits


# Integer arguments that change between steps of one call (widths of the tables, slot counts): see attention.py.
@triton.jit(do_not_specialize=("stride_pt_group", "num_slots", "m_tiles"))
def _prefix_kernel(
    part_max_ptr,  # [num_rows, num_q_heads, num_slots] fp32
    part_sum_ptr,  # [num_rows, num_q_heads, num_slots] fp32
    part_acc_ptr,  # [num_rows, num_q_heads, num_slots, HEAD_DIM] fp32
    query_ptr,  # [num_rows, num_q_heads, 1, head_dim], any strides
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], head_dim stride 1
    value_cache_ptr,  # same shape and strides as key_cache
    prefix_tables_ptr,  # [num_groups, max_prefix_blocks] int32/int64, column stride 1
    prefix_len_ptr,  # [num_groups] int32, shared tokens (multiple of BLOCK_SIZE)
    group_start_ptr,  # [num_groups + 1] int32: group g's rows are member_rows[group_start[g]:group_start[g + 1]]
    member_rows_ptr,  # [num_rows] int32
    seq_lens_ptr,  # [num_rows] int32
    kv_start_ptr,  # [num_rows] int32 (HAS_KV_START only)
    stride_q_row,
    stride_q_head,
    stride_q_dim,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_pt_group,
    num_kv_heads,
    num_q_heads,
    num_slots,
    m_tiles,
    scale,
    softcap,
    sliding_window,
    key_scales_ptr,  # [num_blocks, num_kv_heads] fp32 (QUANTIZED only)
    value_scales_ptr,
    stride_s_block,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,  # q heads per kv head
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # members per tile x GROUP_PAD, >= 16 for tl.dot
    TILE_N: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANTIZED: tl.constexpr,  # shared blocks are compressed (all full)
):
    MEMBERS: tl.constexpr = BLOCK_M // GROUP_PAD
    pid = tl.program_id(0)
    m_tile = pid % m_tiles
    kv_head = (pid // m_tiles) % num_kv_heads
    group = pid // (m_tiles * num_kv_heads)
    split = tl.program_id(1)
    first_member = tl.load(group_start_ptr + group)
    num_members = tl.load(group_start_ptr + group + 1) - first_member

    # Tile row m holds member m // GROUP_PAD of this tile and q head kv_head * GROUP + m % GROUP_PAD.
    offs_m = tl.arange(0, BLOCK_M)
    member = m_tile * MEMBERS + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    m_valid = (member < num_members) & (head_in_group < GROUP)
    row = tl.load(member_rows_ptr + first_member + member, mask=m_valid, other=0).to(tl.int64)
    q_head = kv_head * GROUP + head_in_group
    q_pos = tl.load(seq_lens_ptr + row, mask=m_valid, other=0) - 1
    if HAS_KV_START:
        q_lo = tl.maximum(tl.load(kv_start_ptr + row, mask=m_valid, other=0), 0)
    else:
        q_lo = tl.zeros([BLOCK_M], tl.int32)

    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_ptrs = (
        query_ptr
        + row[:, None] * stride_q_row
        + q_head[:, None].to(tl.int64) * stride_q_head
        + offs_d[None, :] * stride_q_dim
    )
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)

    # Keys some query of the tile can see: from the lowest first-visible key to the highest
    # position, within the prefix. Members may differ in kv_start and position.
    lo = q_lo
    if SLIDING_WINDOW:
        lo = tl.maximum(lo, q_pos - sliding_window + 1)
    load_lo = tl.min(tl.where(m_valid, lo, 2147483647), 0)  # int32 max: "sees nothing"
    load_hi = tl.minimum(tl.max(tl.where(m_valid, q_pos + 1, 0), 0), tl.load(prefix_len_ptr + group))
    my_begin, my_end = split_tiles(load_lo, load_hi, split, tl.num_programs(1), TILE_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    m_i, l_i, acc = attend_tiles(
        q, m_i, l_i, acc, q_pos, q_lo, m_valid,
        key_cache_ptr, value_cache_ptr, prefix_tables_ptr + group.to(tl.int64) * stride_pt_group, 0,
        load_lo, load_hi, my_begin, my_end, kv_head.to(tl.int64) * stride_c_head, stride_c_block, stride_c_slot,
        scale, softcap, sliding_window, key_scales_ptr, value_scales_ptr, stride_s_block, kv_head,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, EMULATE_BF16, DOT_PRECISION,
        QUANTIZED,
    )  # fmt: skip

    # Every live query writes its slot, even with nothing visible (m = -inf, l = 0, acc = 0).
    slot = (row * num_q_heads + q_head) * num_slots + split
    tl.store(part_max_ptr + slot, m_i, mask=m_valid)
    tl.store(part_sum_ptr + slot, l_i, mask=m_valid)
    tl.store(part_acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=m_valid[:, None] & d_valid[None, :])


@triton.jit(do_not_specialize=("stride_st_row", "num_slots", "first_slot"))
def _suffix_kernel(
    out_ptr,  # [num_rows, 1, num_q_heads, HEAD_DIM] contiguous (written with one suffix split)
    part_max_ptr,  # [num_rows, num_q_heads, num_slots] fp32
    part_sum_ptr,  # [num_rows, num_q_heads, num_slots] fp32
    part_acc_ptr,  # [num_rows, num_q_heads, num_slots, HEAD_DIM] fp32
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    suffix_tables_ptr,  # [num_rows, max_suffix_blocks] int32/int64, column stride 1
    row_group_ptr,  # [num_rows] int64
    prefix_len_ptr,  # [num_groups] int32
    seq_lens_ptr,  # [num_rows] int32
    kv_start_ptr,  # [num_rows] int32 (HAS_KV_START only)
    stride_q_row,
    stride_q_head,
    stride_q_dim,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_st_row,
    num_q_heads,
    num_slots,
    first_slot,  # this kernel's partials go to slots first_slot + split; slots before it are the prefix's
    scale,
    softcap,
    sliding_window,
    key_scales_ptr,  # [num_blocks, num_kv_heads] fp32 (QUANTIZED only)
    value_scales_ptr,
    partial_key_ptr,  # [num_slots, block_size, num_kv_heads, head_dim], key_cache's strides (QUANTIZED only)
    partial_value_ptr,
    partial_slots_ptr,  # [num_rows] int32 (QUANTIZED only)
    stride_s_block,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # max(16, GROUP_PAD)
    TILE_N: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CAN_MERGE: tl.constexpr,  # whether one suffix split merges (else split_reduce always does)
    QUANTIZED: tl.constexpr,  # compressed full blocks + the row's partial block in the side pool
):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_len = tl.load(prefix_len_ptr + tl.load(row_group_ptr + row))
    q_pos = tl.load(seq_lens_ptr + row) - 1
    if HAS_KV_START:
        kv_lo = tl.maximum(tl.load(kv_start_ptr + row), 0)
    else:
        kv_lo = 0

    offs_m = tl.arange(0, BLOCK_M)
    m_valid = offs_m < GROUP
    q_head = kv_head * GROUP + offs_m
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_ptrs = (
        query_ptr
        + row * stride_q_row
        + q_head[:, None].to(tl.int64) * stride_q_head
        + offs_d[None, :] * stride_q_dim
    )
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)

    # The row's own keys: [prefix_len, position], after left padding and within the window.
    load_lo = tl.maximum(kv_lo, prefix_len)
    if SLIDING_WINDOW:
        load_lo = tl.maximum(load_lo, q_pos - sliding_window + 1)
    load_hi = q_pos + 1
    my_begin, my_end = split_tiles(load_lo, load_hi, split, tl.num_programs(2), TILE_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    q_pos_m = tl.zeros([BLOCK_M], tl.int32) + q_pos
    q_lo_m = tl.zeros([BLOCK_M], tl.int32) + kv_lo
    head_offset = kv_head.to(tl.int64) * stride_c_head
    table = suffix_tables_ptr + row * stride_st_row
    if QUANTIZED:
        # Own keys before the row's last block boundary are in full, compressed blocks; the rest in its partial block.
        full_len = (q_pos + 1) // BLOCK_SIZE * BLOCK_SIZE
        m_i, l_i, acc = attend_tiles(
            q, m_i, l_i, acc, q_pos_m, q_lo_m, m_valid, key_cache_ptr, value_cache_ptr, table, prefix_len,
            load_lo, tl.minimum(load_hi, full_len), my_begin, tl.minimum(my_end, tl.cdiv(full_len, TILE_N)),
            head_offset, stride_c_block, stride_c_slot, scale, softcap, sliding_window,
            key_scales_ptr, value_scales_ptr, stride_s_block, kv_head,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, EMULATE_BF16, DOT_PRECISION, True,
        )  # fmt: skip
        m_i, l_i, acc = attend_tiles(
            q, m_i, l_i, acc, q_pos_m, q_lo_m, m_valid, partial_key_ptr, partial_value_ptr, partial_slots_ptr + row,
            full_len, tl.maximum(load_lo, full_len), load_hi, tl.maximum(my_begin, full_len // TILE_N), my_end,
            head_offset, stride_c_block, stride_c_slot, scale, softcap, sliding_window,
            key_scales_ptr, value_scales_ptr, stride_s_block, kv_head,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, EMULATE_BF16, DOT_PRECISION, False,
        )  # fmt: skip
    else:
        m_i, l_i, acc = attend_tiles(
            q, m_i, l_i, acc, q_pos_m, q_lo_m, m_valid, key_cache_ptr, value_cache_ptr, table, prefix_len,
            load_lo, load_hi, my_begin, my_end, head_offset, stride_c_block, stride_c_slot,
            scale, softcap, sliding_window, key_scales_ptr, value_scales_ptr, stride_s_block, kv_head,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, EMULATE_BF16, DOT_PRECISION, False,
        )  # fmt: skip

    head_index = row * num_q_heads + q_head  # flat (row, q head): the layout of out and of the partials
    # One suffix split merges the prefix partials and writes out; a runtime branch, as the split count changes as
    # rows grow and one compiled variant serves both.
    if CAN_MERGE and tl.num_programs(2) == 1:
        for s in range(0, first_slot):
            slot = head_index * num_slots + s
            m_s = tl.load(part_max_ptr + slot, mask=m_valid, other=float("-inf"))
            l_s = tl.load(part_sum_ptr + slot, mask=m_valid, other=0.0)
            acc_s = tl.load(
                part_acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            m_new = tl.maximum(m_i, m_s)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            beta = tl.exp2(m_s - m_shift)
            l_i = l_i * alpha + l_s * beta
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
            m_i = m_new
        # No visible key anywhere leaves l = 0 and acc = 0: output zeros.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if EMULATE_BF16:
            out = round_to_bf16(out)
        tl.store(
            out_ptr + head_index[:, None] * HEAD_DIM + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_valid[:, None] & d_valid[None, :],
        )
    else:
        slot = head_index * num_slots + first_slot + split
        tl.store(part_max_ptr + slot, m_i, mask=m_valid)
        tl.store(part_sum_ptr + slot, l_i, mask=m_valid)
        tl.store(
            part_acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=m_valid[:, None] & d_valid[None, :]
        )


def prefix_meta(*, max_group_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, has_kv_start: bool, sliding_window: bool, softcap: bool,
                emulate_bf16: bool = False, quantized: bool = False) -> dict:  # fmt: skip
    """The prefix kernel's constexprs and launch options (also used to AOT-compile it in tests)."""
    base = kernel_meta(
        query_len=1, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, has_kv_start=has_kv_start, sliding_window=sliding_window, softcap=softcap,
        emulate_bf16=emulate_bf16, quantized=quantized,
    )  # fmt: skip
    group_pad = base["GROUP_PAD"]
    max_m = PREFIX_MAX_M if dtype != torch.float32 else 16  # fp32: see kernel_meta
    if quantized and base["HEAD_DIM_PAD"] >= 256:
        max_m = 16  # the scales' registers: wider tiles spill at head_dim 256 on sm_90
    block_m = max(16, group_pad, min(next_power_of_2(max(max_group_size, 1) * group_pad), max_m))
    head_dim_pad = base["HEAD_DIM_PAD"]
    meta = {k: base[k] for k in ("HEAD_DIM", "HEAD_DIM_PAD", "BLOCK_SIZE", "GROUP", "GROUP_PAD", "HAS_KV_START",
                                 "SLIDING_WINDOW", "USE_SOFTCAP", "EMULATE_BF16", "DOT_PRECISION",
                                 "QUANTIZED")}  # fmt: skip
    # The prefix is read once per tile of queries, so take wide key tiles (several blocks per tile when blocks are
    # small: looked up per key). Warps: what keeps sm_90 below 255 registers without spills with Triton 3.6 to 3.9
    # (tests/kernels/test_kernel_gpu_compile.py); 16-row 16-bit tiles spill at 8 warps, where ptxas keeps 128 registers.
    wide = block_m * head_dim_pad * dtype.itemsize >= 32 * 128 * 2 and (block_m >= 32 or dtype == torch.float32)
    meta.update(BLOCK_M=block_m, TILE_N=tile_n(head_dim_pad, dtype, quantized), num_warps=8 if wide else 4)
    return meta


def suffix_meta(**kwargs) -> dict:
    """The suffix kernel's constexprs and launch options: paged_attention's decode choices."""
    meta = kernel_meta(query_len=1, **kwargs)
    del meta["BLOCK_Q"]
    # The merge holds a second accumulator: past this tile size it would spill on sm_90.
    meta["CAN_MERGE"] = meta["BLOCK_M"] * meta["HEAD_DIM_PAD"] * kwargs["dtype"].itemsize < 64 * 256 * 2
    return meta


def _check_grouping(num_rows, row_group, prefix_tables, prefix_len, suffix_tables, device):
    if row_group.dtype not in (torch.int32, torch.int64) or row_group.shape != (num_rows,):
        raise ValueError(f"row_group must be int64 [{num_rows}], got {row_group.dtype} {tuple(row_group.shape)}")
    for name, table, rows in (("prefix_tables", prefix_tables, None), ("suffix_tables", suffix_tables, num_rows)):
        if table.dtype not in (torch.int32, torch.int64) or table.dim() != 2 or rows not in (None, table.shape[0]):
            raise ValueError(f"{name} must be int32/int64 [{rows or 'num_groups'}, blocks], got "
                             f"{table.dtype} {tuple(table.shape)}")  # fmt: skip
    num_groups = prefix_tables.shape[0]
    if prefix_len.dtype not in (torch.int32, torch.int64) or prefix_len.shape != (num_groups,):
        raise ValueError(f"prefix_len must be int32 [{num_groups}], got {prefix_len.dtype} {tuple(prefix_len.shape)}")
    for name, t in (("row_group", row_group), ("prefix_tables", prefix_tables), ("prefix_len", prefix_len),
                    ("suffix_tables", suffix_tables)):  # fmt: skip
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, query on {device}")


def shared_prefix_paged_attention(
    query: torch.Tensor,  # [num_rows, num_q_heads, 1, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    *,
    row_group: torch.Tensor,  # int64 [num_rows], the group of each row
    prefix_tables: torch.Tensor,  # int32/int64 [num_groups, max_prefix_blocks], the group's shared blocks
    prefix_len: torch.Tensor,  # int32 [num_groups], shared tokens (a multiple of block_size; 0 allowed)
    suffix_tables: torch.Tensor,  # int32/int64 [num_rows, max_suffix_blocks], the row's blocks after the prefix
    seq_lens: torch.Tensor,  # int32 [num_rows], the row's tokens: prefix + own, this step's query included
    scale: float,
    kv_start: torch.Tensor | None = None,  # int32 [num_rows], first non-padding key position
    sliding_window: int | None = None,
    softcap: float | None = None,
    members: GroupMembers | None = None,  # group_members(row_group, num_groups), if already at hand
    num_splits: int | None = None,  # splits of each group's prefix (default: from the grid size)
    suffix_splits: int | None = None,  # splits of each row's own keys (default: from the grid size)
    key_scales: torch.Tensor | None = None,  # compressed caches: as `paged_attention` takes them
    value_scales: torch.Tensor | None = None,
    partial_key_cache: torch.Tensor | None = None,
    partial_value_cache: torch.Tensor | None = None,
    partial_slots: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_rows, 1, num_q_heads, head_dim], query dtype
    """Decode attention of rows grouped by shared leading blocks; the same result as ``paged_attention``
    of each row over its full table (prefix blocks, then own blocks): see ``shared_prefix_paged_attention_reference``.

    Row r of group g = row_group[r] has its query at position ``seq_lens[r] - 1`` and its keys at positions
    ``[0, prefix_len[g])`` in ``prefix_tables[g]`` and ``[prefix_len[g], seq_lens[r])`` in ``suffix_tables[r]``
    (so ``seq_lens[r] >= prefix_len[g]``). It sees keys ``kv_start[r] <= k <= seq_lens[r] - 1`` (and
    ``k > seq_lens[r] - 1 - sliding_window``); a query that sees no key outputs zeros. Groups may have any size
    and membership. Members of a group may differ in ``kv_start`` and ``seq_lens``, but then the prefix slots from
    the group's smallest ``kv_start`` on must hold finite values (the kernel reads a shared tile once for all
    members and masks per query, and 0 * NaN is NaN); when every member has the same ``kv_start``, slots below it
    are never read. Table entries past the tokens are never read (-1 padding is fine).
    """
    if query.dim() == 4 and query.shape[2] != 1:
        raise ValueError(f"shared-prefix attention is for decode (query_len 1), got query_len {query.shape[2]}")
    num_rows = query.shape[0]
    quantized = dict(key_scales=key_scales, value_scales=value_scales, partial_key_cache=partial_key_cache,
                     partial_value_cache=partial_value_cache, partial_slots=partial_slots)
    dense_key, dense_value = check_quantized(key_cache, value_cache, num_rows=num_rows, **quantized)
    # paged_attention's checks of everything but the tables (given an empty, valid one).
    empty_table = torch.empty(num_rows, 0, dtype=torch.int32, device=query.device)
    _check_inputs(query, dense_key, dense_value, empty_table, seq_lens, kv_start, scale, sliding_window, softcap)
    _check_grouping(num_rows, row_group, prefix_tables, prefix_len, suffix_tables, query.device)
    num_groups = prefix_tables.shape[0]
    optional = [kv_start] if kv_start is not None else []
    optional += [t for t in quantized.values() if t is not None]
    check_launchable(_suffix_kernel, query, key_cache, value_cache, row_group, prefix_tables, prefix_len,
                     suffix_tables, seq_lens, *optional)  # fmt: skip
    if members is None:
        members = group_members(row_group, num_groups)
    elif members.member_rows.shape != (num_rows,) or members.group_start.shape != (num_groups + 1,):
        raise ValueError("members does not match row_group / prefix_tables: build it with group_members()")
    return launch_shared_prefix_paged_attention(
        query, key_cache, value_cache, row_group=row_group, prefix_tables=prefix_tables, prefix_len=prefix_len,
        suffix_tables=suffix_tables, seq_lens=seq_lens, scale=scale, kv_start=kv_start, sliding_window=sliding_window,
        softcap=softcap, members=members, num_splits=num_splits, suffix_splits=suffix_splits, **quantized,
    )


@on_tensors_device
def launch_shared_prefix_paged_attention(query, key_cache, value_cache, *, row_group, prefix_tables, prefix_len,
                                         suffix_tables, seq_lens, scale, kv_start=None, sliding_window=None,
                                         softcap=None, members: GroupMembers, num_splits=None,
                                         suffix_splits=None, key_scales=None, value_scales=None,
                                         partial_key_cache=None, partial_value_cache=None,
                                         partial_slots=None) -> torch.Tensor:  # fmt: skip
    """``shared_prefix_paged_attention`` without its argument checks, for callers that validated the shapes once per
    step; ``members`` is required."""
    num_rows, num_q_heads, _, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_groups = prefix_tables.shape[0]
    out = torch.empty(num_rows, 1, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    prefix_tables = prefix_tables if prefix_tables.stride(1) == 1 else prefix_tables.contiguous()
    suffix_tables = suffix_tables if suffix_tables.stride(1) == 1 else suffix_tables.contiguous()
    prefix_len = prefix_len.to(torch.int32).contiguous()
    row_group = row_group.contiguous()
    seq_lens = seq_lens.contiguous()
    kv_start = kv_start.contiguous() if kv_start is not None else None

    emulate_bf16 = query.dtype == torch.bfloat16 and kernel_is_interpreted(_suffix_kernel)
    shape = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                 dtype=query.dtype, has_kv_start=kv_start is not None, sliding_window=sliding_window is not None,
                 softcap=softcap is not None, emulate_bf16=emulate_bf16,
                 quantized=key_scales is not None)  # fmt: skip
    run_prefix = num_groups > 0 and members.max_group_size > 0 and prefix_tables.shape[1] > 0
    pmeta = prefix_meta(max_group_size=members.max_group_size, **shape)
    m_tiles = triton.cdiv(members.max_group_size * pmeta["GROUP_PAD"], pmeta["BLOCK_M"])
    if not run_prefix:
        num_splits = 0
    elif num_splits is None:
        programs = m_tiles * num_groups * num_kv_heads
        num_splits = choose_num_splits(programs, prefix_tables.shape[1] * block_size, query.device)
    elif not 1 <= num_splits <= MAX_FORCED_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_FORCED_SPLITS}], got {num_splits}")
    if suffix_splits is None:
        suffix_splits = choose_num_splits(num_rows * num_kv_heads, suffix_tables.shape[1] * block_size, query.device)
    if not 1 <= suffix_splits <= MAX_FORCED_SPLITS or num_splits + suffix_splits > MAX_FORCED_SPLITS:
        raise ValueError(f"suffix_splits must be in [1, {MAX_FORCED_SPLITS} - num_splits], got {suffix_splits}")
    smeta = suffix_meta(**shape)
    merge = suffix_splits == 1 and smeta["CAN_MERGE"]
    num_slots = num_splits + (0 if merge else suffix_splits)

    # Empty when no prefix runs and the suffix kernel merges (never touched then); fp32 all the same, so every case
    # launches the same compiled variants.
    part_max = torch.empty(num_rows, 1, num_q_heads, num_slots, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(*part_max.shape, head_dim, dtype=torch.float32, device=query.device)
    features = (float(scale), float(softcap) if softcap is not None else 1.0,
                int(sliding_window) if sliding_window is not None else 0)  # fmt: skip
    query_strides = (query.stride(0), query.stride(1), query.stride(3))
    cache_strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2))
    kv_start_arg = kv_start if kv_start is not None else seq_lens  # never read without HAS_KV_START

    storage = quantized_args(key_cache, value_cache, seq_lens, key_scales, value_scales, partial_key_cache,
                             partial_value_cache, partial_slots)
    if run_prefix:
        _prefix_kernel[prefix_grid(m_tiles, num_groups, num_kv_heads, num_splits)](
            part_max, part_sum, part_acc, query, key_cache, value_cache,
            prefix_tables, prefix_len, members.group_start, members.member_rows, seq_lens, kv_start_arg,
            *query_strides, *cache_strides, prefix_tables.stride(0),
            num_kv_heads, num_q_heads, num_slots, m_tiles, *features,
            key_scales_ptr=storage["key_scales_ptr"], value_scales_ptr=storage["value_scales_ptr"],
            stride_s_block=storage["stride_s_block"], **pmeta,
        )  # fmt: skip
    _suffix_kernel[(num_rows, num_kv_heads, suffix_splits)](
        out, part_max, part_sum, part_acc, query, key_cache, value_cache,
        suffix_tables, row_group, prefix_len, seq_lens, kv_start_arg,
        *query_strides, *cache_strides, suffix_tables.stride(0),
        num_q_heads, num_slots, num_splits, *features, **storage,
        **smeta,
    )  # fmt: skip
    if not merge:
        launch_split_reduce(out, part_max, part_sum, part_acc)
    else:
        warm_up_split_reduce(out, head_dim)
    return out
