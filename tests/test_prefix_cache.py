"""Prefix caching across generate() calls: a call whose rows begin with blocks an earlier call left in the pool computes
only the rest of its prompts, and generates what stock generate() does (tokens equal, logits within 1e-4 in fp32)."""

import gc

import pytest
import torch

from paged_generate import KVPool, cache_stats, disable_paged_cache, enable_paged_cache
from tiny_models import tiny_model

BLOCK = 8
CONTEXT = torch.randint(3, 90, (1, 43), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(*rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(row.shape[1] for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1]:] = row[0]
        mask[i, width - row.shape[1]:] = 1
    return ids, mask


def _generate(model, ids, mask=None, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


class _Calls:
    """Each call's stock output first, then the pooled calls in order, each checked against its stock output."""

    def __init__(self, model, calls, pool=None, **enable):
        self.model, self.calls = model, calls
        disable_paged_cache(model)
        self.stock = [_generate(model, **call) for call in calls]
        self.pool = pool or KVPool()
        enable_paged_cache(model, pool=self.pool, block_size=BLOCK, **enable)
        self.hits = []

    def run(self):
        try:
            for call, (stock_ids, stock_logits) in zip(self.calls, self.stock):
                ids, logits = _generate(self.model, **call)
                assert torch.equal(ids, stock_ids)
                torch.testing.assert_close(logits, stock_logits, atol=1e-4, rtol=0)
                self.hits.append(cache_stats(self.model).prefix_hit_tokens)
                del ids, logits
                gc.collect()  # the returned cache (return_dict_in_generate) goes back to the pool
        finally:
            disable_paged_cache(self.model)
        return self.hits


@pytest.mark.parametrize("decoding", [
    dict(max_new_tokens=6),
    dict(max_new_tokens=6, num_beams=3),
    dict(max_new_tokens=6, num_beams=2, num_return_sequences=2),
    dict(max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=7),
], ids=["greedy", "beams", "beams-2-returned", "sampling"])
def test_a_hit_on_part_of_a_prompt_matches_stock(model, decoding):
    questions = [_tokens(5, seed) for seed in (1, 2, 3)]
    calls = [dict(ids=torch.cat([CONTEXT, q], 1), **decoding) for q in questions]
    hits = _Calls(model, calls).run()
    assert hits == [0, 40, 40]  # 43 context tokens: 5 full blocks of 8, then the question


@pytest.mark.parametrize("length", [45, 48], ids=["partial-last-block", "multiple-of-block"])
def test_a_repeated_prompt_reuses_all_but_its_last_block(model, length):
    prompt = _tokens(length, 4)
    hits = _Calls(model, [dict(ids=prompt, max_new_tokens=5)] * 2 + [dict(ids=prompt, max_new_tokens=5,
                                                                          num_beams=3)]).run()
    # 45 tokens: 5 full blocks and a partial one, all full blocks reused. 48: 6 full blocks, the last recomputed
    # for the logits of the prompt's last token.
    assert hits == [0, 40, 40]


def test_rows_with_different_cached_lengths_take_the_shortest(model):
    long_row, short_row = _tokens(45, 5), _tokens(37, 6)
    first = _left_padded(long_row, short_row)
    # The same padding; the long row changes after 43 tokens (5 cached blocks), the short one after 20 of its own
    # tokens (8 padding + 20 = 28: 3 cached blocks).
    second = _left_padded(torch.cat([long_row[:, :43], _tokens(2, 7)], 1),
                          torch.cat([short_row[:, :20], _tokens(17, 8)], 1))
    calls = [dict(ids=ids, mask=mask, max_new_tokens=6) for ids, mask in (first, second)]
    calls.append(dict(ids=second[0], mask=second[1], max_new_tokens=6, num_beams=2))
    hits = _Calls(model, calls).run()
    assert hits == [0, 2 * 24, 2 * 40]  # per computed row: 3 blocks, then the second prompts' own 5 blocks


def test_padding_is_part_of_the_key(model):
    """A prompt cached unpadded is not served to the same tokens left-padded (their positions and masks differ)."""
    prompt = _tokens(40, 9)
    padded = _left_padded(prompt, _tokens(44, 10))
    hits = _Calls(model, [dict(ids=prompt, max_new_tokens=4), dict(ids=padded[0], mask=padded[1],
                                                                   max_new_tokens=4)]).run()
    assert hits == [0, 0]


def test_identical_rows_and_hits_together(model):
    question = _tokens(6, 11)
    prompt = torch.cat([CONTEXT, question], 1)
    calls = [dict(ids=prompt, max_new_tokens=5),
             dict(ids=prompt.repeat(3, 1), max_new_tokens=5, do_sample=True, seed=3),
             dict(ids=torch.cat([prompt, torch.cat([CONTEXT, _tokens(6, 12)], 1)]), max_new_tokens=5, num_beams=2)]
    hits = _Calls(model, calls).run()
    assert hits == [0, 48, 2 * 40]  # the 3 equal rows computed once; then the shorter hit of two rows


def test_after_evictions(model):
    """A budget of a few blocks: each new prompt evicts the least recently used ones, deepest first, and a later
    call hits what is left of its prefix."""
    pool = KVPool(max_cache_bytes=10 * BLOCK * 2 * 2 * 2 * 16 * 4)  # 10 blocks of this model
    a, b = _tokens(40, 13), _tokens(40, 14)
    calls = [dict(ids=torch.cat([a, _tokens(3, 15)], 1), max_new_tokens=4),
             dict(ids=torch.cat([b, _tokens(3, 16)], 1), max_new_tokens=4),
             dict(ids=torch.cat([a, _tokens(3, 17)], 1), max_new_tokens=4),
             dict(ids=torch.cat([b, _tokens(3, 18)], 1), max_new_tokens=4, num_beams=2)]
    hits = _Calls(model, calls, pool=pool).run()
    stats = pool.stats()
    assert stats.evictions > 0 and stats.bytes_held <= pool.max_cache_bytes
    assert hits[0] == hits[1] == 0 and 0 < hits[2] < 40 and 0 < hits[3] < 40


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_compressed_blocks_after_a_hit_match_the_call_without_a_pool(model, kv_cache_dtype):
    """Cached blocks are kept compressed: a hit reads what the same call without a pool reads (exactly)."""
    prompts = [torch.cat([CONTEXT, _tokens(5, seed)], 1) for seed in (1, 2)]
    enable_paged_cache(model, kv_cache_dtype=kv_cache_dtype, block_size=BLOCK)
    alone = [_generate(model, prompt, max_new_tokens=6, num_beams=2) for prompt in prompts]
    enable_paged_cache(model, kv_cache_dtype=kv_cache_dtype, block_size=BLOCK, pool=KVPool())
    try:
        for prompt, (ids, logits) in zip(prompts, alone):
            pooled_ids, pooled_logits = _generate(model, prompt, max_new_tokens=6, num_beams=2)
            assert torch.equal(pooled_ids, ids) and torch.equal(pooled_logits, logits)
        assert cache_stats(model).prefix_hit_tokens == 40
    finally:
        disable_paged_cache(model)
