"""paged-generate: vLLM-style paged KV cache sharing for Hugging Face `model.generate()`.

>>> from paged_generate import enable_paged_cache, cache_stats
>>> enable_paged_cache(model)
>>> model.generate(ids, num_beams=8, max_new_tokens=128)
>>> cache_stats(model).saving

Map of the package (each layer imports only from the ones above it):

- blocks/       where blocks are allocated and shared: allocator (ids, reference counts), tables (fork, append with
                copy-on-write, select, crop), groups (rows sharing a prefix), partial (the slots of blocks still being
                filled, when full blocks are stored compressed), prefix (a pool's cached prompt blocks by their
                tokens), pooled (a pool's block ids for one model). numpy only.
- step.py       where one forward's metadata is built, once for every layer: tables, slot mapping, copies, groups,
                uploaded per device on first use; for compressed storage, the blocks a step completes and the
                dequantized view attention reads. layout.py: rows read in place as strided views, or gathered.
- cache.py      `PagedCache` / `PagedLayer`: the pools and writes. read.py: the `PagedRead` a layer hands attention.
                quantize.py / compressed.py: `kv_cache_dtype="int8" | "fp8"`, full blocks quantized once when they
                fill, partial blocks in the model's dtype.
- pool.py       `KVPool`: blocks kept across calls and shared by models under one budget, prompts' blocks cached and
                reused (prefix caching); pooled_cache.py: `PooledCache`, a call's cache whose blocks are the pool's.
- attention/    where attention picks its path (dispatch.py): stock's function (stock.py), the Triton kernels, or the
                PyTorch shared-prefix split (shared_prefix.py).
- kernels/      Triton kernels and their PyTorch references; import nothing else of this package.
- patches/      the only place that touches transformers' (and torch's) private internals, each guarded by
                tests/test_seams.py; patches/generate.py overrides generate()'s cache creation and prefill.
- enable.py     the public switch, taking the model or any wrapper of it (PEFT, torch.compile); capture.py watches
                calls; budget.py turns max_cache_bytes into each call's byte cap (blocks/allocator.py's ByteCap);
                stats.py, errors.py, backend.py are leaves.
"""

from .blocks import BlockAllocator, BlockTables
from .cache import PagedCache
from .capture import CapturedCalls, StepRecord, capture_caches
from .enable import cache_stats, disable_paged_cache, enable_paged_cache, is_paged_cache_enabled
from .errors import OutOfBlocksError, UnsupportedModelError
from .patches.attention_impl import ATTENTION_NAME
from .pool import KVPool, PoolStats
from .stats import CacheStats

__all__ = [
    "ATTENTION_NAME",
    "BlockAllocator",
    "BlockTables",
    "CacheStats",
    "CapturedCalls",
    "KVPool",
    "OutOfBlocksError",
    "PagedCache",
    "PoolStats",
    "StepRecord",
    "UnsupportedModelError",
    "cache_stats",
    "capture_caches",
    "disable_paged_cache",
    "enable_paged_cache",
    "is_paged_cache_enabled",
]

__version__ = "0.1.0"
