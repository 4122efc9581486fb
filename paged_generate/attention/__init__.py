"""Attention over the paged cache: the functions registered with transformers (`dispatch.py`), stock's attention where
only it reproduces stock (`stock.py`), and the PyTorch shared-prefix split (`shared_prefix.py`)."""

import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..patches.attention_impl import ATTENTION_NAME, ATTENTION_NAME_EAGER
from ..patches.mask_functions import causal_window
from ..step import MaskPattern, mark_mask
from . import dispatch
from .dispatch import paged_attention

__all__ = ["ATTENTION_NAME", "ATTENTION_NAME_EAGER", "paged_attention", "paged_mask", "register_attention"]

_SDPA_MASK_PARAMETERS = inspect.signature(sdpa_mask)


def paged_mask(*args, **kwargs):
    """Stock's boolean SDPA mask, marked with what it holds when the kernels can apply it (see `step.MaskPattern`):
    decided from how transformers built it, so no device sync."""
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor):
        arguments = _SDPA_MASK_PARAMETERS.bind(*args, **kwargs).arguments
        expressible, window = causal_window(arguments.get("mask_function", causal_mask_function))
        q_offset = arguments.get("q_offset", 0)
        if expressible and isinstance(q_offset, int):
            mark_mask(mask, MaskPattern(window=window, q_offset=q_offset, kv_offset=arguments.get("kv_offset", 0),
                                        kv_length=arguments["kv_length"]))
    return mask


def register_attention() -> None:
    """Make both names known to transformers, each with the boolean SDPA mask (idempotent: the functions hold no
    state)."""
    AttentionInterface.register(ATTENTION_NAME, dispatch.paged_attention_forward)
    AttentionInterface.register(ATTENTION_NAME_EAGER, dispatch.paged_attention_forward_eager)
    AttentionMaskInterface.register(ATTENTION_NAME, paged_mask)
    AttentionMaskInterface.register(ATTENTION_NAME_EAGER, paged_mask)
