"""Shared-prefix (cascade) attention: attend to a group's shared blocks once for all its rows, then merge.

Rows of one prompt (its beams or samples) share their leading blocks. For one decode step, the attention of every
member over those blocks is one matrix-matrix product per group instead of one matrix-vector product per row; each
row then attends to its own remaining blocks, and the two partial softmaxes are merged exactly through their
log-sum-exp (FlashInfer's cascade attention, Hydragen, bifurcated attention).
"""

from __future__ import annotations

import torch

from ..kernels.grouping import GroupMembers, group_members
from ..layout import gather_rows
from ..patches.torch_ops import cpu_flash_attention_with_lse

__all__ = ["attend_partial", "merge_partials", "shared_prefix_attention"]


def attend_partial(query, key, value, visible, scale: float):
    """Softmax attention over part of the keys, with its log-sum-exp for merging.

    query: [batch, heads, num_queries, head_dim]; key, value: [batch, heads, num_keys, head_dim]; visible: bool,
    broadcastable to [batch, heads, num_queries, num_keys], or None. Returns (out [batch, heads, num_queries, head_dim]
    normalised, lse [batch, heads, num_queries]). A query that sees no key gets out = 0 and lse = -inf, so it drops
    out of the merge.
    """
    if query.device.type == "cpu" and query.dtype in _CPU_FLASH_DTYPES:
        return _attend_partial_cpu_flash(query, key, value, visible, scale)
    scores = _accumulator(torch.matmul(query, key.transpose(-1, -2))) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - lse.nan_to_num(neginf=0.0))  # rows with no key: exp(-inf) = 0 everywhere
    out = torch.matmul(weights.to(value.dtype), value)
    return out, lse.squeeze(-1)


_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _attend_partial_cpu_flash(query, key, value, visible, scale):
    # PyTorch's fused CPU flash kernel returns the log-sum-exp we need; one pass instead of five.
    bias = None
    if visible is not None:
        bias = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
    out, lse = cpu_flash_attention_with_lse(query, key, value, bias, scale)
    if visible is not None:  # the kernel reports lse = 0 for a query that sees nothing
        lse = lse.masked_fill(~visible.any(-1), float("-inf"))
    return out, lse


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exact softmax over the union of two disjoint key sets from their partial results. Shapes as attend_partial."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.nan_to_num(neginf=0.0)
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return (_accumulator(out_a) * weight_a + _accumulator(out_b) * weight_b).to(out_a.dtype), lse


def _accumulator(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 results are combined in fp32; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _visibility(lens, visible, width: int, device) -> torch.Tensor | None:
    """[N, 1, 1, width] bool from per-entry lengths and an extra mask; None when everything is visible."""
    mask = None if lens is None else torch.arange(width, device=device) < lens[:, None]
    if visible is not None:
        visible = _fit(visible, width)
        mask = visible if mask is None else mask & visible
    return None if mask is None else mask[:, None, None, :]


def _fit(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or pad (with False) a [N, tokens] visibility mask to `width` tokens."""
    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]), value=False)


def shared_prefix_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    row_group: torch.Tensor,
    prefix_tables: torch.Tensor,
    prefix_lens: torch.Tensor | None,
    suffix_tables: torch.Tensor,
    suffix_lens: torch.Tensor | int,
    scale: float,
    prefix_visible: torch.Tensor | None = None,
    suffix_visible: torch.Tensor | None = None,
    prefix_keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    members: GroupMembers | None = None,
    uniform_group_size: int | None = None,
) -> torch.Tensor:
    """Decode attention (one query token per row) split into a per-group shared part and a per-row part.

    query: [num_rows, num_q_heads, 1, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    row_group: int64 [num_rows], the group of each row (any membership, any group sizes)
    prefix_tables: [num_groups, max_prefix_blocks] the group's shared blocks (entries past prefix_lens unused, >= 0)
    prefix_lens: int64 [num_groups] shared tokens per group (0 allowed), or None: every group's whole table
    suffix_tables: [num_rows, max_suffix_blocks] the row's blocks after its group's prefix (entries >= 0)
    suffix_lens: int64 [num_rows] tokens of each row after the prefix, or one int for all rows
    prefix_visible: bool [num_groups, max_prefix_tokens] / suffix_visible: bool [num_rows, max_suffix_tokens]:
        extra masking (padding, sliding window) on top of the lengths; None = all visible
    prefix_keys: optional (K, V) [num_groups, num_kv_heads, max_prefix_tokens, head_dim] already at hand (a view of
        the pool when the groups' blocks are laid out regularly), to skip gathering them
    members: `kernels.group_members(row_group, num_groups)` if already at hand (built here otherwise, with a sync)
    uniform_group_size: set when group g is exactly rows [g * size, (g + 1) * size): members are then views (the
        beams or samples of prompts); `members` and `row_group` are not read
    returns [num_rows, 1, num_q_heads, head_dim]

    Whole blocks are read and the slots past each length are masked, so they must hold finite values (PagedCache
    pools are zero-initialised).
    """
    num_rows, num_q_heads, query_len, head_dim = query.shape
    assert query_len == 1, "shared-prefix attention is for decode steps"
    num_kv_heads = key_cache.shape[2]
    per_kv = num_q_heads // num_kv_heads
    num_groups = prefix_tables.shape[0]
    block_size = key_cache.shape[1]

    # Shared part: [groups, kv_heads, members * per_kv, head_dim] queries against the group's prefix keys.
    q = query.view(num_rows, num_kv_heads, per_kv, head_dim)
    if uniform_group_size is not None:
        max_members = uniform_group_size
        q_members = q.view(num_groups, max_members, num_kv_heads, per_kv, head_dim)
    else:
        # Members of each group side by side: [num_groups, max_members] row ids, padded with row 0 and masked.
        if members is None:
            members = group_members(row_group, num_groups)
        max_members = members.max_group_size
        padded = torch.zeros(num_groups, max_members, dtype=torch.long, device=query.device)
        padded[row_group, members.row_slot] = torch.arange(num_rows, device=query.device)
        q_members = q[padded]
    q_groups = q_members.permute(0, 2, 1, 3, 4).reshape(num_groups, num_kv_heads, max_members * per_kv, head_dim)
    max_prefix = prefix_tables.shape[1] * block_size
    if prefix_keys is None:
        prefix_keys = (gather_rows(key_cache, prefix_tables, max_prefix),
                       gather_rows(value_cache, prefix_tables, max_prefix))
    k_prefix, v_prefix = prefix_keys
    visible = _visibility(prefix_lens, prefix_visible, k_prefix.shape[2], query.device)
    out_p, lse_p = attend_partial(q_groups, k_prefix, v_prefix, visible, scale)
    out_p = out_p.view(num_groups, num_kv_heads, max_members, per_kv, head_dim)
    lse_p = lse_p.view(num_groups, num_kv_heads, max_members, per_kv)
    if uniform_group_size is not None:  # back to rows: [num_rows, num_kv_heads, per_kv(, head_dim)]
        out_p = out_p.transpose(1, 2).reshape(num_rows, num_kv_heads, per_kv, head_dim)
        lse_p = lse_p.transpose(1, 2).reshape(num_rows, num_kv_heads, per_kv)
    else:
        out_p, lse_p = out_p[row_group, :, members.row_slot], lse_p[row_group, :, members.row_slot]

    # Own part: each row's blocks after the prefix.
    uniform = isinstance(suffix_lens, int)
    max_suffix = suffix_lens if uniform else suffix_tables.shape[1] * block_size
    k_suffix = gather_rows(key_cache, suffix_tables, max_suffix)
    v_suffix = gather_rows(value_cache, suffix_tables, max_suffix)
    visible = _visibility(None if uniform else suffix_lens, suffix_visible, max_suffix, query.device)
    out_s, lse_s = attend_partial(q, k_suffix, v_suffix, visible, scale)

    out, _ = merge_partials(out_p, lse_p, out_s, lse_s)
    return out.reshape(num_rows, 1, num_q_heads, head_dim).to(query.dtype)
