"""`enable_paged_cache(max_cache_bytes=B)`: what a block of the model costs, for the byte cap of each call."""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import ByteCap
from .quantize import storage_dtype

__all__ = ["CacheBudget"]

_SCALE_BYTES = 4  # fp32, one per (block, KV head), for K and for V


@dataclass(frozen=True)
class CacheBudget:
    """What the blocks of a model cost, to cap each call's blocks at `max_cache_bytes` (a `ByteCap`).

    The bytes capped are those `cache_stats().peak_kv_bytes` counts: the blocks in use, summed over layers. In the
    model's dtype a block costs `block_size` tokens of K/V. With `kv_cache_dtype` "int8" / "fp8", a full block costs
    its compressed K/V and their scales, and a partially filled block (each row's last, at most) its tokens in the
    model's dtype. The cap is checked before every allocation, with the blocks the step leaves partial.

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

    def cap(self, block_size: int) -> ByteCap:
        """The cap of a call's allocator in blocks of `block_size` tokens."""
        return ByteCap(self.max_cache_bytes, *self.block_bytes(block_size))
