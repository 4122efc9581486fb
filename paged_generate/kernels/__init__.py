"""Triton kernels for the paged KV cache, and their PyTorch references.

Layout shared by every kernel: ``key_cache``/``value_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; ``block_tables`` is int32
``[num_rows, max_blocks_per_row]`` padded with -1.

Every launch runs under its tensors' CUDA device (so on that device's current stream), whatever device is current.
Integer arguments that grow with the rows are not specialised on, and the split / merge choices are made at run
time, so a generate() call compiles its variants in its first steps only.

The Triton wrappers are imported on first use, so ``import paged_generate.kernels`` neither
needs Triton nor fixes whether kernels compile for the GPU or run under
``TRITON_INTERPRET=1`` (Triton decides that when a kernel module is imported).
"""

from __future__ import annotations

import importlib

from ._triton import is_interpreting, triton_available
from .grouping import GroupMembers, group_members
from .limits import (MAX_BLOCK_SIZE, MAX_HEAD_DIM, MIN_BLOCK_SIZE, QUANTIZED_DTYPES, SUPPORTED_DTYPES, kernels_load,
                     kernels_serve)
from .reference import copy_blocks_reference, paged_attention_reference, write_kv_reference

# Function name -> submodule. Submodules are named apart from the functions so that importing
# a submodule never replaces the package's function attribute of the same name.
_LAZY = {
    "paged_attention": ".attention",
    "launch_paged_attention": ".attention",
    "launch_write_kv": ".cache_write",
    "launch_copy_blocks": ".block_copy",
    "launch_shared_prefix_paged_attention": ".shared_prefix",
    "choose_num_splits": ".attention",
    "write_kv": ".cache_write",
    "copy_blocks": ".block_copy",
    "shared_prefix_paged_attention": ".shared_prefix",
    "shared_prefix_paged_attention_reference": ".shared_prefix_reference",
    "dequantized_caches": ".quantized_reference",
    "full_block_tables": ".shared_prefix_reference",
}

__all__ = [
    "paged_attention",
    "launch_paged_attention",
    "launch_write_kv",
    "launch_copy_blocks",
    "launch_shared_prefix_paged_attention",
    "write_kv",
    "copy_blocks",
    "paged_attention_reference",
    "write_kv_reference",
    "copy_blocks_reference",
    "choose_num_splits",
    "shared_prefix_paged_attention",
    "group_members",
    "GroupMembers",
    "shared_prefix_paged_attention_reference",
    "full_block_tables",
    "dequantized_caches",
    "kernels_serve",
    "kernels_load",
    "QUANTIZED_DTYPES",
    "MAX_BLOCK_SIZE",
    "MAX_HEAD_DIM",
    "MIN_BLOCK_SIZE",
    "SUPPORTED_DTYPES",
    "triton_available",
    "is_interpreting",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
