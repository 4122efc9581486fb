"""SDPA with the query heads packed per KV head, for fp32 GQA decode steps on CPU: stock's result up to rounding."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from paged_generate.attention.packed_decode import packed_decode_attention, packs_gqa


class _Attention(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("rows, heads, kv_heads, head_dim, seq_len", [(8, 8, 2, 32, 256), (3, 12, 4, 64, 17)])
def test_packed_equals_stock_sdpa_up_to_rounding(rows, heads, kv_heads, head_dim, seq_len):
    generator = torch.Generator().manual_seed(seq_len)
    query = torch.randn(rows, 1, heads, head_dim, generator=generator).transpose(1, 2)  # as the models hand it over
    key, value = (torch.randn(rows, seq_len, kv_heads, head_dim, generator=generator).transpose(1, 2) for _ in "kv")
    module = _Attention(heads // kv_heads)
    assert packs_gqa(module, query, None, 0.0, {})
    stock, _ = sdpa_attention_forward(module, query, key, value, None, scaling=head_dim**-0.5)
    packed, weights = packed_decode_attention(module, query, key, value, head_dim**-0.5)
    assert weights is None and packed.shape == stock.shape == (rows, 1, heads, head_dim)
    torch.testing.assert_close(packed, stock, atol=1e-6, rtol=1e-6)


def test_only_fp32_gqa_decode_without_mask_or_extras_is_packed():
    module = _Attention(4)
    query = torch.zeros(2, 8, 1, 16)
    assert packs_gqa(module, query, None, 0.0, {})
    assert not packs_gqa(module, query.bfloat16(), None, 0.0, {})  # half precision keeps stock's rounding
    assert not packs_gqa(module, query, torch.ones(2, 1, 1, 5, dtype=torch.bool), 0.0, {})  # stock packs masks itself
    assert not packs_gqa(module, torch.zeros(2, 8, 3, 16), None, 0.0, {})  # a prompt step
    assert not packs_gqa(_Attention(1), query, None, 0.0, {})  # no grouped heads
    assert not packs_gqa(module, query, None, 0.1, {})
    assert not packs_gqa(module, query, None, 0.0, {"softcap": 30.0})
