"""The attention kernels on compressed caches (int8 / fp8 full blocks with per-(block, kv head) scales, partial last
blocks in a side pool) against dequantize-then-reference.

The truth is the references over `dequantized_caches` (the compressed blocks dequantized to the query's dtype) in
float64; the kernel's max error must be at most twice the error of the same reference run in the query's dtype, plus
1e-6 (the rule of test_kernel_attention.py). Slots no query may read stay NaN: partial pools past a row's tokens, and
the scales of every block no row holds full (a partial block's compressed twin, unused blocks), so a stray read of the
wrong pool shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from paged_generate.kernels import (
    full_block_tables,
    paged_attention,
    paged_attention_reference,
    shared_prefix_paged_attention,
    shared_prefix_paged_attention_reference,
)
from paged_generate.quantize import quantize_blocks, storage_dtype
from test_kernel_attention import make_case
from test_kernel_shared_prefix import make_case as make_shared_case
from test_kernel_shared_prefix import random_grouping

KV_DTYPES = ["int8", "fp8"]


def compress(key_cache, value_cache, tables, seq_lens, kv_cache_dtype, seed=0) -> dict:
    """The compressed cache holding what `tables` [num_rows, blocks] (every row's blocks in position order) and
    `seq_lens` say the dense caches hold: the caches and scales, and the partial pools and slots (kwargs of the
    kernels and references)."""
    num_blocks, block_size, heads, _ = key_cache.shape
    num_rows = len(seq_lens)
    generator = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_rows + 2, generator=generator)[:num_rows].to(torch.int32)  # two slots stay unused
    out = dict(partial_slots=torch.full((num_rows,), -1, dtype=torch.int32))
    for name, cache in (("key", key_cache), ("value", value_cache)):
        cache = cache.cpu()
        compressed = torch.zeros(cache.shape, dtype=storage_dtype(kv_cache_dtype))
        scales = torch.full((num_blocks, heads), float("nan"))
        partial = torch.full((num_rows + 2, *cache.shape[1:]), float("nan"), dtype=cache.dtype)
        for row, seq_len in enumerate(seq_lens.tolist()):
            full = tables[row, : seq_len // block_size].long().cpu()
            # Slots before kv_start are never read; as a full block's bytes they only need to be finite.
            q, s = quantize_blocks(cache[full].nan_to_num(0.0), kv_cache_dtype)
            compressed.view(torch.uint8)[full] = q.view(torch.uint8)
            scales[full] = s
            if seq_len % block_size:
                partial[slots[row]] = cache[int(tables[row, seq_len // block_size])]
                out["partial_slots"][row] = slots[row]
        out[f"{name}_cache"], out[f"{name}_scales"], out[f"partial_{name}_cache"] = compressed, scales, partial
    device = key_cache.device
    return {name: tensor.to(device) for name, tensor in out.items()}


def check(out, truth, low, dtype):
    assert torch.isfinite(out).all(), "NaN/inf in kernel output: a read outside the row's tokens or pools"
    err = (out.cpu().double() - truth).abs().max().item()
    ref_err = (low.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"kernel error {err:.3g} vs reference-in-{dtype} error {ref_err:.3g}"


def run_paged(case, kv_cache_dtype, *, num_splits=None, **features):
    storage = compress(case.key_cache, case.value_cache, case.block_tables, case.seq_lens, kv_cache_dtype)
    caches = (storage.pop("key_cache"), storage.pop("value_cache"))
    kwargs = dict(scale=case.scale, kv_start=case.kv_start, **features)
    out = paged_attention(case.query, *caches, case.block_tables, case.seq_lens, num_splits=num_splits, **kwargs,
                          **storage)
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ref_args = (*[cpu(c) for c in caches], cpu(case.block_tables), cpu(case.seq_lens))
    ref_kwargs = {k: cpu(v) for k, v in {**kwargs, **storage}.items()}
    truth = paged_attention_reference(case.query.cpu().double(), *ref_args, **ref_kwargs)
    low = paged_attention_reference(case.query.cpu(), *ref_args, **ref_kwargs)
    check(out, truth, low, case.query.dtype)
    return out


# Lengths at block boundaries: a single token, one block minus one, exactly one, one plus one, exactly two, ragged.
BOUNDARY_LENS = [1, 15, 16, 17, 32, 37]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode(device, dtype, kv_cache_dtype, group, num_splits):
    case = make_case(BOUNDARY_LENS, device=device, dtype=dtype, group=group, seed=group + num_splits)
    run_paged(case, kv_cache_dtype, num_splits=num_splits)


@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_decode_fp16_blocks_smaller_than_a_tile(device, kv_cache_dtype):
    # block_size 8 < TILE_N 16: one key tile spans two blocks, and the last one may be the row's partial block.
    case = make_case([1, 7, 8, 9, 16, 29], device=device, dtype=torch.float16, group=2, block_size=8)
    run_paged(case, kv_cache_dtype, num_splits=2)


@pytest.mark.parametrize("query_len", [7, 20])
@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_prompt_step(device, kv_cache_dtype, query_len):
    # Rows whose prompt is all new, and rows continuing a cached prefix; lengths on and off block boundaries.
    case = make_case([20, 32, 33, 48], device=device, dtype=torch.float32, group=4, query_len=query_len,
                     seed=query_len)
    run_paged(case, kv_cache_dtype)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_window_and_left_padding(device, kv_cache_dtype, mode):
    query_len = 1 if mode == "decode" else 9
    case = make_case([20, 33, 48, 64], device=device, dtype=torch.float32, group=4, query_len=query_len,
                     kv_start=[0, 3, 16, 30])
    run_paged(case, kv_cache_dtype, sliding_window=12, num_splits=2 if mode == "decode" else 1)


def run_shared(case, kv_cache_dtype, **options):
    block_size = case.key_cache.shape[1]
    tables = full_block_tables(case.row_group, case.prefix_tables, case.prefix_len, case.suffix_tables, case.seq_lens,
                               block_size)
    storage = compress(case.key_cache, case.value_cache, tables, case.seq_lens, kv_cache_dtype)
    caches = (storage.pop("key_cache"), storage.pop("value_cache"))
    out = shared_prefix_paged_attention(case.query, *caches, **case.grouping(), **options, **storage)
    features = {k: v for k, v in options.items() if k in ("sliding_window", "softcap")}
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in {**case.grouping(), **storage}.items()}
    caches = [c.cpu() for c in caches]
    truth = shared_prefix_paged_attention_reference(case.query.cpu().double(), *caches, **cpu, **features)
    low = shared_prefix_paged_attention_reference(case.query.cpu(), *caches, **cpu, **features)
    check(out, truth, low, case.query.dtype)
    return out


@pytest.mark.parametrize("splits", [(None, None), (2, 2)], ids=["merge", "split"])
@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_prefix(device, dtype, kv_cache_dtype, splits):
    sizes, prefix_blocks, own = random_grouping(seed=3, max_rows=12)
    case = make_shared_case(sizes, prefix_blocks, own, device=device, dtype=dtype, group=4, num_kv_heads=1, seed=3)
    run_shared(case, kv_cache_dtype, num_splits=splits[0], suffix_splits=splits[1])


@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_shared_prefix_window_and_left_padding(device, kv_cache_dtype):
    # Own lengths on block boundaries; left padding the same in every member of a group, into the prefix or past it.
    sizes, prefix_blocks, own = [3, 1, 2], [2, 0, 1], [1, 16, 17, 15, 32, 20]
    case = make_shared_case(sizes, prefix_blocks, own, device=device, group=2, num_kv_heads=2, shuffle=False,
                            kv_start=[5, 5, 5, 0, 16, 16])
    run_shared(case, kv_cache_dtype, sliding_window=40)


def test_compressed_arguments_are_checked(device):
    case = make_case([16, 20], device=device, dtype=torch.float16)
    storage = compress(case.key_cache, case.value_cache, case.block_tables, case.seq_lens, "int8")
    caches = (storage.pop("key_cache"), storage.pop("value_cache"))
    args = (case.query, *caches, case.block_tables, case.seq_lens)
    with pytest.raises(ValueError, match="together"):
        paged_attention(*args, scale=1.0, key_scales=storage["key_scales"])
    with pytest.raises(ValueError, match="partial_slots must be int32"):
        paged_attention(*args, scale=1.0, **dict(storage, partial_slots=storage["partial_slots"].long()))
    with pytest.raises(TypeError, match="query/key_cache/value_cache dtypes differ"):
        paged_attention(*args, scale=1.0, **dict(storage, partial_key_cache=storage["partial_key_cache"].float(),
                                                 partial_value_cache=storage["partial_value_cache"].float()))
    with pytest.raises(TypeError, match="cache dtype must be one of"):  # int8 caches without their scales
        paged_attention(*args, scale=1.0)
