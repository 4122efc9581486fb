"""Memory figures of one generate() call."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["CacheStats", "stock_cache_stats"]


@dataclass(frozen=True)
class CacheStats:
    """What the paged cache of one `generate()` call used, next to what the stock contiguous cache would hold.

    peak_kv_bytes: bytes of the blocks in use at the peak, summed over layers. With a compressed `kv_cache_dtype`,
        what they really held: full blocks compressed with their scales, partial blocks in the model's dtype.
    pool_bytes: bytes the pools reserved (their largest size during the call; compressed: a compressed block for every
        block id, and the side pool of partial blocks).
    dense_kv_bytes: rows x longest length x bytes per token (in the model's dtype) summed over layers: the stock cache
        at its peak.
    saving: 1 - peak_kv_bytes / dense_kv_bytes: against stock, sharing and compression together.
    prefill_rows: rows the prompt forward ran on: the distinct prompts, when prefill-once applied (the beams /
        samples of a prompt, and rows repeating a prompt, share its computation), else every row.
    kv_cache_dtype: "auto" (the model's dtype), "int8" or "fp8": how full blocks were stored.
    paged: False where the call ran on stock's own cache, its rows sharing too few prompt tokens for paging to pay
        (see `enable_paged_cache`'s `min_shared_tokens`): the figures are then stock's cache's, saving 0.
    """

    block_size: int
    peak_blocks: int
    peak_kv_bytes: int
    pool_bytes: int
    dense_kv_bytes: int
    rows: int
    max_seq_len: int
    prefill_rows: int | None = None
    kv_cache_dtype: str = "auto"
    paged: bool = True

    @property
    def saving(self) -> float:
        return 1.0 - self.peak_kv_bytes / self.dense_kv_bytes if self.dense_kv_bytes else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "saving": self.saving}


def stock_cache_stats(cache, block_size: int) -> CacheStats:
    """The figures of a call that ran on stock's cache (a transformers `Cache`, as the call left it: its peak)."""
    layers = [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None]
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    rows = layers[0].keys.shape[0] if layers else 0
    return CacheStats(block_size=block_size, peak_blocks=0, peak_kv_bytes=kv_bytes, pool_bytes=0,
                      dense_kv_bytes=kv_bytes, rows=rows, max_seq_len=cache.get_seq_length() if layers else 0,
                      prefill_rows=rows, paged=False)
