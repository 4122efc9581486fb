"""Which implementation runs the paged cache's KV writes, block copies and attention on a given device."""

from __future__ import annotations

import os

import torch

from .kernels import MIN_BLOCK_SIZE, triton_available

__all__ = ["BACKENDS", "BACKEND_ENV", "backend_problem", "uses_triton"]

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "PAGED_GENERATE_BACKEND"  # overrides backend="auto", e.g. to run the kernels under TRITON_INTERPRET=1


def backend_problem(backend: str, block_size: int) -> str | None:
    """What could only fail later, in the middle of a generate() call, said at enable time; None if nothing."""
    if backend not in BACKENDS:
        return f"backend={backend!r}; choose one of {BACKENDS}"
    if _resolve(backend) != "triton":
        return None
    if not triton_available():
        return "backend='triton' needs the `triton` package; install it or use backend='torch'"
    if block_size < MIN_BLOCK_SIZE:
        return (f"the Triton kernels need block_size >= {MIN_BLOCK_SIZE}, got {block_size}; raise it or use "
                f"backend='torch'")
    return None


def uses_triton(backend: str, device: torch.device, block_size: int) -> bool:
    """auto: the kernels on CUDA (when Triton is installed), PyTorch elsewhere; triton / torch: forced."""
    resolved = _resolve(backend)
    if resolved != "auto":
        return resolved == "triton"
    return device.type == "cuda" and block_size >= MIN_BLOCK_SIZE and triton_available()


def _resolve(backend: str) -> str:
    if backend == "auto":
        return os.environ.get(BACKEND_ENV, "auto") or "auto"
    return backend
