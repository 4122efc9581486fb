"""paged_attention_reference against an independent dense formulation: torch SDPA with
masks built from transformers' own mask functions (causal, sliding window, padding)."""

import pytest
import torch

from paged_generate.kernels import paged_attention_reference


@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("query_len", [1, 5])
def test_reference_matches_transformers_masks_and_sdpa(sliding_window, query_len):
    masking = pytest.importorskip("transformers.masking_utils")
    torch.manual_seed(0)
    num_rows, num_kv_heads, group, head_dim, block_size = 2, 2, 2, 32, 4
    seq_lens, kv_start = [13, 20], [0, 4]
    max_len = max(seq_lens)
    keys = torch.randn(num_rows, num_kv_heads, max_len, head_dim, dtype=torch.float64)
    values = torch.randn_like(keys)
    query = torch.randn(num_rows, num_kv_heads * group, query_len, head_dim, dtype=torch.float64)

    # Page the dense K/V: row r's token t goes to block table[r, t // block_size], in shuffled blocks.
    blocks_per_row = max_len // block_size
    perm = torch.randperm(num_rows * blocks_per_row)
    block_tables = perm.view(num_rows, blocks_per_row).to(torch.int32)
    key_cache = torch.empty(num_rows * blocks_per_row, block_size, num_kv_heads, head_dim, dtype=torch.float64)
    value_cache = torch.empty_like(key_cache)
    paged_shape = (blocks_per_row, block_size, num_kv_heads, head_dim)
    for r in range(num_rows):
        key_cache[block_tables[r].long()] = keys[r].transpose(0, 1).reshape(paged_shape)
        value_cache[block_tables[r].long()] = values[r].transpose(0, 1).reshape(paged_shape)

    out = paged_attention_reference(
        query, key_cache, value_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32),
        scale=head_dim**-0.5, kv_start=torch.tensor(kv_start, dtype=torch.int32), sliding_window=sliding_window,
    )

    padding = torch.zeros(num_rows, max_len, dtype=torch.bool)
    for r in range(num_rows):
        padding[r, kv_start[r] : seq_lens[r]] = True
    mask_fn = (
        masking.causal_mask_function
        if sliding_window is None
        else masking.sliding_window_causal_mask_function(sliding_window)
    )
    mask_fn = masking.and_masks(mask_fn, masking.padding_mask_function(padding))
    for r in range(num_rows):
        q_idx = torch.arange(seq_lens[r] - query_len, seq_lens[r])[:, None]
        kv_idx = torch.arange(max_len)[None, :]
        mask = mask_fn(torch.tensor(r), torch.tensor(0), q_idx, kv_idx)  # [query_len, max_len]
        dense = torch.nn.functional.scaled_dot_product_attention(
            query[r : r + 1], keys[r : r + 1], values[r : r + 1], attn_mask=mask, enable_gqa=True,
            scale=head_dim**-0.5,
        )[0].transpose(0, 1)  # [query_len, heads, head_dim]
        seen = mask.any(-1)
        torch.testing.assert_close(out[r][seen], dense[seen])
        assert (out[r][~seen] == 0).all()
