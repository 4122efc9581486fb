"""Attention over the paged cache: the functions registered with transformers (`dispatch.py`), stock's attention where
only it reproduces stock (`stock.py`), and the PyTorch shared-prefix split (`shared_prefix.py`)."""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..patches.attention_impl import ATTENTION_NAME, ATTENTION_NAME_EAGER
from . import dispatch
from .dispatch import paged_attention

__all__ = ["ATTENTION_NAME", "ATTENTION_NAME_EAGER", "paged_attention", "register_attention"]


def register_attention() -> None:
    """Make both names known to transformers, each with the boolean SDPA mask (idempotent: the functions hold no
    state)."""
    AttentionInterface.register(ATTENTION_NAME, dispatch.paged_attention_forward)
    AttentionInterface.register(ATTENTION_NAME_EAGER, dispatch.paged_attention_forward_eager)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    AttentionMaskInterface.register(ATTENTION_NAME_EAGER, sdpa_mask)
