"""paged_attention (Triton) against paged_attention_reference.

Accuracy rule (flash-attention's): with float64 reference output as the truth, the kernel's
max error must be at most twice the error of the PyTorch reference run in the same low
dtype, plus 1e-6. Cache slots that no query may read (left padding, past seq_len, unused
blocks) hold NaN, so any stray read shows up as NaN in the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from paged_generate.blocks import cdiv
from paged_generate.kernels import choose_num_splits, paged_attention, paged_attention_reference
from pool_blocks import fill_top_blocks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Case:
    query: torch.Tensor  # [num_rows, num_q_heads, query_len, head_dim]
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    kv_start: torch.Tensor | None
    scale: float


def make_case(
    seq_lens,
    *,
    device,
    query_len=1,
    num_kv_heads=2,
    group=1,
    head_dim=64,
    block_size=16,
    dtype=torch.float32,
    kv_start=None,
    spare_blocks=3,
    seed=0,
    query_layout="bhqd",
) -> Case:
    torch.manual_seed(seed)
    num_rows = len(seq_lens)
    blocks_per_row = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_row) + spare_blocks
    # One extra column so every row ends in -1 padding the kernel must not follow.
    block_tables = torch.full((num_rows, max(blocks_per_row) + 1), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks).to(torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_row):
        block_tables[r, :n] = perm[used : used + n]
        used += n

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    for r, n in enumerate(seq_lens):
        start = kv_start[r] if kv_start is not None else 0
        pos = torch.arange(start, n)
        blocks = block_tables[r, pos // block_size].long()
        key_cache[blocks, pos % block_size] = torch.randn(len(pos), num_kv_heads, head_dim).to(dtype)
        value_cache[blocks, pos % block_size] = torch.randn(len(pos), num_kv_heads, head_dim).to(dtype)

    num_q_heads = num_kv_heads * group
    if query_layout == "bqhd":  # what transformers hands over: a transposed view
        query = torch.randn(num_rows, query_len, num_q_heads, head_dim).to(dtype).transpose(1, 2)
    elif query_layout == "sliced":  # a view into a wider (e.g. fused QKV) buffer
        query = torch.randn(num_rows, num_q_heads, query_len, 3 * head_dim).to(dtype)[..., head_dim : 2 * head_dim]
    else:
        query = torch.randn(num_rows, num_q_heads, query_len, head_dim).to(dtype)

    return Case(
        query=query.to(device),
        key_cache=key_cache.to(device),
        value_cache=value_cache.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        kv_start=torch.tensor(kv_start, dtype=torch.int32, device=device) if kv_start is not None else None,
        scale=head_dim**-0.5,
    )


def run_and_check(case: Case, *, num_splits=None, kernel_block_tables=None, **features) -> torch.Tensor:
    """Runs the kernel (with ``kernel_block_tables`` if given) and checks it against the reference."""
    args = (case.block_tables, case.seq_lens)
    kwargs = dict(scale=case.scale, kv_start=case.kv_start, **features)
    tables = kernel_block_tables if kernel_block_tables is not None else case.block_tables
    out = paged_attention(
        case.query, case.key_cache, case.value_cache, tables, case.seq_lens, num_splits=num_splits, **kwargs
    )

    num_rows, num_q_heads, query_len, head_dim = case.query.shape
    assert out.shape == (num_rows, query_len, num_q_heads, head_dim)
    assert out.dtype == case.query.dtype
    assert torch.isfinite(out).all(), "NaN/inf in kernel output"

    to64 = lambda t: t.cpu().double()  # noqa: E731
    cpu_args = tuple(t.cpu() for t in args)
    cpu_kwargs = dict(kwargs, kv_start=case.kv_start.cpu() if case.kv_start is not None else None)
    # The reference upcasts the gathered blocks to the query's dtype, so a float64 query is
    # enough for a float64 truth (and never copies a whole, possibly huge, pool).
    truth = paged_attention_reference(
        to64(case.query), case.key_cache.cpu(), case.value_cache.cpu(), *cpu_args, **cpu_kwargs
    )
    low = paged_attention_reference(
        case.query.cpu(), case.key_cache.cpu(), case.value_cache.cpu(), *cpu_args, **cpu_kwargs
    )
    err = (to64(out) - truth).abs().max().item()
    ref_err = (to64(low) - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"kernel error {err:.3g} vs reference-in-{case.query.dtype} error {ref_err:.3g}"
    return out


# Lengths: a single token, exactly one block, exactly four blocks, and ragged ones.
DECODE_LENS = [1, 16, 37, 64]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(device, dtype, group, num_splits):
    case = make_case(DECODE_LENS, device=device, dtype=dtype, group=group, seed=group)
    run_and_check(case, num_splits=num_splits)


@pytest.mark.parametrize("query_len", [7, 20])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill(device, dtype, group, query_len):
    # Rows whose prompt is all new (seq_len == query_len) and rows continuing a cached prefix.
    case = make_case([20, 33, 48, 64], device=device, dtype=dtype, group=group, query_len=query_len, seed=query_len)
    run_and_check(case)


FEATURES = {
    "window5": dict(sliding_window=5),
    "window20": dict(sliding_window=20),
    "softcap": dict(softcap=2.0),
    "kv_start": dict(kv_start=[0, 3, 16, 30]),
    "all": dict(sliding_window=12, softcap=2.0, kv_start=[0, 3, 16, 30]),
}
MODES = {
    "decode": dict(query_len=1, num_splits=1),
    "decode_split": dict(query_len=1, num_splits=4),
    "prefill": dict(query_len=20, num_splits=1),
    "prefill_split": dict(query_len=9, num_splits=2),
}


# Every feature x mode in fp32 (tight tolerance); the 16-bit dtypes with everything combined.
FEATURE_CASES = [(torch.float32, f, m) for f in FEATURES for m in MODES]
FEATURE_CASES += [(torch.bfloat16, "all", m) for m in MODES] + [(torch.float16, "all", m) for m in MODES]


@pytest.mark.parametrize("dtype,feature,mode", FEATURE_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_features(device, dtype, feature, mode):
    features = dict(FEATURES[feature])
    kv_start = features.pop("kv_start", None)
    query_len, num_splits = MODES[mode]["query_len"], MODES[mode]["num_splits"]
    # Scores ~ N(0, 1) * 3 so that a softcap of 2 actually bends them.
    case = make_case([20, 33, 48, 64], device=device, dtype=dtype, group=4, query_len=query_len, kv_start=kv_start)
    case.scale *= 3
    run_and_check(case, num_splits=num_splits, **features)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("query_len,num_splits", [(1, 2), (5, 1)])
def test_head_dims(device, head_dim, query_len, num_splits):
    case = make_case([5, 16, 29], device=device, dtype=torch.float16, group=4, head_dim=head_dim, query_len=query_len)
    run_and_check(case, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 256])
@pytest.mark.parametrize("query_len,num_splits", [(1, 1), (1, 3), (6, 1)])
def test_block_sizes(device, block_size, query_len, num_splits):
    # 8 takes the per-key block lookup (tile spans two blocks); >= 64 several tiles per block.
    lens = [6, block_size, block_size + 7, 2 * block_size]
    case = make_case(lens, device=device, block_size=block_size, num_kv_heads=1, group=2, query_len=query_len)
    run_and_check(case, num_splits=num_splits, sliding_window=block_size + 3)


@pytest.mark.parametrize("num_kv_heads,group", [(1, 8), (2, 3), (1, 6)], ids=["mqa", "group3", "mqa_group6"])
@pytest.mark.parametrize("query_len,num_splits", [(1, 1), (1, 2), (11, 1)])
def test_odd_head_groupings(device, num_kv_heads, group, query_len, num_splits):
    case = make_case(
        [11, 40], device=device, dtype=torch.float16, num_kv_heads=num_kv_heads, group=group, query_len=query_len
    )
    run_and_check(case, num_splits=num_splits)


@pytest.mark.parametrize("layout", ["bqhd", "sliced"])
@pytest.mark.parametrize("query_len", [1, 6])
def test_non_contiguous_query(device, layout, query_len):
    case = make_case([9, 30], device=device, group=4, query_len=query_len, query_layout=layout)
    assert case.query.stride(-2) != case.query.shape[-1] or query_len == 1
    run_and_check(case, num_splits=1)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_queries_with_no_visible_key_output_zeros(device, num_splits):
    # Row 0: left-padded prompt, prefill queries at positions < kv_start see nothing.
    # Row 1: kv_start == seq_len, nothing at all is visible. Row 2: seq_len 0 (empty row).
    case = make_case([12, 12, 0], device=device, dtype=torch.float16, group=4, query_len=1, kv_start=[5, 12, 0])
    out = run_and_check(case, num_splits=num_splits)
    assert (out[1:] == 0).all()

    prefill = make_case([12, 12], device=device, group=4, query_len=12, kv_start=[5, 12])
    out = run_and_check(prefill, num_splits=num_splits)
    assert (out[0, :5] == 0).all() and (out[1] == 0).all()
    assert (out[0, 5:] != 0).any(dim=-1).all()


@pytest.mark.parametrize("query_len,num_splits", [(1, 1), (1, 3), (4, 1)])
def test_blocks_outside_the_visible_range_are_never_read(device, query_len, num_splits):
    # Blocks wholly before kv_start or behind every query's window may be unallocated. Point
    # them at a block of NaN (instead of -1, so a bad read fails cleanly rather than faulting).
    window, block_size = 20, 16
    lens, kv_start = [70, 64, 40], [0, 33, 0]
    case = make_case(lens, device=device, group=4, query_len=query_len, kv_start=kv_start, spare_blocks=1)
    used = set(case.block_tables.flatten().tolist())
    trap = next(b for b in range(case.key_cache.shape[0]) if b not in used)  # unused: all NaN
    assert case.key_cache[trap].isnan().all()
    tables = case.block_tables.clone()
    for r, (n, start) in enumerate(zip(lens, kv_start)):
        lowest_visible = max(start, n - query_len - window + 1)
        tables[r, : lowest_visible // block_size] = trap
    assert tables.eq(trap).sum() >= 5
    run_and_check(case, num_splits=num_splits, sliding_window=window, kernel_block_tables=tables)


def test_window_without_kv_start_skips_early_tiles(device):
    # Window 1: each query sees only itself, so the output is exactly its own value row.
    case = make_case([40], device=device, num_kv_heads=1, group=1, query_len=40)
    out = run_and_check(case, sliding_window=1)
    pos = torch.arange(40)
    blocks = case.block_tables[0, pos // 16].long().cpu()
    expected = case.value_cache.cpu()[blocks, pos % 16, 0]
    torch.testing.assert_close(out[0, :, 0].cpu(), expected, rtol=1e-6, atol=1e-6)


def test_default_split_choice(device):
    # Two kv-head programs for a 1024-token-wide block table: the heuristic splits.
    case = make_case([3, 250], device=device, dtype=torch.float16, group=4, num_kv_heads=1, spare_blocks=48)
    case.block_tables = torch.cat(
        [case.block_tables, torch.full((2, 64 - case.block_tables.shape[1]), -1, dtype=torch.int32, device=device)], 1
    )
    assert choose_num_splits(2, 64 * 16, torch.device("cpu")) > 1
    run_and_check(case)


def test_choose_num_splits():
    cpu = torch.device("cpu")  # SM-count guess of 132
    assert choose_num_splits(132 * 4, 1 << 20, cpu) == 1  # enough programs already
    assert choose_num_splits(1, 128, cpu) == 1  # too short to be worth splitting
    assert choose_num_splits(1, 1 << 20, cpu) == 64  # capped
    assert choose_num_splits(8, 4096, cpu) == 16  # limited by keys per split
    assert choose_num_splits(66, 1 << 20, cpu) == 4  # about two waves


def test_int64_offsets_large_pool(device, large_pools):
    """Blocks at the top of a pool with more than 2**31 elements per cache."""
    key_cache, value_cache = large_pools
    head_dim = key_cache.shape[-1]
    top = fill_top_blocks(large_pools, 8)
    block_tables = top.flip(0).view(2, 4).to(torch.int32)
    for query_len, num_splits in [(1, 1), (1, 2), (10, 1)]:
        case = Case(
            query=torch.randn(2, 4, query_len, head_dim).half(),
            key_cache=key_cache,
            value_cache=value_cache,
            block_tables=block_tables,
            seq_lens=torch.tensor([50, 64], dtype=torch.int32),
            kv_start=None,
            scale=head_dim**-0.5,
        )
        run_and_check(case, num_splits=num_splits)


def test_rejects_bad_inputs(device):
    case = make_case([5], device=device)
    q, k, v, bt, sl = case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens
    with pytest.raises(TypeError):
        paged_attention(q.half(), k, v, bt, sl, scale=1.0)
    with pytest.raises(ValueError):
        paged_attention(q, k, v, bt.long(), sl, scale=1.0)
    with pytest.raises(ValueError):
        paged_attention(q, k, v, bt, sl.long(), scale=1.0)
    with pytest.raises(ValueError):
        paged_attention(q[:, :1].expand(1, 3, 1, 64), k, v, bt, sl, scale=1.0)  # 3 q heads, 2 kv heads
    with pytest.raises(ValueError):
        paged_attention(q, k[:, :12], v[:, :12], bt, sl, scale=1.0)  # block_size 12
    with pytest.raises(ValueError):
        paged_attention(q, k, v, bt, sl, scale=1.0, sliding_window=0)
    with pytest.raises(ValueError):
        paged_attention(q, k, v, bt, sl, scale=1.0, num_splits=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bigger_mixed_batch(device, dtype):
    lens = [1, 15, 16, 17, 100, 255, 256, 300]
    kv_start = [0, 0, 4, 0, 37, 0, 100, 1]
    for query_len, num_splits in [(1, 1), (1, 5), (33, 1)]:
        lens_q = [max(n, query_len) for n in lens]
        case = make_case(lens_q, device=device, dtype=dtype, num_kv_heads=2, group=4, head_dim=128,
                         query_len=query_len, kv_start=kv_start, seed=7)
        run_and_check(case, num_splits=num_splits, sliding_window=64, softcap=30.0)
