"""Differences between the transformers releases we support (see pyproject.toml for the range)."""

from __future__ import annotations

import transformers
from packaging.version import Version

__all__ = ["CACHE_KWARG", "TRANSFORMERS_VERSION", "length_after_crop"]

TRANSFORMERS_VERSION = Version(transformers.__version__)

# 5.24 renamed `past_key_values` to `cache` in generate's model_kwargs and every model forward.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"


def length_after_crop(argument, seq_len: int) -> int:
    """The length `Cache.crop(argument)` leaves: `crop(-n)` drops the last n tokens; a positive argument is the
    length to keep (the older convention 5.17's assisted decoding still uses, passing a 0-d tensor)."""
    argument = int(argument)
    return max(argument if argument > 0 else seq_len + argument, 0)
