"""The attention stock transformers would run for a model, used where the paged path has no faster equivalent.

`enable_paged_cache` switches a model to one of two registered names, chosen from the implementation the model had:
`ATTENTION_NAME` ("paged_generate") when it had SDPA (or anything but eager), `ATTENTION_NAME_EAGER`
("paged_generate_eager") when it had eager attention (Gemma 2 on transformers >= 5.18, or a model loaded with
`attn_implementation="eager"`). Each name's function passes `stock_attention` the implementation ("sdpa" or
"eager") stock would have run on the same K/V:

- SDPA: transformers' `sdpa_attention_forward`, as stock.
- eager: the model family's own `eager_attention_forward` (softcapping, attention sinks, dropout and the returned
  attention weights included), with the boolean / absent mask turned into the additive float mask stock builds for it.

Forwards without a paged cache always go here. Paged forwards come here with every row's K/V read from the pool: for
what the faster paths don't reproduce (`needs_stock_attention`), and whenever no faster path applies, after
`cut_to_stock_window`, which hands the stock function exactly the K/V stock's `DynamicCache` would:
a sliding-window layer there keeps only the last `sliding_window - 1` tokens, so the same slice of the rows (and of
the mask) is taken. Mathematically that changes nothing (the mask hides the older tokens); it makes the sums run over
the same operands in the same order, so the result is bit-identical to stock, which half-precision sampling needs.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..patches.layer_windows import stock_cache_window
from ..patches.model_checks import family_eager

__all__ = ["needs_stock_attention", "split_rounds_apart", "stock_attention", "cut_to_stock_window", "stock_cache_window", "weights_wanted"]

# Set by the generate patch for a call with `output_attentions=True`: the paged forwards then return the weights the
# stock implementation returns (eager: the weights; SDPA: none), which only the stock path computes.
weights_wanted: ContextVar[bool] = ContextVar("paged_generate_weights_wanted", default=False)

_HALF = (torch.float16, torch.bfloat16)


def needs_stock_attention(implementation: str, kwargs: dict) -> bool:
    """Whether a paged forward must run the stock implementation ("sdpa" or "eager") on the rows' K/V to give stock's
    results."""
    if implementation == "eager":
        return weights_wanted.get()  # only eager returns attention weights, and the faster paths compute none
    # Stock SDPA ignores (transformers < 5.18) or refuses (>= 5.18) a softcap; the Triton kernel would apply it.
    return kwargs.get("softcap") is not None


def split_rounds_apart(query: torch.Tensor) -> bool:
    """Whether the PyTorch shared-prefix split would move the logits noticeably from stock's: its two partial
    softmaxes round differently from stock's single one, harmless in fp32 (~1e-6), but in fp16 / bf16 on CPU the
    logits move by ~0.1 and sampled tokens change (stock's function on the rows is bit-identical there)."""
    return query.device.type == "cpu" and query.dtype in _HALF


def cut_to_stock_window(query, key, value, attention_mask, window: int | None):
    """Every row's K/V [rows, kv_heads, seq_len, head_dim] (and the mask) cut to what stock's cache would hand the
    layer (see the module docstring): `window` is the sliding window stock's cache keeps for the layer
    (`stock_cache_window`), None for the whole history."""
    seq_len, query_len = key.shape[2], query.shape[2]
    if window is not None:
        keep = min(seq_len - query_len, window - 1) + query_len
        if keep < seq_len:
            key, value = key[:, :, seq_len - keep :], value[:, :, seq_len - keep :]
            if attention_mask is not None:
                attention_mask = attention_mask[..., attention_mask.shape[-1] - keep :]
    return key, value, attention_mask


def stock_attention(implementation: str, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    **kwargs):
    """Stock attention ("sdpa" or "eager") for `module` on ordinary K/V [rows, kv_heads, seq, head_dim];
    `attention_mask` is sdpa_mask's."""
    if implementation == "sdpa":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    eager = family_eager(type(module))
    if eager is None:
        raise NotImplementedError(
            f"paged-generate: {type(module).__name__} runs eager attention but its modeling module has no "
            f"`eager_attention_forward` to reproduce it. Disable the plugin for this model (`disable_paged_cache`) or "
            f"load it with attn_implementation='sdpa'."
        )
    mask = _additive_mask(attention_mask, query, key, getattr(module, "is_causal", True))
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _additive_mask(mask, query: torch.Tensor, key: torch.Tensor, is_causal: bool):
    """sdpa_mask's boolean mask (True = attend) or None -> the float mask `eager_mask` builds: 0 / dtype's minimum.

    sdpa_mask returns None only where the pattern is plain causal without padding (or nothing is masked), which
    SDPA then applies through `is_causal`; eager needs it spelled out.
    """
    min_value = torch.finfo(query.dtype).min
    if mask is None:
        query_len, kv_len = query.shape[2], key.shape[2]
        if not is_causal or query_len == 1:
            return None
        positions = torch.arange(kv_len, device=query.device)
        mask = positions[None, :] <= positions[kv_len - query_len :, None]
        mask = mask[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.tensor(0.0, dtype=query.dtype, device=mask.device)
    return torch.where(mask, zero, min_value)
