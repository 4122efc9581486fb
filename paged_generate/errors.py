"""The plugin's own exception types."""

__all__ = ["OutOfBlocksError", "UnsupportedModelError"]


class OutOfBlocksError(MemoryError):
    """A `generate()` call needed more KV blocks than the cap set with `enable_paged_cache(max_blocks=...)`, more
    bytes of K/V than `max_cache_bytes` (then `max_cache_bytes` and `needed_bytes` are set, else None), or more than
    its `KVPool`'s budget leaves when nothing cached can be evicted (then `budget_bytes` is set).

    The call's blocks are freed before this is raised: the model stays usable.
    """

    def __init__(self, *, needed: int, in_use: int, max_blocks: int, block_size: int,
                 max_cache_bytes: int | None = None, needed_bytes: int | None = None, budget_bytes: int | None = None):
        self.needed = needed
        self.in_use = in_use
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.max_cache_bytes = max_cache_bytes
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        if budget_bytes is not None:  # a KVPool's budget, shared by calls and models
            super().__init__(
                f"The KV pool needs {needed} more blocks of {block_size} tokens for this step, but its budget "
                f"max_cache_bytes={budget_bytes} ({max_blocks} blocks of this model) is taken by blocks that running "
                f"calls (or caches returned to callers) hold, and no cached block is left to evict. Give the pool "
                f"more room (`KVPool(max_cache_bytes=...)`), run fewer calls on it at once, or ask for fewer beams, "
                f"samples or new tokens."
            )
            return
        blocks = f"{in_use + needed} blocks of {block_size} tokens ({in_use} in use, {needed} more for this step)"
        if max_cache_bytes is not None:
            what = f"needs {needed_bytes} bytes of K/V, {blocks}, but max_cache_bytes={max_cache_bytes}"
            cap = "`enable_paged_cache(model, max_cache_bytes=...)`"
        else:
            what, cap = f"needs {blocks}, but max_blocks={max_blocks}", "`enable_paged_cache(model, max_blocks=...)`"
        super().__init__(
            f"The paged KV cache {what}. Raise the cap with {cap}, store full blocks compressed "
            f"(`kv_cache_dtype='int8'`), or ask for fewer beams, samples or new tokens."
        )


class UnsupportedModelError(ValueError):
    """The model cannot run on the paged cache; raised by `enable_paged_cache` before anything is changed."""
