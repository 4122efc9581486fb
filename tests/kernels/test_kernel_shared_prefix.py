"""shared_prefix_paged_attention (Triton, cascade) against the unsplit reference.

The ground truth is ``paged_attention_reference`` over each row's full table (prefix blocks
then own blocks) in float64; the kernel's max error must be at most twice the error of the
same reference run in the kernel's dtype, plus 1e-6 (the rule of test_kernel_attention.py).
Slots no query may read (before kv_start, past seq_len, unused blocks) hold NaN.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from paged_generate.blocks import cdiv
from paged_generate.kernels import (
    full_block_tables,
    group_members,
    shared_prefix_paged_attention,
    shared_prefix_paged_attention_reference,
)
from pool_blocks import fill_top_blocks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Case:
    query: torch.Tensor  # [num_rows, num_q_heads, 1, head_dim]
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    row_group: torch.Tensor
    prefix_tables: torch.Tensor
    prefix_len: torch.Tensor
    suffix_tables: torch.Tensor
    seq_lens: torch.Tensor
    kv_start: torch.Tensor | None
    scale: float

    def grouping(self) -> dict:
        return dict(row_group=self.row_group, prefix_tables=self.prefix_tables, prefix_len=self.prefix_len,
                    suffix_tables=self.suffix_tables, seq_lens=self.seq_lens, scale=self.scale,
                    kv_start=self.kv_start)  # fmt: skip


def make_case(
    group_sizes,
    prefix_blocks,  # per group
    own_lens,  # per row, in row order after the shuffle
    *,
    device,
    num_kv_heads=2,
    group=1,
    head_dim=64,
    block_size=16,
    dtype=torch.float32,
    kv_start=None,  # per row
    shuffle=True,
    table_dtype=torch.int32,
    query_layout="bhqd",
    spare_blocks=2,
    seed=0,
) -> Case:
    torch.manual_seed(seed)
    num_groups, num_rows = len(group_sizes), sum(group_sizes)
    assert len(prefix_blocks) == num_groups and len(own_lens) == num_rows
    slots = torch.repeat_interleave(torch.arange(num_groups), torch.tensor(group_sizes))
    row_group = slots[torch.randperm(num_rows)] if shuffle else slots
    prefix_len = [n * block_size for n in prefix_blocks]
    seq_lens = [prefix_len[g] + own for g, own in zip(row_group.tolist(), own_lens)]
    own_blocks = [cdiv(own, block_size) for own in own_lens]

    num_blocks = sum(prefix_blocks) + sum(own_blocks) + spare_blocks
    perm = iter(torch.randperm(num_blocks).tolist())
    # One extra column so every table ends in -1 padding the kernel must not follow.
    prefix_tables = torch.full((num_groups, max(prefix_blocks) + 1), -1, dtype=table_dtype)
    for g, n in enumerate(prefix_blocks):
        prefix_tables[g, :n] = torch.tensor([next(perm) for _ in range(n)], dtype=table_dtype)
    suffix_tables = torch.full((num_rows, max(own_blocks) + 1), -1, dtype=table_dtype)
    for r, n in enumerate(own_blocks):
        suffix_tables[r, :n] = torch.tensor([next(perm) for _ in range(n)], dtype=table_dtype)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)

    def fill(table, positions):
        blocks = table[positions // block_size].long()
        key_cache[blocks, positions % block_size] = torch.randn(len(positions), num_kv_heads, head_dim).to(dtype)
        value_cache[blocks, positions % block_size] = torch.randn(len(positions), num_kv_heads, head_dim).to(dtype)

    starts = kv_start if kv_start is not None else [0] * num_rows
    for g in range(num_groups):  # shared slots from the group's smallest kv_start on
        lo = min((s for s, rg in zip(starts, row_group.tolist()) if rg == g), default=0)
        fill(prefix_tables[g], torch.arange(lo, prefix_len[g]))
    for r, g in enumerate(row_group.tolist()):
        fill(suffix_tables[r], torch.arange(max(starts[r], prefix_len[g]), seq_lens[r]) - prefix_len[g])

    num_q_heads = num_kv_heads * group
    if query_layout == "sliced":  # a view into a wider (e.g. fused QKV) buffer
        query = torch.randn(num_rows, num_q_heads, 1, 3 * head_dim).to(dtype)[..., head_dim : 2 * head_dim]
    else:
        query = torch.randn(num_rows, num_q_heads, 1, head_dim).to(dtype)
    as_i32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return Case(
        query=query.to(device),
        key_cache=key_cache.to(device),
        value_cache=value_cache.to(device),
        row_group=row_group.to(device),
        prefix_tables=prefix_tables.to(device),
        prefix_len=as_i32(prefix_len),
        suffix_tables=suffix_tables.to(device),
        seq_lens=as_i32(seq_lens),
        kv_start=as_i32(kv_start) if kv_start is not None else None,
        scale=head_dim**-0.5,
    )


def run_and_check(case: Case, **options) -> torch.Tensor:
    out = shared_prefix_paged_attention(case.query, case.key_cache, case.value_cache, **case.grouping(), **options)
    num_rows, num_q_heads, _, head_dim = case.query.shape
    assert out.shape == (num_rows, 1, num_q_heads, head_dim) and out.dtype == case.query.dtype
    assert torch.isfinite(out).all(), "NaN/inf in kernel output"

    features = {k: v for k, v in options.items() if k in ("sliding_window", "softcap")}
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.grouping().items()}
    kc, vc = case.key_cache.cpu(), case.value_cache.cpu()
    # The reference upcasts the gathered blocks to the query's dtype: a float64 query gives a float64 truth.
    truth = shared_prefix_paged_attention_reference(case.query.cpu().double(), kc, vc, **cpu, **features)
    low = shared_prefix_paged_attention_reference(case.query.cpu(), kc, vc, **cpu, **features)
    err = (out.cpu().double() - truth).abs().max().item()
    ref_err = (low.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"kernel error {err:.3g} vs reference-in-{case.query.dtype} error {ref_err:.3g}"
    return out


def random_grouping(seed: int, block_size: int = 16, max_rows: int = 20):
    """Groups of 1-16 rows (at least one of each extreme when there is room), shared runs of 0-3 blocks, ragged own
    lengths including 1, exactly one block, and one block plus one."""
    rng = random.Random(seed)
    sizes = [1, 16] if max_rows >= 17 else [1]
    while sum(sizes) < max_rows:
        sizes.append(rng.randint(1, min(16, max_rows - sum(sizes))))
    prefix_blocks = [rng.randint(0, 3) for _ in sizes]
    prefix_blocks[rng.randrange(len(sizes))] = 0
    edge = [1, block_size, block_size + 1, 2 * block_size]
    own = edge + [rng.randint(1, 3 * block_size) for _ in range(sum(sizes) - len(edge))]
    rng.shuffle(own)
    return sizes, prefix_blocks, own


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_groupings(device, dtype, group):
    sizes, prefix_blocks, own = random_grouping(seed=group)
    case = make_case(sizes, prefix_blocks, own, device=device, dtype=dtype, group=group, seed=group, num_kv_heads=1,
                     table_dtype=torch.int64 if group == 4 else torch.int32)  # fmt: skip
    run_and_check(case)


@pytest.mark.parametrize("num_splits,suffix_splits", [(1, 1), (3, 1), (1, 2), (4, 3)])
def test_splits(device, num_splits, suffix_splits):
    # 3 splits of a 3-block prefix leave some splits empty (TILE_N is 64 keys); 3 suffix splits over rows with
    # one own token leave empty ones too.
    sizes, prefix_blocks, own = random_grouping(seed=11, max_rows=12)
    case = make_case(sizes, [6] + prefix_blocks[1:], own, device=device, group=4, num_kv_heads=1, seed=num_splits)
    run_and_check(case, num_splits=num_splits, suffix_splits=suffix_splits)


FEATURES = {
    "window5": dict(sliding_window=5),  # never sees the prefix of rows with >= 5 own tokens
    "window40": dict(sliding_window=40),  # straddles the prefix / own boundary
    "softcap": dict(softcap=2.0),
    "kv_start": dict(kv_start="group"),
    "all": dict(sliding_window=40, softcap=2.0, kv_start="group"),
}
MERGE, SPLIT = (None, None), (2, 2)  # the suffix kernel merges the prefix partials / split_reduce merges everything
FEATURE_CASES = [
    (torch.float32, "window5", MERGE),
    (torch.float32, "window40", SPLIT),
    (torch.float32, "softcap", MERGE),
    (torch.float32, "kv_start", SPLIT),
    (torch.float32, "all", MERGE),
    (torch.float32, "all", SPLIT),
    (torch.bfloat16, "all", SPLIT),
    (torch.float16, "all", MERGE),
]


@pytest.mark.parametrize("dtype,feature,splits", FEATURE_CASES,
                         ids=lambda x: {MERGE: "merge", SPLIT: "split"}.get(x, str(x).replace("torch.", "")))
def test_features(device, dtype, feature, splits):
    sizes, prefix_blocks, own = [3, 1, 5, 2], [2, 0, 3, 1], [1, 16, 30, 3, 17, 1, 40, 9, 32, 5, 20]
    features = dict(FEATURES[feature])
    kv_start = None
    if features.pop("kv_start", None):
        # Left padding: the same in every member of a group (as in generate()), reaching into the prefix or past it.
        per_group = [5, 0, 35, 16]
        kv_start = [per_group[g] for g in make_case(sizes, prefix_blocks, own, device="cpu").row_group.tolist()]
    case = make_case(sizes, prefix_blocks, own, device=device, dtype=dtype, group=4, kv_start=kv_start)
    case.scale *= 3  # scores ~ N(0, 1) * 3, so that a softcap of 2 bends them
    run_and_check(case, num_splits=splits[0], suffix_splits=splits[1], **features)


def test_suffix_too_wide_to_merge(device, monkeypatch):
    # Query tiles too wide for the suffix kernel to hold a second accumulator (a 64-head group at head_dim 256 on a
    # GPU): split_reduce merges even with one suffix split.
    from paged_generate.kernels import shared_prefix

    original = shared_prefix.suffix_meta
    monkeypatch.setattr(shared_prefix, "suffix_meta", lambda **kw: {**original(**kw), "CAN_MERGE": False})
    case = make_case([3, 1], [2, 1], [1, 16, 30, 3], device=device, group=4)
    for splits in ((None, 1), (2, 1), (2, 2)):
        run_and_check(case, num_splits=splits[0], suffix_splits=splits[1])


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(device, head_dim):
    case = make_case([3, 2], [2, 1], [1, 16, 7, 20, 33], device=device, dtype=torch.float16, group=4,
                     head_dim=head_dim, num_kv_heads=1)  # fmt: skip
    run_and_check(case, num_splits=2)


@pytest.mark.parametrize("block_size", [8, 16, 64])
def test_block_sizes(device, block_size):
    # 8: keys are looked up per key in both kernels; 64: one lookup per tile in both.
    own = [1, block_size, block_size + 1, 2 * block_size + 3]
    case = make_case([3, 1], [2, 1], own, device=device, block_size=block_size, num_kv_heads=1, group=2)
    run_and_check(case, sliding_window=block_size + 20)
    run_and_check(case, num_splits=2, suffix_splits=2)


def test_non_contiguous_query(device):
    case = make_case([2, 3], [1, 2], [4, 16, 1, 9, 30], device=device, group=4, query_layout="sliced")
    assert not case.query.is_contiguous()
    run_and_check(case)


def test_members_differ_in_kv_start_and_length(device):
    # One group whose members have different left padding (inside the prefix and past it) and lengths.
    kv_start = [0, 3, 20, 40, 2]
    case = make_case([5], [3], [1, 16, 5, 33, 2], device=device, group=4, kv_start=kv_start, shuffle=False)
    for window in (None, 30):
        run_and_check(case, sliding_window=window)


def test_generate_layout(device):
    """What generate() has: contiguous equal-size groups, one length, int64 tables, members built once."""
    group_size, num_prefix_blocks, block_size = 4, 3, 16
    case = make_case([group_size] * 3, [num_prefix_blocks] * 3, [21] * 12, device=device, group=4, shuffle=False,
                     num_kv_heads=1, table_dtype=torch.int64, kv_start=[0] * 4 + [7] * 4 + [30] * 4)  # fmt: skip
    row_group = torch.arange(12, device=device) // group_size
    assert torch.equal(case.row_group, row_group)
    members = group_members(row_group, 3, max_group_size=group_size)
    out = run_and_check(case, members=members)
    assert torch.equal(out, shared_prefix_paged_attention(case.query, case.key_cache, case.value_cache,
                                                          **case.grouping()))  # fmt: skip
    assert case.prefix_len.tolist() == [num_prefix_blocks * block_size] * 3


def test_queries_with_no_visible_key_output_zeros(device):
    # Row 0: kv_start == seq_len. Row 1: empty (seq_len 0) in a group without prefix. Row 2: no own token (the
    # query sits in the prefix). Row 3: sees its own keys only (kv_start past the prefix).
    case = make_case([2, 1, 1], [1, 0, 1], [4, 5, 0, 0], device=device, group=4, shuffle=False)
    case.seq_lens = torch.tensor([20, 21, 0, 16], dtype=torch.int32, device=device)
    case.kv_start = torch.tensor([20, 17, 0, 0], dtype=torch.int32, device=device)
    for splits in [(None, None), (2, 3)]:
        out = run_and_check(case, num_splits=splits[0], suffix_splits=splits[1])
        assert (out[0] == 0).all() and (out[2] == 0).all()
        assert (out[1] != 0).any(dim=-1).all() and (out[3] != 0).any(dim=-1).all()


def test_blocks_outside_the_visible_range_are_never_read(device):
    # Blocks wholly before every member's kv_start or window may be unallocated: point them at an all-NaN block
    # (instead of -1, so that a stray read fails cleanly rather than faulting). The output must not change.
    window = 20
    case = make_case([2, 3], [4, 4], [10, 40, 3, 16, 30], device=device, group=4, shuffle=False, spare_blocks=1,
                     kv_start=[0, 0, 40, 40, 40])  # fmt: skip
    splits = [(None, None), (3, 2)]
    expected = [run_and_check(case, sliding_window=window, num_splits=p, suffix_splits=s) for p, s in splits]
    used = set(case.prefix_tables.flatten().tolist()) | set(case.suffix_tables.flatten().tolist())
    trap = next(b for b in range(case.key_cache.shape[0]) if b not in used)
    assert case.key_cache[trap].isnan().all()
    case.prefix_tables, case.suffix_tables = case.prefix_tables.clone(), case.suffix_tables.clone()
    # Group 0: rows at positions 73 and 103 see keys > 53 only: blocks 0-2 hidden. Group 1: kv_start 40.
    case.prefix_tables[0, :3] = trap
    case.prefix_tables[1, :2] = trap
    # Row 1 (position 103) does not see its own first block (positions 64-79) either.
    case.suffix_tables[1, 0] = trap
    for (p, s), want in zip(splits, expected):
        out = shared_prefix_paged_attention(case.query, case.key_cache, case.value_cache, **case.grouping(),
                                            sliding_window=window, num_splits=p, suffix_splits=s)  # fmt: skip
        assert torch.equal(out, want)


def test_one_row_no_prefix_is_paged_attention(device):
    from paged_generate.kernels import paged_attention

    case = make_case([1, 1], [0, 0], [37, 80], device=device, group=4, shuffle=False)
    out = run_and_check(case)
    tables = full_block_tables(case.row_group, case.prefix_tables, case.prefix_len, case.suffix_tables,
                               case.seq_lens, 16)  # fmt: skip
    expected = paged_attention(case.query, case.key_cache, case.value_cache, tables, case.seq_lens, scale=case.scale,
                               num_splits=1)  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_group_members(device):
    row_group = torch.tensor([2, 0, 2, 2, 0], device=device)
    members = group_members(row_group, 4)
    assert members.max_group_size == 3
    assert members.group_start.tolist() == [0, 2, 2, 5, 5]
    assert members.member_rows.tolist() == [1, 4, 0, 2, 3]
    assert members.member_rows.dtype == members.group_start.dtype == torch.int32


def test_full_block_tables():
    tables = full_block_tables(torch.tensor([1, 0]), torch.tensor([[7, -1], [5, 6]]), torch.tensor([16, 32]),
                               torch.tensor([[1, -1, -1], [3, 4, -1]]), torch.tensor([33, 33], dtype=torch.int32), 16)
    assert tables.tolist() == [[5, 6, 1], [7, 3, 4]]


def test_int64_offsets_large_pool(device, large_pools):
    """Blocks at the top of a pool with more than 2**31 elements per cache."""
    key_cache, value_cache = large_pools
    head_dim = key_cache.shape[-1]
    top = fill_top_blocks(large_pools, 6)
    case = Case(
        query=torch.randn(3, 4, 1, head_dim).half(), key_cache=key_cache, value_cache=value_cache,
        row_group=torch.tensor([0, 0, 0]), prefix_tables=top[None, [5, 4]],
        prefix_len=torch.tensor([32], dtype=torch.int32), suffix_tables=top[[0, 1, 2], None],
        seq_lens=torch.tensor([40, 48, 33], dtype=torch.int32), kv_start=None, scale=head_dim**-0.5,
    )  # fmt: skip
    run_and_check(case, num_splits=2)


def test_rejects_bad_inputs(device):
    case = make_case([2], [1], [3, 4], device=device)
    q, k, v, g = case.query, case.key_cache, case.value_cache, case.grouping()
    with pytest.raises(ValueError, match="decode"):
        shared_prefix_paged_attention(q.expand(2, 2, 3, 64), k, v, **g)
    with pytest.raises(TypeError):
        shared_prefix_paged_attention(q.half(), k, v, **g)
    with pytest.raises(ValueError, match="row_group"):
        shared_prefix_paged_attention(q, k, v, **dict(g, row_group=g["row_group"][:1]))
    with pytest.raises(ValueError, match="prefix_len"):
        shared_prefix_paged_attention(q, k, v, **dict(g, prefix_len=g["prefix_len"].float()))
    with pytest.raises(ValueError, match="suffix_tables"):
        shared_prefix_paged_attention(q, k, v, **dict(g, suffix_tables=g["suffix_tables"][:1]))
    with pytest.raises(ValueError, match="seq_lens"):
        shared_prefix_paged_attention(q, k, v, **dict(g, seq_lens=g["seq_lens"].long()))
    with pytest.raises(ValueError, match="num_splits"):
        shared_prefix_paged_attention(q, k, v, **g, num_splits=0)
    with pytest.raises(ValueError, match="members"):
        shared_prefix_paged_attention(q, k, v, **g, members=group_members(g["row_group"], 2))
