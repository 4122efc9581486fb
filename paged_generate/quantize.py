"""Compressed KV storage: int8 and fp8 (e4m3) blocks with one scale per block and KV head, K and V apart.

A block is quantized once, when it is full (full blocks never change again), from its tokens in the model's dtype:

    scale[b, h] = max |x[b, :, h, :]| / QMAX          (fp32; QMAX = 127 for int8, 448 for fp8 e4m3)
    q[b, t, h, d] = round(x[b, t, h, d] / scale[b, h])  (int8: round to nearest, clamped to +-127; fp8: the cast)
    x'[b, t, h, d] = q[b, t, h, d] * scale[b, h]        (computed in fp32, then cast to the model's dtype)

The Triton kernels dequantize the same way in registers (kernels/tiles.py); `dequantize_blocks` is what the PyTorch
path and the references use. A scale per (block, KV head) rather than KIVI's per-channel keys: at 8 bits, on the
embedded model's held-out code, it measures within 0.1-0.2 points of their top-1 agreement and the same perplexity
(`benchmarks/quality.py --key-scales-experiment`), for 4 bytes per block and head instead of 4 x head_dim.
"""

from __future__ import annotations

import torch

__all__ = ["KV_CACHE_DTYPES", "dequantize_blocks", "kv_cache_dtype_problem", "quantize_blocks", "storage_dtype"]

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
FP8_TORCH = "2.1"  # the first torch with float8_e4m3fn
_QMAX = {"int8": 127.0, "fp8": 448.0}
_TINY = torch.finfo(torch.float32).tiny  # an all-zero block gets this scale, not 0 (0 / 0 is NaN)


def kv_cache_dtype_problem(kv_cache_dtype) -> str | None:
    """Why `kv_cache_dtype` cannot be used here, or None."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        return f"kv_cache_dtype={kv_cache_dtype!r}; choose one of {KV_CACHE_DTYPES}"
    if kv_cache_dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        return (f"kv_cache_dtype='fp8' needs torch >= {FP8_TORCH} (float8 dtypes); this is torch {torch.__version__}: "
                f"upgrade torch or use kv_cache_dtype='int8'")
    return None


def storage_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The dtype full blocks are stored in; None for "auto" (the model's own)."""
    if kv_cache_dtype == "auto":
        return None
    return torch.int8 if kv_cache_dtype == "int8" else torch.float8_e4m3fn


def quantize_blocks(blocks: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [num_blocks, block_size, num_kv_heads, head_dim], any float dtype -> (q, same shape in the storage
    dtype; scales fp32 [num_blocks, num_kv_heads])."""
    qmax = _QMAX[kv_cache_dtype]
    x = blocks.float()
    scales = x.abs().amax(dim=(1, 3)).div_(qmax).clamp_(min=_TINY)  # [num_blocks, num_kv_heads]
    scaled = (x / scales[:, None, :, None]).clamp_(-qmax, qmax)
    if kv_cache_dtype == "int8":
        return scaled.round_().to(torch.int8), scales
    return scaled.to(torch.float8_e4m3fn), scales


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [num_blocks, block_size, num_kv_heads, head_dim], scales fp32 [num_blocks, num_kv_heads] -> blocks in
    `dtype`, the same shape."""
    return (q.float() * scales[:, None, :, None]).to(dtype)
