"""The attention and mask functions registered with transformers under `ATTENTION_NAME`."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .fallback_attention import (
    ATTENTION_NAME_EAGER,
    needs_reference,
    reference_attention,
    reference_on_rows,
    register_eager_variant,
)
from .shared_prefix import prefix_view, shared_prefix_attention

__all__ = ["ATTENTION_NAME", "gather_kv", "paged_attention_forward", "register_attention", "rows_kv"]

# No "sdpa" / "flash" in the name: transformers treats names containing those specially.
ATTENTION_NAME = "paged_generate"
ATTENTION_NAMES = (ATTENTION_NAME, ATTENTION_NAME_EAGER)


def gather_kv(pool: torch.Tensor, block_tables: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rows' K (or V) read through their block tables, as transformers lays K/V out.

    pool: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: int32 [num_rows, num_blocks_per_row]
    returns [num_rows, num_kv_heads, seq_len, head_dim]
    """
    num_rows, blocks_per_row = block_tables.shape
    rows = pool.index_select(0, block_tables.reshape(-1)).view(num_rows, blocks_per_row * pool.shape[1], *pool.shape[2:])
    return rows[:, :seq_len].transpose(1, 2)


def rows_kv(pool: torch.Tensor, step) -> torch.Tensor:
    """Every row's K (or V) [num_rows, num_kv_heads, seq_len, head_dim]: a view of the pool when the rows' blocks are
    laid out regularly, else gathered through the block tables."""
    layout = step.row_layout
    if layout is None:
        return gather_kv(pool, pool.paged_device_step.block_tables, step.seq_len)
    # The view over every block the rows can reach is kept on the pool: a decode step then only slices it.
    key = (layout, step.num_rows)
    cached = getattr(pool, "paged_rows_view", None)
    if cached is None or cached[0] != key or cached[1].shape[2] < step.seq_len:
        cached = pool.paged_rows_view = (key, step.rows_view(pool))
    return cached[1][:, :, : step.seq_len]


def paged_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered as `ATTENTION_NAME`: models that ran SDPA before the plugin (see `paged_attention`)."""
    if not hasattr(key, "paged_step"):  # plain K/V (rows read in place, or no paged cache): stock SDPA, no detour
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return paged_attention("sdpa", module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def paged_attention_forward_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered as `ATTENTION_NAME_EAGER`: models that ran their family's eager attention before the plugin."""
    return paged_attention("eager", module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def paged_attention(
    reference: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query: [num_rows, num_q_heads, query_len, head_dim] -> (out [num_rows, query_len, num_q_heads, head_dim], weights
    or None: only the eager reference returns weights, as stock eager does).

    `key` / `value` are a `PagedCache` layer's pools carrying the step's block tables; anything else (no cache,
    `use_cache=False`, another cache class) is ordinary K/V and goes unchanged to `reference`, the implementation stock
    transformers would run for this model (SDPA, or the family's eager attention: see fallback_attention.py). The
    registered name fixes `reference`, so no per-layer config lookup is needed.
    """
    step = getattr(key, "paged_step", None)
    if step is None:
        return reference_attention(reference, module, query, key, value, attention_mask, dropout=dropout,
                                   scaling=scaling, **kwargs)
    if needs_reference(reference, query, kwargs):  # what only stock's own function reproduces (fallback_attention.py)
        key, value = (rows_kv(pool, step) for pool in (key, value))
        return reference_on_rows(reference, module, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, **kwargs)
    if key.paged_use_triton and _kernel_can_serve(attention_mask, dropout, kwargs):
        return _triton_forward(query, key, value, attention_mask, step, _scale(module, query, scaling), kwargs), None
    if _can_split_shared_prefix(step, dropout, kwargs):
        return _shared_prefix_forward(module, query, key, value, attention_mask, step, scaling), None
    key, value = (rows_kv(pool, step) for pool in (key, value))
    return reference_on_rows(reference, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             **kwargs)


def _kernel_can_serve(attention_mask, dropout: float, kwargs: dict) -> bool:
    # The kernel knows left padding + causality + window + softcap; anything else goes to the PyTorch path.
    boolean_mask = attention_mask is None or attention_mask.dtype == torch.bool
    return boolean_mask and not dropout and kwargs.get("s_aux") is None


def _triton_forward(query, key_pool, value_pool, attention_mask, step, scale: float, kwargs: dict) -> torch.Tensor:
    from . import kernels

    device_step = key_pool.paged_device_step
    features = dict(
        scale=scale, kv_start=device_step.kv_start(attention_mask), sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
    )
    if step.shares_prefix:
        groups = step.shared_on(key_pool.device).kernel_args(step.block_size)
        return kernels.shared_prefix_paged_attention(
            query, key_pool, value_pool, seq_lens=device_step.seq_lens, **groups, **features
        )
    return kernels.paged_attention(query, key_pool, value_pool, device_step.block_tables, device_step.seq_lens,
                                   **features)


def _scale(module, query, scaling) -> float:
    return scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)


def _can_split_shared_prefix(step, dropout: float, kwargs: dict) -> bool:
    # The PyTorch split has no softcap / sinks / dropout: those take the unsplit path.
    return step.shares_prefix and not dropout and not kwargs.get("softcap") and kwargs.get("s_aux") is None


def _shared_prefix_forward(module, query, key_pool, value_pool, attention_mask, step, scaling) -> torch.Tensor:
    """Decode step with rows grouped by shared leading blocks; `attention_mask` is sdpa_mask's [rows, 1, 1, seq] or None."""
    groups = step.shared_on(key_pool.device)
    shared = step.shared
    prefix_len = shared.num_blocks * step.block_size
    prefix_keys = None
    if groups.prefix_layout is not None:
        num_groups = step.num_rows // shared.group_size
        prefix_keys = tuple(prefix_view(pool, groups.prefix_layout, num_groups, shared.num_blocks)
                            for pool in (key_pool, value_pool))
    visible = attention_mask[:, 0, -1, :] if attention_mask is not None else None
    scale = _scale(module, query, scaling)
    return shared_prefix_attention(
        query, key_pool, value_pool,
        row_group=groups.row_group, prefix_tables=groups.prefix_tables, prefix_lens=None,
        suffix_tables=groups.suffix_tables, suffix_lens=groups.suffix_len, scale=scale,
        prefix_visible=visible[:: shared.group_size, :prefix_len] if visible is not None else None,
        suffix_visible=visible[:, prefix_len:] if visible is not None else None,
        prefix_keys=prefix_keys,
    )


def register_attention() -> None:
    """Make `ATTENTION_NAME` known to transformers (idempotent; the functions hold no state)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    register_eager_variant(paged_attention_forward_eager)
