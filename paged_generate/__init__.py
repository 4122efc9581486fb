"""paged-generate: vLLM-style paged KV cache sharing for Hugging Face `model.generate()`.

>>> from paged_generate import enable_paged_cache, cache_stats
>>> enable_paged_cache(model)
>>> model.generate(ids, num_beams=8, max_new_tokens=128)
>>> cache_stats(model).saving
"""

from .allocator import BlockAllocator
from .attention import ATTENTION_NAME
from .block_tables import BlockTables
from .cache import PagedCache
from .enable import cache_stats, disable_paged_cache, enable_paged_cache, is_paged_cache_enabled
from .errors import OutOfBlocksError, UnsupportedModelError
from .stats import CacheStats

__all__ = [
    "ATTENTION_NAME",
    "BlockAllocator",
    "BlockTables",
    "CacheStats",
    "OutOfBlocksError",
    "PagedCache",
    "UnsupportedModelError",
    "cache_stats",
    "disable_paged_cache",
    "enable_paged_cache",
    "is_paged_cache_enabled",
]

__version__ = "0.1.0"
