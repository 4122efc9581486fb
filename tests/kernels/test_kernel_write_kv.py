"""write_kv (Triton) must equal write_kv_reference bit for bit."""

import pytest
import torch

from paged_generate.kernels import write_kv, write_kv_reference


def _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype).to(device)
    return key_cache, torch.randn_like(key_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (8, 80), (32, 128)])
def test_write_kv_matches_reference(device, dtype, block_size, head_dim):
    torch.manual_seed(0)
    num_blocks, num_kv_heads, num_tokens = 6, 2, 11
    key_cache, value_cache = _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    # Distinct random slots; a few tokens are padding (-1) and must leave the cache untouched.
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1
    slots = slots.to(device)
    key = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(device)
    value = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(device)

    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    write_kv_reference(key, value, expected_k, expected_v, slots)
    write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k)
    assert torch.equal(value_cache, expected_v)


def test_write_kv_non_contiguous_inputs(device):
    # transformers' key_states are [batch, heads, q_len, dim]; the glue may pass a transposed view.
    torch.manual_seed(1)
    key_cache, value_cache = _pool(4, 16, 2, 64, torch.float16, device)
    key = torch.randn(3, 2, 5, 64).half().to(device).transpose(1, 2).reshape(15, 2, 64)[::2]  # [8, 2, 64] view
    value = torch.randn(2, 8, 128).half().to(device)[..., :64].transpose(0, 1)  # [8, 2, 64], strided
    slots = torch.tensor([0, 1, 2, 17, 18, -1, 63, 40], device=device)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    write_kv_reference(key, value, expected_k, expected_v, slots)
    write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


def test_write_kv_all_padding_and_empty(device):
    key_cache, value_cache = _pool(2, 16, 1, 64, torch.float32, device)
    before = key_cache.clone()
    kv = torch.randn(3, 1, 64, device=device)
    write_kv(kv, kv, key_cache, value_cache, torch.full((3,), -1, dtype=torch.int64, device=device))
    write_kv(kv[:0], kv[:0], key_cache, value_cache, torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(key_cache, before)


def test_write_kv_rejects_bad_inputs(device):
    key_cache, value_cache = _pool(2, 16, 1, 64, torch.float16, device)
    kv = torch.randn(3, 1, 64, device=device).half()
    slots = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError):
        write_kv(kv, kv, key_cache, value_cache, slots.int())
    with pytest.raises(TypeError):
        write_kv(kv.float(), kv.float(), key_cache, value_cache, slots)
    with pytest.raises(ValueError):
        write_kv(kv, kv, key_cache[..., :32], value_cache[..., :32], slots)


def test_write_kv_int64_offsets_large_pool(device, large_pools):
    """Slots past 2**31 elements: only the touched pages of the 4 GiB pools are ever allocated."""
    key_cache, value_cache = large_pools
    num_blocks, block_size, _, head_dim = key_cache.shape
    slots = torch.tensor([num_blocks * block_size - 1, (num_blocks - 40) * block_size + 3, -1])
    key, value = torch.randn(3, 1, head_dim).half(), torch.randn(3, 1, head_dim).half()
    write_kv(key, value, key_cache, value_cache, slots)
    flat_k, flat_v = key_cache.view(-1, 1, head_dim), value_cache.view(-1, 1, head_dim)
    assert torch.equal(flat_k[slots[:2]], key[:2]) and torch.equal(flat_v[slots[:2]], value[:2])
