"""PyTorch's private fused CPU flash-attention op, which returns the log-sum-exp the shared-prefix split merges on."""

from __future__ import annotations

import torch

__all__ = ["cpu_flash_attention_with_lse"]


def cpu_flash_attention_with_lse(query, key, value, bias, scale: float):
    """(out [B, H, q, D], lse [B, H, q]) of softmax attention on CPU; `bias` additive float [.., q, k] or None.
    A query whose keys are all masked gets lse = 0 (callers fix that up)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=bias, scale=scale
    )
    return out, lse
