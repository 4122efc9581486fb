"""The attention functions registered with transformers, and where a paged forward picks its path.

A layer hands attention either ordinary K/V (no paged cache, or rows read in place as views of the pools), which goes
straight to stock's function, or its pools with a `PagedRead`. Then, in this order:

1. what only stock's function reproduces (`needs_stock_attention`): stock's function on every row's K/V;
2. a CUDA layer the Triton kernels can serve, with a mask they reproduce (`_kernel_can_serve`): the kernels,
   shared-prefix or plain (compressed pools are dequantized in registers);
3. a decode step whose rows share a prefix: the PyTorch shared-prefix split;
4. otherwise stock's function on every row's K/V (views of the pools, or gathered); for an fp32 GQA decode step on
   CPU without a mask, SDPA with the query heads packed per KV head (`packed_decode.py`), twice as fast as stock's
   call.

The PyTorch paths read compressed pools (`read.quantized`) through `CompressedRead.dequantized()`: the step's blocks
in the model's dtype, each distinct full block dequantized once per layer and step (a group's shared prefix once).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import kernels
from ..cache import PagedRead, paged_read_of
from ..layout import strided_rows
from ..step import mask_pattern
from .shared_prefix import shared_prefix_attention
from .split_rule import split_pays
from .packed_decode import packed_decode_attention, packs_gqa
from .stock import (cut_to_stock_window, needs_stock_attention, split_rounds_apart, stock_attention,
                    stock_cache_window)

__all__ = ["paged_attention", "paged_attention_forward", "paged_attention_forward_eager"]


def paged_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered as `ATTENTION_NAME`: models that ran SDPA before the plugin (see `paged_attention`)."""
    read = _paged_read_of(key)
    if read is None:  # ordinary K/V (rows read in place, or no paged cache): stock SDPA, no detour
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return paged_attention("sdpa", read, module, query, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def paged_attention_forward_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered as `ATTENTION_NAME_EAGER`: models that ran their family's eager attention before the plugin."""
    read = _paged_read_of(key)
    if read is None:
        return stock_attention("eager", module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               **kwargs)
    return paged_attention("eager", read, module, query, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _paged_read_of(key):
    # Under torch.compile the K/V are never paged (attention modules given a paged cache run outside the graph, see
    # patches/compile_boundary.py): skip the lookup, which dynamo cannot trace.
    return None if torch.compiler.is_compiling() else paged_read_of(key)


def paged_attention(
    implementation: str,
    read: PagedRead,
    module: torch.nn.Module,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query: [num_rows, num_q_heads, query_len, head_dim] -> (out [num_rows, query_len, num_q_heads, head_dim], weights
    or None: only the eager stock path returns weights, as stock eager does).

    `implementation` ("sdpa" or "eager") is what stock transformers would run for this model; the registered name
    fixes it, so no per-layer config lookup is needed.
    """
    step = read.step
    # Most CPU decode steps have no prefix worth splitting off: they go straight to the rows.
    if (read.use_triton or (step.shares_prefix and split_pays(step.redundant_prefix_tokens, "torch"))) and (
            not needs_stock_attention(implementation, kwargs)):
        known, window = _mask_known(module, query, attention_mask, step)
        if read.use_triton and known and _kernel_can_serve(query, read, dropout, kwargs):
            return _triton_forward(query, read, attention_mask, _scale(module, query, scaling), window, kwargs), None
        if known and not split_rounds_apart(query) and _can_split_shared_prefix(read, "torch", dropout, kwargs):
            dense = read.dequantized() if read.quantized else read
            return _shared_prefix_forward(module, query, dense, attention_mask, scaling), None
    key, value = read.rows()
    layer = read.layer
    window = layer.stock_window if layer.stock_window_known else stock_cache_window(module)
    key, value, attention_mask = cut_to_stock_window(query, key, value, attention_mask, window)
    if implementation == "sdpa" and packs_gqa(module, query, attention_mask, dropout, kwargs):
        return packed_decode_attention(module, query, key, value, scaling)
    return stock_attention(implementation, module, query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, **kwargs)


def _mask_known(module, query, attention_mask, step) -> tuple[bool, int | None]:
    """Whether the mask is causal, left padding and a window (the window, or None) at the step's positions: what the
    kernels and the PyTorch split apply. Read from how the mask was built, never from its values (no sync).

    No mask: sdpa_mask leaves it out only where it is plain causal and no window can hide a key, and stock then relies
    on the module's `is_causal` (a single query sees every key either way). A mask: only one `paged_mask` marked.
    A window passed as a kwarg is not used: stock's SDPA and eager apply the mask alone.
    """
    if attention_mask is None:
        return getattr(module, "is_causal", True) or query.shape[2] == 1, None
    pattern = mask_pattern(attention_mask)
    if pattern is None or attention_mask.dtype != torch.bool or not pattern.matches(step):
        return False, None
    return True, pattern.window


def _kernel_can_serve(query, read: PagedRead, dropout: float, kwargs: dict) -> bool:
    # The kernels know left padding, causality, a window and a softcap, in the cache's dtype (their pools were checked
    # when created: `kernels_serve`); attention sinks, dropout, or a query or values of another dtype (autocast: fp32
    # queries and keys after the rotary embedding, bf16 values) take the PyTorch path.
    key_dtype, value_dtype = read.dtypes
    return not dropout and kwargs.get("s_aux") is None and query.dtype == key_dtype == value_dtype


def _triton_forward(query, read: PagedRead, attention_mask, scale: float, window: int | None,
                    kwargs: dict) -> torch.Tensor:
    step, device_step = read.step, read.device_step
    features = dict(
        scale=scale, kv_start=device_step.kv_start(attention_mask), sliding_window=window,
        softcap=kwargs.get("softcap"),
    )
    if step.shares_prefix and split_pays(step.redundant_prefix_tokens, "triton"):
        return kernels.launch_shared_prefix_paged_attention(
            query, read.keys, read.values, seq_lens=device_step.seq_lens, **device_step.shared.kernel_args, **features,
            **read.storage_args,
        )
    return kernels.launch_paged_attention(query, read.keys, read.values, device_step.block_tables, device_step.seq_lens,
                                          **features, **read.storage_args)


def _scale(module, query, scaling) -> float:
    return scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)


def _can_split_shared_prefix(read: PagedRead, path: str, dropout: float, kwargs: dict) -> bool:
    # The PyTorch split has no softcap / sinks / dropout: those take the unsplit path.
    step = read.step
    return (step.shares_prefix and not dropout and not kwargs.get("softcap") and kwargs.get("s_aux") is None
            and split_pays(step.redundant_prefix_tokens, path))


def _shared_prefix_forward(module, query, read: PagedRead, attention_mask, scaling) -> torch.Tensor:
    """Decode step with rows grouped by shared leading blocks; `attention_mask` is sdpa_mask's [rows, 1, 1, seq] or
    None."""
    step = read.step
    groups = read.device_step.shared
    num_shared = groups.num_shared_blocks
    prefix_len = num_shared * step.block_size
    prefix_keys = None
    if groups.prefix_layout is not None:
        num_groups = groups.prefix_tables.shape[0]
        prefix_keys = tuple(strided_rows(pool, groups.prefix_layout, num_groups, num_shared)
                            for pool in (read.keys, read.values))
    visible = attention_mask[:, 0, -1, :] if attention_mask is not None else None
    return shared_prefix_attention(
        query, read.keys, read.values,
        row_group=groups.row_group, prefix_tables=groups.prefix_tables, prefix_lens=None,
        suffix_tables=groups.suffix_tables, suffix_lens=step.seq_len - prefix_len, scale=_scale(module, query, scaling),
        prefix_visible=visible[groups.first_rows, :prefix_len] if visible is not None else None,
        suffix_visible=visible[:, prefix_len:] if visible is not None else None,
        prefix_keys=prefix_keys, members=groups.members, uniform_group_size=step.shared.uniform_size,
    )
