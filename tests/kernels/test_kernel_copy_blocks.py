"""copy_blocks (Triton) must equal copy_blocks_reference bit for bit."""

import pytest
import torch

from paged_generate.kernels import copy_blocks, copy_blocks_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 64), (8, 1, 80), (32, 4, 128)])
def test_copy_blocks_matches_reference(device, dtype, block_size, num_kv_heads, head_dim):
    torch.manual_seed(0)
    num_blocks = 10
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype).to(device)
    value_cache = torch.randn_like(key_cache)
    perm = torch.randperm(num_blocks)
    src, dst = perm[:3].to(device), perm[3:6].to(device)  # disjoint, as copy-on-write produces
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    copy_blocks_reference(expected_k, expected_v, src, dst)
    copy_blocks(key_cache, value_cache, src, dst)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    # The sources themselves are untouched and the copies are real.
    assert torch.equal(key_cache[dst], key_cache[src]) and torch.equal(value_cache[dst], value_cache[src])


def test_copy_blocks_one_source_to_many_and_empty(device):
    key_cache = torch.randn(5, 16, 1, 64, device=device)
    value_cache = torch.randn_like(key_cache)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    src, dst = torch.tensor([2, 2], device=device), torch.tensor([0, 4], device=device)
    copy_blocks_reference(expected_k, expected_v, src, dst)
    copy_blocks(key_cache, value_cache, src, dst)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    copy_blocks(key_cache, value_cache, empty, empty)
    assert torch.equal(key_cache, expected_k)


def test_copy_blocks_rejects_bad_inputs(device):
    key_cache = torch.randn(5, 16, 1, 64, device=device)
    ids = torch.tensor([0], device=device)
    with pytest.raises(ValueError):
        copy_blocks(key_cache, key_cache.clone(), ids.int(), ids.int())
    with pytest.raises(ValueError):
        copy_blocks(key_cache[:, ::2], key_cache[:, ::2], ids, ids)


def test_copy_blocks_int64_offsets_large_pool(device):
    """Block ids whose element offsets exceed 2**31; only touched pages are ever allocated."""
    if device.type == "cuda":
        pytest.skip("would really allocate 8 GiB on the GPU")
    num_blocks = 2**31 // (16 * 64) + 64
    key_cache = torch.empty(num_blocks, 16, 1, 64, dtype=torch.float16)
    value_cache = torch.empty_like(key_cache)
    src, dst = torch.tensor([num_blocks - 1, 0]), torch.tensor([num_blocks - 50, num_blocks - 2])
    key_cache[src] = torch.randn(2, 16, 1, 64).half()
    value_cache[src] = torch.randn(2, 16, 1, 64).half()
    copy_blocks(key_cache, value_cache, src, dst)
    assert torch.equal(key_cache[dst], key_cache[src]) and torch.equal(value_cache[dst], value_cache[src])
