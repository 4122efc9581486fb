"""Differences between the transformers releases we support (see pyproject.toml for the range)."""

from __future__ import annotations

import transformers
from packaging.version import Version

__all__ = ["CACHE_KWARG", "TRANSFORMERS_VERSION"]

TRANSFORMERS_VERSION = Version(transformers.__version__)

# 5.24 renamed `past_key_values` to `cache` in generate's model_kwargs and every model forward.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"
