"""The plugin's own exception types."""

__all__ = ["OutOfBlocksError", "UnsupportedModelError"]


class OutOfBlocksError(MemoryError):
    """A `generate()` call needed more KV blocks than the cap set with `enable_paged_cache(max_blocks=...)`, or than
    its `KVPool`'s budget leaves when nothing cached can be evicted.

    The call's blocks are freed before this is raised: the model stays usable.
    """

    def __init__(self, *, needed: int, in_use: int, max_blocks: int, block_size: int,
                 budget_bytes: int | None = None):
        self.needed = needed
        self.in_use = in_use
        self.max_blocks = max_blocks
        self.block_size = block_size
        if budget_bytes is not None:  # a KVPool's budget, shared by calls and models
            message = (
                f"The KV pool needs {needed} more blocks of {block_size} tokens for this step, but its budget "
                f"max_cache_bytes={budget_bytes} ({max_blocks} blocks of this model) is taken by blocks that running "
                f"calls (or caches returned to callers) hold, and no cached block is left to evict. Give the pool "
                f"more room (`KVPool(max_cache_bytes=...)`), run fewer calls on it at once, or ask for fewer beams, "
                f"samples or new tokens."
            )
        else:
            message = (
                f"The paged KV cache needs {in_use + needed} blocks of {block_size} tokens ({in_use} in use, {needed} "
                f"more for this step), but max_blocks={max_blocks}. Raise the cap with "
                f"`enable_paged_cache(model, max_blocks=...)` (or `max_cache_bytes=...`), or ask for fewer beams, "
                f"samples or new tokens."
            )
        super().__init__(message)


class UnsupportedModelError(ValueError):
    """The model cannot run on the paged cache; raised by `enable_paged_cache` before anything is changed."""
