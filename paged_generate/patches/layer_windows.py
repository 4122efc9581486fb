"""The sliding window stock's `DynamicCache` keeps per decoder layer, from `get_layer_types_and_kwargs`, whose return
value changed shape in transformers 5.18."""

from __future__ import annotations

import weakref

from transformers.cache_utils import get_layer_types_and_kwargs

__all__ = ["stock_cache_window", "stock_cache_windows"]


def stock_cache_windows(config) -> list[int | None]:
    """Per decoder layer of `config`: the window stock's `DynamicCache` keeps for it (None: the whole history)."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    windows = []
    for layer_idx, layer_type in enumerate(layer_types):
        # transformers >= 5.18 gives kwargs per layer, earlier releases one dict for all layers
        kwargs = layer_kwargs[layer_idx] if isinstance(layer_kwargs, list) else layer_kwargs
        windows.append(kwargs.get("sliding_window") if layer_type == "sliding_attention" else None)
    return windows


_by_module: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stock_cache_window(module) -> int | None:
    """The window stock's cache keeps for this attention module's layer (None: the whole history); read once per
    module (configs are not hashable)."""
    try:
        return _by_module[module]
    except KeyError:
        pass
    window = None
    config, layer_idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if config is not None and isinstance(layer_idx, int):
        windows = stock_cache_windows(config)
        window = windows[layer_idx] if layer_idx < len(windows) else None
    _by_module[module] = window
    return window
