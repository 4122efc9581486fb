"""What a model's class says about how it attends and caches: private flags and its modeling module's source."""

from __future__ import annotations

import inspect
import sys

__all__ = ["family_eager", "keeps_recurrent_state", "uses_attention_registry"]


def keeps_recurrent_state(model) -> bool:
    """Whether the model keeps a cache of its own instead of `DynamicCache` (state-space / recurrent layers)."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    return supports is not None and not supports()


def uses_attention_registry(cls) -> bool:
    """Whether the model's attention layers call the function registered for its attention implementation.

    `_supports_attention_backend` says so; some families (StableLM) use the registry without setting that flag, so
    the modeling source is read as transformers' own `_can_set_attn_implementation` does, but a module without any
    registry call is not given the benefit of the doubt.
    """
    if getattr(cls, "_supports_attention_backend", False):
        return True
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in source


def family_eager(cls):
    """The `eager_attention_forward` of the modeling file defining `cls` (what stock's registry lookup falls back to
    for "eager"), or None."""
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
