"""Guarded Triton import and small launch helpers shared by the kernel wrappers.

Kernel modules do ``from ._triton import triton, tl`` so that they import (and
``import paged_generate.kernels`` works) on machines without Triton; launching a
kernel there raises a clear error instead of an ImportError at import time.

Kernel modules do not use ``from __future__ import annotations``: Triton finds constexpr
parameters from their annotations, which should be the real ``tl.constexpr`` objects.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a broken install that fails on import
    _TRITON_IMPORT_ERROR = exc

    class _MissingKernel:
        """Placeholder for a ``@triton.jit`` function when Triton is absent."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton is not available ({_TRITON_IMPORT_ERROR!r}); cannot launch {self.__name__}")

        def __call__(self, *args, **kwargs):
            self[None]

    class _TritonStub:
        def jit(self, fn=None, **kwargs):
            # Supports both ``@triton.jit`` and ``@triton.jit(...)``.
            if fn is None:
                return _MissingKernel
            return _MissingKernel(fn)

    class _LanguageStub:
        # Only what kernel modules evaluate at import time: the annotations.
        constexpr = object

    triton = _TritonStub()
    tl = _LanguageStub()


def triton_available() -> bool:
    """True when Triton imported; kernels can then run on CUDA or under TRITON_INTERPRET=1."""
    return _TRITON_IMPORT_ERROR is None


def is_interpreting() -> bool:
    """Whether ``@triton.jit`` currently produces interpreter functions (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernel_is_interpreted(kernel) -> bool:
    # Decided when the kernel module was imported, which may differ from the env var now.
    return type(kernel).__name__ == "InterpretedFunction"


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise a readable error when ``kernel`` cannot run on the tensors' device."""
    if not triton_available():
        raise RuntimeError(f"paged_generate kernels need Triton, which failed to import: {_TRITON_IMPORT_ERROR!r}")
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    interpreted = kernel_is_interpreted(kernel)
    if device.type == "cpu" and not interpreted:
        hint = (
            " TRITON_INTERPRET=1 is set now but was not when paged_generate.kernels loaded this kernel;"
            " set it before the first use of the kernels."
            if is_interpreting()
            else " Use CUDA tensors, or set TRITON_INTERPRET=1 before the kernels are first used."
        )
        raise ValueError("Triton kernels cannot run on CPU tensors." + hint)


def launch_context(device: torch.device):
    """What a launch on ``device`` runs under: that CUDA device (Triton launches on the current device, on its
    current stream), nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_tensors_device(launch):
    """Decorate a ``launch_*`` function so that its kernels launch under the device of its first (tensor) argument.

    Without it a layer on cuda:1 while cuda:0 is current would launch on cuda:0 and its stream: an illegal access, or
    with peer access on, kernels unordered against the layer's own work."""

    @functools.wraps(launch)
    def on_device(first: torch.Tensor, *args, **kwargs):
        with launch_context(first.device):
            return launch(first, *args, **kwargs)

    return on_device


def warm_up(kernel, *args, grid, **kwargs) -> None:
    """Compile ``kernel`` for these arguments without launching it (the interpreter has nothing to compile)."""
    with launch_context(args[0].device):
        kernel.run(*args, grid=grid, warmup=True, **kwargs)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """SM count of ``device``; a typical datacenter GPU's (132, H100) when it is not a CUDA device."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132
