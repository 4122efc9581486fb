"""Shared-prefix (cascade) attention equals plain attention over each row's whole table."""

import pytest
import torch

from paged_generate.attention.shared_prefix import shared_prefix_attention
from paged_generate.blocks import cdiv


def _random_layout(seed, num_groups, max_members, max_prefix_blocks, block_size, ragged=True):
    generator = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=generator))  # noqa: E731
    members = [randint(1, max_members) for _ in range(num_groups)]
    prefix_blocks = [randint(0, max_prefix_blocks) for _ in range(num_groups)]
    suffix_tokens = [[randint(1, 3 * block_size) if ragged else 2 * block_size + 1 for _ in range(m)] for m in members]
    num_suffix_blocks = sum(cdiv(t, block_size) for group in suffix_tokens for t in group)
    num_blocks = sum(prefix_blocks) + num_suffix_blocks
    ids = torch.randperm(num_blocks, generator=generator).tolist()
    prefix_tables, rows = [], []
    for g in range(num_groups):
        prefix = [ids.pop() for _ in range(prefix_blocks[g])]
        prefix_tables.append(prefix)
        for tokens in suffix_tokens[g]:
            rows.append((g, prefix, [ids.pop() for _ in range(cdiv(tokens, block_size))], tokens))
    return num_blocks, prefix_tables, rows


def _pad(tables):
    width = max(1, max(len(t) for t in tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)


def _reference(query, key_cache, value_cache, rows, block_size, scale, visible_fn):
    out = []
    for r, (g, prefix, suffix, tokens) in enumerate(rows):
        blocks = torch.tensor(prefix + suffix, dtype=torch.long)
        seq_len = len(prefix) * block_size + tokens
        k = key_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)  # [H, S, D]
        v = value_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        per_kv = query.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(per_kv, 0), v.repeat_interleave(per_kv, 0)
        scores = (query[r] @ k.transpose(-1, -2)) * scale  # [Hq, 1, S]
        scores = scores.masked_fill(~visible_fn(r, seq_len), float("-inf"))
        out.append((torch.softmax(scores, -1) @ v).transpose(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("per_kv", [1, 4])
def test_split_equals_unsplit_on_random_groupings(seed, per_kv):
    block_size, num_kv_heads, head_dim = 4, 2, 8
    num_groups = 1 + seed % 4
    num_blocks, prefix_tables, rows = _random_layout(seed, num_groups, max_members=16, max_prefix_blocks=6,
                                                     block_size=block_size)
    generator = torch.Generator().manual_seed(100 + seed)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator, dtype=torch.float64)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator, dtype=torch.float64)
    query = torch.randn(len(rows), num_kv_heads * per_kv, 1, head_dim, generator=generator, dtype=torch.float64)
    prefix_lens = torch.tensor([len(p) * block_size for p in prefix_tables])
    # Left padding on some rows' groups: the first `pad` prefix positions of a group are invisible to its rows.
    pads = [int(torch.randint(0, 3, (), generator=generator)) if prefix_lens[g] > 2 else 0 for g in range(num_groups)]

    def visible_fn(r, seq_len):
        g = rows[r][0]
        return torch.arange(seq_len) >= pads[g]

    max_prefix = _pad(prefix_tables).shape[1] * block_size
    prefix_visible = torch.arange(max_prefix)[None, :] >= torch.tensor(pads)[:, None]
    out = shared_prefix_attention(
        query, key_cache, value_cache,
        row_group=torch.tensor([g for g, *_ in rows]),
        prefix_tables=_pad(prefix_tables), prefix_lens=prefix_lens,
        suffix_tables=_pad([suffix for _, _, suffix, _ in rows]),
        suffix_lens=torch.tensor([tokens for *_, tokens in rows]),
        scale=head_dim**-0.5, prefix_visible=prefix_visible,
    )
    expected = _reference(query, key_cache, value_cache, rows, block_size, head_dim**-0.5, visible_fn)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_fp32_error_no_worse_than_plain_attention():
    block_size, num_kv_heads, head_dim = 16, 2, 32
    num_blocks, prefix_tables, rows = _random_layout(5, 2, max_members=8, max_prefix_blocks=8, block_size=block_size,
                                                     ragged=False)
    generator = torch.Generator().manual_seed(0)
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator, dtype=torch.float64)
              for _ in range(2)]
    query = torch.randn(len(rows), 8, 1, head_dim, generator=generator, dtype=torch.float64)
    args = dict(
        row_group=torch.tensor([g for g, *_ in rows]),
        prefix_tables=_pad(prefix_tables), prefix_lens=torch.tensor([len(p) * block_size for p in prefix_tables]),
        suffix_tables=_pad([s for _, _, s, _ in rows]), suffix_lens=torch.tensor([t for *_, t in rows]),
        scale=head_dim**-0.5,
    )
    visible_all = lambda r, seq_len: torch.ones(seq_len, dtype=torch.bool)  # noqa: E731
    truth = _reference(query, *caches, rows, block_size, head_dim**-0.5, visible_all)
    split = shared_prefix_attention(query.float(), *(c.float() for c in caches), **args)
    plain = _reference(query.float(), *(c.float() for c in caches), rows, block_size, head_dim**-0.5, visible_all)
    assert (split.double() - truth).abs().max() <= 2 * (plain.double() - truth).abs().max() + 1e-7


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_split_close_to_float64(seed, dtype, atol):
    block_size, num_kv_heads, head_dim = 4, 2, 8
    num_blocks, prefix_tables, rows = _random_layout(seed, 3, max_members=6, max_prefix_blocks=5, block_size=block_size)
    generator = torch.Generator().manual_seed(seed)
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator, dtype=torch.float64)
              for _ in range(2)]
    query = torch.randn(len(rows), 8, 1, head_dim, generator=generator, dtype=torch.float64)
    pads = [1 if len(p) else 0 for p in prefix_tables]  # some groups fully padded at their first position
    max_prefix = _pad(prefix_tables).shape[1] * block_size
    out = shared_prefix_attention(
        query.to(dtype), *(c.to(dtype) for c in caches),
        row_group=torch.tensor([g for g, *_ in rows]),
        prefix_tables=_pad(prefix_tables), prefix_lens=torch.tensor([len(p) * block_size for p in prefix_tables]),
        suffix_tables=_pad([s for _, _, s, _ in rows]), suffix_lens=torch.tensor([t for *_, t in rows]),
        scale=head_dim**-0.5,
        prefix_visible=torch.arange(max_prefix)[None, :] >= torch.tensor(pads)[:, None],
    )
    truth = _reference(query, *caches, rows, block_size, head_dim**-0.5,
                       lambda r, seq_len: torch.arange(seq_len) >= pads[rows[r][0]])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), truth, atol=atol, rtol=0)
