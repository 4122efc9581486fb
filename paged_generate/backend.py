"""Which implementation runs the paged cache's KV writes, block copies and attention on a given device."""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "BACKEND_ENV", "check_backend", "uses_triton"]

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "PAGED_GENERATE_BACKEND"  # overrides backend="auto", e.g. to run the kernels under TRITON_INTERPRET=1
MIN_TRITON_BLOCK_SIZE = 8


def check_backend(backend: str, block_size: int) -> None:
    """Refuse at enable time what could only fail later, in the middle of a generate() call."""
    if backend not in BACKENDS:
        raise ValueError(f"enable_paged_cache: backend={backend!r}; choose one of {BACKENDS}.")
    if _resolve(backend) == "triton":
        from .kernels import triton_available

        if not triton_available():
            raise ValueError("enable_paged_cache: backend='triton' needs the `triton` package; install it or use "
                             "backend='torch'.")
        if block_size < MIN_TRITON_BLOCK_SIZE:
            raise ValueError(f"enable_paged_cache: the Triton kernels need block_size >= {MIN_TRITON_BLOCK_SIZE}, got "
                             f"{block_size}; raise it or use backend='torch'.")


def uses_triton(backend: str, device: torch.device, block_size: int) -> bool:
    """auto: the kernels on CUDA (when Triton is installed), PyTorch elsewhere; triton / torch: forced."""
    resolved = _resolve(backend)
    if resolved != "auto":
        return resolved == "triton"
    if device.type != "cuda" or block_size < MIN_TRITON_BLOCK_SIZE:
        return False
    from .kernels import triton_available

    return triton_available()


def _resolve(backend: str) -> str:
    if backend == "auto":
        return os.environ.get(BACKEND_ENV, "auto") or "auto"
    return backend
