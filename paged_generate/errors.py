"""The plugin's own exception types."""

__all__ = ["OutOfBlocksError", "UnsupportedModelError"]


class OutOfBlocksError(MemoryError):
    """A `generate()` call needed more KV blocks than the cap set with `enable_paged_cache(max_blocks=...)`.

    The call's blocks are freed before this is raised: the model stays usable.
    """

    def __init__(self, *, needed: int, in_use: int, max_blocks: int, block_size: int):
        self.needed = needed
        self.in_use = in_use
        self.max_blocks = max_blocks
        self.block_size = block_size
        super().__init__(
            f"The paged KV cache needs {in_use + needed} blocks of {block_size} tokens ({in_use} in use, {needed} more "
            f"for this step), but max_blocks={max_blocks}. Raise the cap with "
            f"`enable_paged_cache(model, max_blocks=...)` (or `max_cache_bytes=...`), or ask for fewer beams, samples "
            f"or new tokens."
        )


class UnsupportedModelError(ValueError):
    """The model cannot run on the paged cache; raised by `enable_paged_cache` before anything is changed."""
