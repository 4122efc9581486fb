"""SDPA for a decode step with the query heads of each KV head packed as that head's queries.

For a GQA decode step without a mask, transformers' SDPA function calls `scaled_dot_product_attention(enable_gqa=True)`,
which PyTorch's CPU kernels serve in about twice the time of the same attention with the query heads that share a KV
head stacked as its queries (what transformers itself does when a mask is given: `pack_gqa`). The two differ only in
rounding (~1e-7 in fp32, as the shared-prefix split does); in fp16 / bf16, where that rounding moves sampled tokens,
stock's call is kept.
"""

from __future__ import annotations

import torch

__all__ = ["packed_decode_attention", "packs_gqa"]

_HALF = (torch.float16, torch.bfloat16)


def packs_gqa(module, query: torch.Tensor, attention_mask, dropout: float, kwargs: dict) -> bool:
    """Whether `packed_decode_attention` serves this SDPA call: one query per row, grouped query heads, no mask,
    dropout or extras, fp32 on CPU."""
    return (query.shape[2] == 1 and attention_mask is None and not dropout and getattr(module, "num_key_value_groups", 1)
            > 1 and query.device.type == "cpu" and query.dtype not in _HALF and kwargs.get("s_aux") is None
            and kwargs.get("softcap") is None)


def packed_decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling):
    """query [rows, heads, 1, head_dim], key / value [rows, kv_heads, seq_len, head_dim] -> (out [rows, 1, heads,
    head_dim], None), as transformers' SDPA function returns it."""
    rows, heads, _, head_dim = query.shape
    packed = query.reshape(rows, key.shape[1], heads // key.shape[1], head_dim)  # [rows, kv_heads, groups, head_dim]
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, scale=scaling)
    return out.reshape(rows, 1, heads, head_dim), None
