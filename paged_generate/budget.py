"""`enable_paged_cache(max_cache_bytes=B)` as a cap on the blocks of one call, for that call's block size and rows."""

from __future__ import annotations

from dataclasses import dataclass

from .quantize import storage_dtype

__all__ = ["CacheBudget"]

_SCALE_BYTES = 4  # fp32, one per (block, KV head), for K and for V


@dataclass(frozen=True)
class CacheBudget:
    """What the blocks of a model cost, to turn `max_cache_bytes` into the `max_blocks` of each call's cache.

    The bytes capped are those `cache_stats().peak_kv_bytes` counts: the blocks in use, summed over layers. In the
    model's dtype a block costs `block_size` tokens of K/V. With `kv_cache_dtype` "int8" / "fp8", a full block costs
    its compressed K/V and their scales, and each row's partially filled last block its tokens in the model's dtype
    (at most one per row): so `max_blocks` = (B - rows x (partial - full)) // full keeps full x (blocks - partial) +
    partial x partial-blocks <= B at every step.

    elements_per_token: K and V elements of one token over all layers (this process's KV heads).
    element_bytes: bytes of one element in the model's dtype.
    kv_heads: KV heads summed over layers (a compressed block has a K and a V scale per head).
    """

    max_cache_bytes: int
    elements_per_token: int
    element_bytes: int
    kv_heads: int
    kv_cache_dtype: str = "auto"

    def block_bytes(self, block_size: int) -> tuple[int, int]:
        """(a full block, a partial block) in bytes over all layers."""
        partial = block_size * self.elements_per_token * self.element_bytes
        stored = storage_dtype(self.kv_cache_dtype)
        if stored is None:
            return partial, partial
        full = block_size * self.elements_per_token * stored.itemsize + 2 * self.kv_heads * _SCALE_BYTES
        return full, partial

    def max_blocks(self, block_size: int, rows: int) -> int:
        """Blocks a call of `rows` rows (beams / samples included) may hold within `max_cache_bytes`."""
        full, partial = self.block_bytes(block_size)
        return max((self.max_cache_bytes - rows * (partial - full)) // full, 0)
