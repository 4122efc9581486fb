"""When a generate() call pays to page: the call rule, from measurements.

Paging saves the repeated prompt forward and stock's cache copies: work that grows with the prompt tokens the rows
share (`shared_tokens`: rows x prompt length - the rows the prompt forward computes x prompt length) and with the
model's width. It costs per-step bookkeeping and per-layer glue that grow with the tokens generated and not with the
width. A call sharing too little for its length runs on stock's own cache (`DynamicCache`, stock's attention): the
same tokens, stock's time. A call asking for what only the paged cache does (a memory cap, compressed blocks) is always
paged, and `enable_paged_cache(model, min_shared_tokens=0)` pages every call.
"""

from __future__ import annotations

__all__ = ["REFERENCE_HIDDEN_SIZE", "SHARED_TOKENS_PER_NEW_TOKEN", "paging_pays"]

# Prompt tokens a call must share per token it generates, on a model of hidden size REFERENCE_HIDDEN_SIZE, for the
# paged path to be at least as fast as stock: the crossover `python benchmarks/speed.py --sweep 4-layer` measured on
# the 4-layer benchmark model (hidden 256), where the fixed per-step costs weigh most. The work paging saves per shared
# token grows as hidden_size^2 while its per-step costs do not, so wider models need proportionally fewer shared
# tokens (`benchmarks/speed.py --sweep 100M` checks the scaling at hidden 768).
SHARED_TOKENS_PER_NEW_TOKEN = 4
REFERENCE_HIDDEN_SIZE = 256


def paging_pays(shared_tokens: int, new_tokens: int, hidden_size: int, min_shared_tokens: int | None = None) -> bool:
    """Whether a call sharing `shared_tokens` prompt tokens across its rows and generating up to `new_tokens` tokens
    runs on the paged cache. `min_shared_tokens` (enable_paged_cache's setting) replaces the measured rule: 0 pages
    every call."""
    if min_shared_tokens is not None:
        return shared_tokens >= min_shared_tokens
    return shared_tokens * hidden_size**2 >= SHARED_TOKENS_PER_NEW_TOKEN * new_tokens * REFERENCE_HIDDEN_SIZE**2
