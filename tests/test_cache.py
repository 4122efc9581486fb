"""PagedCache inside generate(): prefill once, blocks returned, caps, enable/disable, stats."""

import pytest
import torch

from helpers import generate_both
from paged_generate import (
    OutOfBlocksError,
    PagedCache,
    UnsupportedModelError,
    cache_stats,
    capture_caches,
    disable_paged_cache,
    enable_paged_cache,
    is_paged_cache_enabled,
)
from paged_generate.patches.compat import CACHE_KWARG
from tiny_models import left_padded_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _rows_seen_by_forward(model, **kwargs):
    rows = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kw: rows.append((kw["input_ids"] if kw.get("input_ids") is not None else
                                              kw["inputs_embeds"]).shape[:2]),
        with_kwargs=True,
    )
    try:
        model.generate(**kwargs)
    finally:
        handle.remove()
    return rows


def test_prompt_forward_runs_once_per_distinct_prompt(model):
    input_ids, attention_mask = left_padded_prompts((11, 6))
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=5, num_beams=4)
    disable_paged_cache(model)
    stock_rows = _rows_seen_by_forward(model, **kwargs)
    enable_paged_cache(model)
    try:
        paged_rows = _rows_seen_by_forward(model, **kwargs)
    finally:
        disable_paged_cache(model)
    assert stock_rows[0] == (8, 11)
    assert paged_rows[0] == (2, 11)  # the prompt forward saw 2 rows, not 2 x 4
    assert paged_rows[1:] == stock_rows[1:] == [(8, 1)] * (len(stock_rows) - 1)


def test_blocks_all_free_after_generate_and_pools_dropped(model):
    enable_paged_cache(model)
    try:
        input_ids, attention_mask = left_padded_prompts((20, 9))
        with capture_caches(model) as captured:
            model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=10,
                           num_beams=3)
    finally:
        disable_paged_cache(model)
    (cache,) = captured.caches
    assert cache.allocator.num_used == 0 and cache.allocator.peak_used > 0
    assert all(layer.keys is None for layer in cache.layers)


def test_stats_figures(model):
    input_ids = torch.randint(3, 90, (1, 64))
    _, _, stats = generate_both(model, input_ids=input_ids, max_new_tokens=32, min_new_tokens=32, num_beams=4,
                                pad_token_id=0)
    per_token = 2 * 2 * 16 * 4 * model.config.num_hidden_layers  # K and V, 2 kv heads, head dim 16, fp32
    block = stats.block_size
    assert block == 4 and stats.rows == 4  # block_size="auto": beams whose rows hold at most 256 tokens
    assert stats.dense_kv_bytes == 4 * stats.max_seq_len * per_token
    assert stats.peak_kv_bytes == stats.peak_blocks * block * per_token
    assert stats.pool_bytes >= stats.peak_kv_bytes
    # The prompt's 16 blocks shared by all beams + at most 8 own blocks per beam (+ copies in flight).
    assert stats.peak_blocks <= 16 + 4 * 8 + 4
    assert stats.saving == pytest.approx(1 - stats.peak_kv_bytes / stats.dense_kv_bytes)
    assert stats.saving > 0.4


def test_user_cache_is_respected(model):
    enable_paged_cache(model)
    try:
        from transformers import DynamicCache

        user_cache = DynamicCache(config=model.config)
        input_ids = torch.randint(3, 90, (1, 8))
        out = model.generate(input_ids, max_new_tokens=4, pad_token_id=0, **{CACHE_KWARG: user_cache})
        assert user_cache.get_seq_length() == out.shape[1] - 1
        paged = PagedCache.from_model(model)
        out = model.generate(input_ids, max_new_tokens=4, pad_token_id=0, **{CACHE_KWARG: paged})
        assert paged.get_seq_length() == out.shape[1] - 1 and paged.allocator.num_used > 0
    finally:
        disable_paged_cache(model)


def test_paged_cache_on_a_model_not_enabled_is_refused_clearly(model):
    disable_paged_cache(model)
    cache = PagedCache.from_model(model)
    with pytest.raises(ValueError, match="enable_paged_cache"):
        model.generate(torch.randint(3, 90, (1, 8)), max_new_tokens=2, pad_token_id=0, **{CACHE_KWARG: cache})
    assert cache.allocator.num_used == 0
    enable_paged_cache(model)
    try:
        out = model.generate(torch.randint(3, 90, (1, 8)), max_new_tokens=2, pad_token_id=0,
                             **{CACHE_KWARG: PagedCache.from_model(model)})
        assert out.shape == (1, 10)
    finally:
        disable_paged_cache(model)


def test_use_cache_false_stays_stock(model):
    input_ids = torch.randint(3, 90, (2, 8))
    stock, paged, _ = generate_both(model, input_ids=input_ids, max_new_tokens=6, pad_token_id=0)
    disable_paged_cache(model)
    stock_nocache = model.generate(input_ids, max_new_tokens=6, pad_token_id=0, use_cache=False)
    enable_paged_cache(model)
    try:
        paged_nocache = model.generate(input_ids, max_new_tokens=6, pad_token_id=0, use_cache=False)
    finally:
        disable_paged_cache(model)
    assert torch.equal(stock_nocache, paged_nocache) and torch.equal(stock, paged)


def test_cap_too_small_raises_frees_and_model_still_works(model):
    input_ids = torch.randint(3, 90, (1, 40))
    enable_paged_cache(model, max_blocks=6)
    try:
        with pytest.raises(OutOfBlocksError, match="max_blocks=6") as error:
            model.generate(input_ids, max_new_tokens=30, num_beams=4, pad_token_id=0)
        assert isinstance(error.value, MemoryError) and error.value.needed > 0
        assert cache_stats(model).peak_blocks <= 6
        enable_paged_cache(model, max_blocks=None)
        out = model.generate(input_ids, max_new_tokens=5, num_beams=2, pad_token_id=0)
        assert out.shape == (1, 45)
    finally:
        disable_paged_cache(model)


def test_enable_twice_and_disable_restores_stock(model):
    original_attn = model.config._attn_implementation
    assert enable_paged_cache(model) is model
    enable_paged_cache(model, block_size=8)
    assert is_paged_cache_enabled(model)
    disable_paged_cache(model)
    assert not is_paged_cache_enabled(model)
    assert model.config._attn_implementation == original_attn
    assert "generate" not in model.__dict__ and "_prefill" not in model.__dict__


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(block_size=12), ValueError),
        (dict(block_size=0), ValueError),
        (dict(block_size=512), ValueError),
        (dict(block_size=16.0), TypeError),
        (dict(max_blocks=-1), ValueError),
        (dict(max_blocks="10"), TypeError),
        (dict(max_cache_bytes=0), ValueError),
        (dict(max_cache_bytes=100), ValueError),
        (dict(backend="cuda"), ValueError),
        (dict(backend="triton", block_size=4), ValueError),
    ],
)
def test_bad_settings_are_refused(model, kwargs, error):
    with pytest.raises(error, match="enable_paged_cache"):
        enable_paged_cache(model, **kwargs)
    assert not is_paged_cache_enabled(model)


def test_max_cache_bytes_becomes_a_block_cap(model):
    per_block = 16 * 2 * 2 * 16 * 4 * model.config.num_hidden_layers
    enable_paged_cache(model, block_size=16, max_cache_bytes=10 * per_block + 1)
    try:
        with pytest.raises(OutOfBlocksError, match=f"max_cache_bytes={10 * per_block + 1}") as error:
            model.generate(torch.randint(3, 90, (1, 100)), max_new_tokens=80, num_beams=4, pad_token_id=0)
        assert error.value.max_blocks == 10 and error.value.needed_bytes > 10 * per_block + 1
    finally:
        disable_paged_cache(model)


def test_block_sizes_give_same_tokens(model):
    input_ids, attention_mask = left_padded_prompts((10, 4))
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=12, num_beams=3)
    disable_paged_cache(model)
    stock = model.generate(**kwargs)
    for block_size in (1, 4, 32):
        enable_paged_cache(model, block_size=block_size)
        try:
            assert torch.equal(model.generate(**kwargs), stock)
            assert cache_stats(model).block_size == block_size
        finally:
            disable_paged_cache(model)


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder.*support matrix"):
        enable_paged_cache(t5)
    assert not is_paged_cache_enabled(t5)
