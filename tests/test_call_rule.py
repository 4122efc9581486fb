"""Calls whose rows share too few prompt tokens for paging to pay run on stock's own cache; the others are paged.
Both sides of the rule give stock's tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import sequences
from tiny_models import tiny_model
from transformers import DynamicCache

from paged_generate import PagedCache, cache_stats, capture_caches, disable_paged_cache, enable_paged_cache
from paged_generate import call_rule
from paged_generate.call_rule import paging_pays

PROMPT_LEN, NEW_TOKENS, BEAMS = 12, 6, 3
SHARED_BY_BEAMS = (BEAMS - 1) * PROMPT_LEN  # one prompt, its beams: the prompt computed and held once, not 3 times


@pytest.fixture
def measured_rule(monkeypatch):
    """The rule as users get it (the test suite pages every call otherwise, see conftest.py)."""
    monkeypatch.setattr(call_rule, "SHARED_TOKENS_PER_NEW_TOKEN", 4)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _prompt(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def _both(model, enable_kwargs: dict, **kwargs):
    """(stock output, plugin output, its CacheStats, the paged caches the call kept)."""
    disable_paged_cache(model)
    torch.manual_seed(0)
    stock = model.generate(**kwargs)
    enable_paged_cache(model, **enable_kwargs)
    try:
        with capture_caches(model) as captured:
            torch.manual_seed(0)
            paged = model.generate(**kwargs)
        return stock, paged, cache_stats(model), captured.caches
    finally:
        disable_paged_cache(model)


def _beams(input_ids, **extra):
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), num_beams=BEAMS,
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0, **extra)


@pytest.mark.parametrize("threshold, paged", [(SHARED_BY_BEAMS, True), (SHARED_BY_BEAMS + 1, False)])
def test_both_sides_of_min_shared_tokens(model, threshold, paged):
    stock, out, stats, caches = _both(model, dict(min_shared_tokens=threshold), **_beams(_prompt()))
    assert torch.equal(stock, out)
    assert stats.paged is paged
    assert len(caches) == int(paged)
    if paged:
        assert stats.prefill_rows == 1  # the prompt forward ran once for the three beams
    else:  # stock's cache, all of it: every beam's copy of the prompt
        assert stats.rows == BEAMS and stats.max_seq_len == PROMPT_LEN + NEW_TOKENS - 1
        config = model.config
        fp32_bytes_per_token = 2 * config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers
        assert stats.peak_kv_bytes == stats.dense_kv_bytes == BEAMS * stats.max_seq_len * fp32_bytes_per_token
        assert stats.saving == 0


def test_measured_rule_steps_aside_for_short_calls_and_pages_long_ones(model, measured_rule):
    hidden = model.config.hidden_size
    # Short: beams of a 12-token prompt on a 64-wide model share far too little for 6 new tokens.
    assert not paging_pays(SHARED_BY_BEAMS, NEW_TOKENS, hidden)
    stock, out, stats, caches = _both(model, {}, **_beams(_prompt()))
    assert torch.equal(stock, out) and not stats.paged and not caches
    # Long: 3 beams of a 400-token prompt and 2 new tokens share enough.
    long_prompt = torch.randint(3, 96, (1, 400), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=long_prompt, attention_mask=torch.ones_like(long_prompt), num_beams=BEAMS, max_new_tokens=2,
                  min_new_tokens=2, pad_token_id=0)
    assert paging_pays((BEAMS - 1) * 400, 2, hidden)
    stock, out, stats, caches = _both(model, {}, **kwargs)
    assert torch.equal(stock, out) and stats.paged and stats.prefill_rows == 1


def test_greedy_of_distinct_prompts_runs_on_stocks_cache(model, measured_rule):
    ids = _prompt(batch=2)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=0, return_dict_in_generate=True)
    stock, out, stats, caches = _both(model, {}, **kwargs)
    assert torch.equal(stock.sequences, out.sequences)
    assert not stats.paged and not caches
    assert type(out.past_key_values) is DynamicCache  # the returned cache continues a chat as stock's does


def test_repeated_prompts_count_as_shared(model):
    """Rows repeating a prompt (as TRL's GRPO passes them) share it like beams do."""
    ids = _prompt().repeat(4, 1)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=True,
                  pad_token_id=0)
    stock, out, stats, _ = _both(model, dict(min_shared_tokens=3 * PROMPT_LEN), **kwargs)
    assert torch.equal(stock, out) and stats.paged and stats.prefill_rows == 1
    stock, out, stats, _ = _both(model, dict(min_shared_tokens=3 * PROMPT_LEN + 1), **kwargs)
    assert torch.equal(stock, out) and not stats.paged


@pytest.mark.parametrize("enable_kwargs", [dict(max_cache_bytes=1 << 20), dict(max_blocks=64),
                                           dict(kv_cache_dtype="int8")])
def test_calls_needing_the_paged_cache_are_always_paged(model, measured_rule, enable_kwargs):
    ids = _prompt(batch=2)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=0)
    stock, out, stats, caches = _both(model, enable_kwargs, **kwargs)
    assert stats.paged and len(caches) == 1
    if "kv_cache_dtype" not in enable_kwargs:
        assert torch.equal(stock, out)


def test_a_call_on_stocks_cache_leaves_no_paged_blocks_and_the_model_usable(model, measured_rule):
    enable_paged_cache(model)
    try:
        with capture_caches(model) as captured:
            model.generate(**_beams(_prompt()))
        assert not captured.caches and not cache_stats(model).paged
        enable_paged_cache(model, min_shared_tokens=0)
        with capture_caches(model) as captured:
            out = model.generate(**_beams(_prompt(), return_dict_in_generate=True))
        assert isinstance(out.past_key_values, PagedCache) and cache_stats(model).paged
    finally:
        disable_paged_cache(model)
    disable_paged_cache(model)
    assert torch.equal(sequences(out), model.generate(**_beams(_prompt())))


def test_wider_models_need_fewer_shared_tokens(measured_rule):
    # The saved work per shared token grows as hidden_size^2, the per-step costs do not.
    assert not paging_pays(500, 128, 256) and paging_pays(512, 128, 256)
    assert paging_pays(57, 128, 768) and not paging_pays(56, 128, 768)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_min_shared_tokens_is_refused(model, value, error):
    with pytest.raises(error, match="min_shared_tokens"):
        enable_paged_cache(model, min_shared_tokens=value)
    assert not hasattr(model, "_paged_generate_state")
