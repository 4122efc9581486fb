"""Block-size arithmetic, the one rule a block size follows, and the block size `block_size="auto"` picks."""

from __future__ import annotations

__all__ = ["AUTO", "AUTO_BLOCK_SIZES", "AUTO_LONG_BLOCK_SIZE", "MAX_BLOCK_SIZE", "auto_block_size",
           "block_size_problem", "cdiv"]

MAX_BLOCK_SIZE = 256
AUTO = "auto"
# block_size="auto" (enable_paged_cache's default), for a call whose rows may share blocks (beams, samples, or more
# than one row: rows repeating a prompt share it): the first (tokens per row up to, block size) pair whose bound the
# call's max_length is within; longer rows, and a single row decoded alone, take AUTO_LONG_BLOCK_SIZE. Small blocks
# share more (a row's own blocks start at the block where it diverges, and its last block is partly empty); what they
# cost is table entries, per row and block, in the step's metadata and the PyTorch path's gathers: few at these
# lengths (<= 64 and <= 256 per row). Measured on the trained model at the PagedAttention paper's shapes (README's
# block-size table, benchmarks/block_size.py): at 16, beams at Alpaca's 19 / 58 save less than the paper's Figure 15;
# at 4 (Alpaca) and 8 (ShareGPT's 161 / 338) they save more at widths 2, 4 and 6. On the Triton kernels the size is
# at least their minimum (kernels/limits.py).
AUTO_BLOCK_SIZES = ((256, 4), (2048, 8))
AUTO_LONG_BLOCK_SIZE = 16


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints (numpy ints and arrays too)."""
    return -(-a // b)


def block_size_problem(block_size: int) -> str | None:
    """Why `block_size` (an int) is not a valid block size, or None: it must be a power of two in [1, 256]."""
    if 1 <= block_size <= MAX_BLOCK_SIZE and not block_size & (block_size - 1):
        return None
    return f"block_size={block_size} must be a power of two between 1 and {MAX_BLOCK_SIZE}"


def auto_block_size(max_length: int, *, shares_rows: bool, min_block_size: int = 1) -> int:
    """The block size `block_size="auto"` resolves to for a call whose rows hold at most `max_length` tokens
    (prompt + max_new_tokens); `shares_rows`: its rows may share blocks (beams, samples, or several rows, which may
    repeat a prompt); `min_block_size`: the kernels' minimum when they
    serve the call."""
    chosen = AUTO_LONG_BLOCK_SIZE
    if shares_rows:
        chosen = next((size for bound, size in AUTO_BLOCK_SIZES if max_length <= bound), AUTO_LONG_BLOCK_SIZE)
    return max(chosen, min_block_size)
