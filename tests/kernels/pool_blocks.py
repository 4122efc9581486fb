"""Writing test data into the `large_pools` fixture's pools."""

import torch


def fill_top_blocks(pools, count: int) -> torch.Tensor:
    """Random K and V in the last `count` blocks of `large_pools`; returns their ids (the only blocks a test may read)."""
    key_cache, value_cache = pools
    num_blocks, block_size, _, head_dim = key_cache.shape
    top = torch.arange(num_blocks - count, num_blocks)
    key_cache[top] = torch.randn(count, block_size, 1, head_dim).half()
    value_cache[top] = torch.randn(count, block_size, 1, head_dim).half()
    return top
