"""Run the same generate() call stock and paged, and compare."""

from __future__ import annotations

import torch

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache


def generate_both(model, seed: int = 0, **kwargs):
    """(stock output, paged output, paged CacheStats) of `model.generate(**kwargs)`; leaves the model stock."""
    disable_paged_cache(model)
    torch.manual_seed(seed)
    stock = model.generate(**kwargs)
    enable_paged_cache(model)
    try:
        torch.manual_seed(seed)
        paged = model.generate(**kwargs)
        stats = cache_stats(model)
    finally:
        disable_paged_cache(model)
    return stock, paged, stats


def sequences(output):
    return output if isinstance(output, torch.Tensor) else output.sequences


def assert_all_blocks_free(model_state_cache) -> None:
    allocator = model_state_cache.allocator
    assert allocator.num_used == 0, f"{allocator.num_used} blocks still in use"
