"""Block-size arithmetic, and the one rule a block size follows."""

from __future__ import annotations

__all__ = ["MAX_BLOCK_SIZE", "block_size_problem", "cdiv"]

MAX_BLOCK_SIZE = 256


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints (numpy ints and arrays too)."""
    return -(-a // b)


def block_size_problem(block_size: int) -> str | None:
    """Why `block_size` (an int) is not a valid block size, or None: it must be a power of two in [1, 256]."""
    if 1 <= block_size <= MAX_BLOCK_SIZE and not block_size & (block_size - 1):
        return None
    return f"block_size={block_size} must be a power of two between 1 and {MAX_BLOCK_SIZE} (16 is the default)"
