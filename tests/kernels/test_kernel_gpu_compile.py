"""Every kernel variant the dispatch can launch compiles for an H100 (sm_90) without register spills and within its
shared memory, for every cache dtype x head_dim class (see sm90_compile.py for how, without a GPU).

The launch wrappers run on CPU tensors shaped as generate() shapes them (transformers' transposed query view, the
pools, int32 / int64 tables, the tokens-major K/V of a step), for the prompt step, the decode step with and without
KV splits, the shared-prefix step (small and 64-row groups), the KV write, the block copy and the split merge, on
pools in the model's dtype and on compressed ones (int8 / fp8 full blocks with their scales, partial blocks in a side
pool). The head dims cover each power-of-two class the kernels pad to (64, 128, 256) and an unpadded one (80, 96); GQA
groups of 4 and 64 (the widest query tiles); all masking features on (the most registers) and off.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from sm90_compile import check_launches, recorded_launches, run_compile_script

DTYPES = ("float16", "bfloat16", "float32")


def _compile_dtypes(tmp_path, *options):
    # One process per dtype, side by side (the compiles are single-threaded).
    with ThreadPoolExecutor(len(DTYPES)) as pool:
        outs = list(pool.map(lambda d: run_compile_script(__file__, tmp_path / d, d, *options), DTYPES))
    for dtype, out in zip(DTYPES, outs):
        assert "variants compiled" in out, dtype + out[-2000:]


def test_widest_variants_compile_for_sm90_without_spills(tmp_path):
    # The register-heaviest classes: head dims 128 and 256 with every masking feature on.
    _compile_dtypes(tmp_path, "--quick")


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_without_spills(tmp_path):
    _compile_dtypes(tmp_path)


HEAD_DIMS = (64, 80, 128, 256)
QUICK_HEAD_DIMS = (128, 256)
# (q heads, kv heads): GQA 4 (Llama 3, Mistral) and a 64:1 group (multi-query), which makes the widest query tiles.
HEADS = ((32, 8), (64, 1))


def _scenarios(dtype, head_dim, heads, kv_heads, features, storage=None):
    """Launch every wrapper once the way a generate() step would, on small CPU tensors (nothing runs); `storage`:
    the compressed blocks' dtype, or None for pools in the model's dtype."""
    import torch

    from paged_generate import kernels
    from paged_generate.kernels.grouping import group_members
    from paged_generate.kv_ops import tokens_major

    block_size, num_blocks = 16, 4
    pool = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    scale = head_dim**-0.5
    extra = dict(sliding_window=4096, softcap=50.0) if features else {}
    if storage is not None:  # the full blocks compressed; the partial ones (and the writes) in the model's dtype
        partial = pool
        pool = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=storage) for _ in range(2)]
        scales = [torch.ones(num_blocks, kv_heads, dtype=torch.float32) for _ in range(2)]

    def step(rows, query_len, past):
        # What a layer holds after its projections: [rows, heads, query_len, head_dim] transposed views.
        query = torch.zeros(rows, query_len, heads, head_dim, dtype=dtype).transpose(1, 2)
        key = torch.zeros(rows, query_len, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
        seq_len = past + query_len
        width = -(-seq_len // block_size)
        tables = torch.zeros(rows, width, dtype=torch.int32)
        seq_lens = torch.full((rows,), seq_len, dtype=torch.int32)
        kv_start = torch.zeros(rows, dtype=torch.int32) if features else None
        slots = torch.zeros(rows * query_len, dtype=torch.int64)
        if storage is not None:
            extra.update(key_scales=scales[0], value_scales=scales[1], partial_key_cache=partial[0],
                         partial_value_cache=partial[1], partial_slots=torch.zeros(rows, dtype=torch.int32))
        kernels.launch_write_kv(tokens_major(key), tokens_major(key), *(partial if storage is not None else pool), slots)
        kernels.launch_paged_attention(query, *pool, tables, seq_lens, scale=scale, kv_start=kv_start, **extra)
        return query, seq_lens, kv_start

    step(2, 37, 0)  # prompt
    step(2, 1, 40)  # short rows: one split
    step(2, 1, 1000)  # long rows: KV splits and their merge
    for rows, groups, own in ((8, 2, 40), (64, 1, 40), (8, 2, 1000)):  # beams / samples sharing their prompt
        query, seq_lens, kv_start = step(rows, 1, 2000 + own)
        row_group = torch.arange(rows) * groups // rows
        shared = dict(row_group=row_group, prefix_tables=torch.zeros(groups, 125, dtype=torch.int64),
                      prefix_len=torch.full((groups,), 2000, dtype=torch.int32),
                      suffix_tables=torch.zeros(rows, -(-own // block_size) + 1, dtype=torch.int64))  # fmt: skip
        kernels.launch_shared_prefix_paged_attention(
            query, *pool, seq_lens=seq_lens, scale=scale, kv_start=kv_start,
            members=group_members(row_group, groups, max_group_size=rows // groups), **shared, **extra)  # fmt: skip
    kernels.launch_copy_blocks(*(partial if storage is not None else pool), torch.tensor([0]), torch.tensor([1]))


def _compile_all(dtype_name: str, quick: bool) -> None:
    import torch

    dtype = getattr(torch, dtype_name)
    seen, problems = {}, []
    # Compressed blocks reach the kernels in 16-bit models only (`kernels_load`).
    storages = (None,) if dtype == torch.float32 else (None, torch.int8) if quick else (
        None, torch.int8, torch.float8_e4m3fn)
    for head_dim in QUICK_HEAD_DIMS if quick else HEAD_DIMS:
        for heads, kv_heads in HEADS:
            for features in (True,) if quick else (True, False):
                for storage in storages:
                    with recorded_launches() as launches:
                        _scenarios(dtype, head_dim, heads, kv_heads, features, storage)
                    stored = f" {str(storage).split('.')[-1]} blocks" if storage is not None else ""
                    label = f"{dtype_name} d={head_dim} {heads}/{kv_heads}{' masks' if features else ''}{stored}"
                    problems += check_launches(launches, label, seen)
    print(f"{len(seen)} variants compiled")
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    _compile_all(sys.argv[1], quick="--quick" in sys.argv[2:])
