"""`enable_paged_cache(max_cache_bytes=...)`: a call holding at most that many bytes of K/V completes, with stock's
tokens; one needing more fails with `OutOfBlocksError` naming the cap, frees its blocks and leaves the model usable.
Compressed blocks count at their compressed size, scales included."""

import pytest
import torch

from paged_generate import OutOfBlocksError, cache_stats, capture_caches, disable_paged_cache, enable_paged_cache
from tiny_models import tiny_model

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _call(model, **kwargs):
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (2, 13), generator=torch.Generator().manual_seed(1))
    kwargs = dict(dict(max_new_tokens=18, min_new_tokens=18), **kwargs)
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)


def _peak(model, kv_cache_dtype, **kwargs):
    """(tokens, figures) of the call uncapped."""
    enable_paged_cache(model, block_size=BLOCK_SIZE, kv_cache_dtype=kv_cache_dtype)
    try:
        return _call(model, **kwargs), cache_stats(model)
    finally:
        disable_paged_cache(model)


CALLS = {"beams": dict(num_beams=4), "samples": dict(do_sample=True, num_return_sequences=5)}


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_call_fits_exactly_its_peak_bytes_and_one_byte_less_is_refused(model, kv_cache_dtype, call):
    kwargs = CALLS[call]
    tokens, uncapped = _peak(model, kv_cache_dtype, **kwargs)
    peak = uncapped.peak_kv_bytes
    enable_paged_cache(model, block_size=BLOCK_SIZE, kv_cache_dtype=kv_cache_dtype, max_cache_bytes=peak)
    try:
        assert torch.equal(_call(model, **kwargs), tokens)
        assert cache_stats(model).peak_kv_bytes == peak
        enable_paged_cache(model, block_size=BLOCK_SIZE, kv_cache_dtype=kv_cache_dtype, max_cache_bytes=peak - 1)
        with capture_caches(model) as captured, pytest.raises(OutOfBlocksError, match="max_cache_bytes=") as error:
            _call(model, **kwargs)
        assert error.value.max_cache_bytes == peak - 1 and error.value.needed_bytes > peak - 1
        assert captured.caches[0].allocator.num_used == 0  # nothing leaked
        assert f"max_cache_bytes={peak - 1}" in str(error.value) and "enable_paged_cache" in str(error.value)
        # Still usable, within the same cap, for a call that fits in it.
        assert _call(model, max_new_tokens=2, min_new_tokens=2).shape[1] == 15
        assert cache_stats(model).peak_kv_bytes <= peak - 1
    finally:
        disable_paged_cache(model)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_compressed_blocks_count_at_their_compressed_size(model, kv_cache_dtype):
    """Under a cap below what the call's blocks would hold in the model's dtype, compressed blocks still fit."""
    _, dense = _peak(model, "auto", num_beams=4)
    tokens, compressed = _peak(model, kv_cache_dtype, num_beams=4)
    assert compressed.peak_kv_bytes < 0.6 * dense.peak_kv_bytes  # int8 / fp8 of an fp32 model, partial blocks exact
    enable_paged_cache(model, block_size=BLOCK_SIZE, kv_cache_dtype=kv_cache_dtype,
                       max_cache_bytes=compressed.peak_kv_bytes)
    try:
        assert torch.equal(_call(model, num_beams=4), tokens)
    finally:
        disable_paged_cache(model)
    enable_paged_cache(model, block_size=BLOCK_SIZE, max_cache_bytes=compressed.peak_kv_bytes)
    try:
        with pytest.raises(OutOfBlocksError, match="kv_cache_dtype='int8'"):  # the fix is named
            _call(model, num_beams=4)
    finally:
        disable_paged_cache(model)


def test_the_pools_never_grow_past_the_cap(model):
    _, uncapped = _peak(model, "auto", num_beams=4)
    cap = uncapped.peak_kv_bytes
    enable_paged_cache(model, block_size=BLOCK_SIZE, max_cache_bytes=cap)
    try:
        _call(model, num_beams=4)
        assert cache_stats(model).pool_bytes <= cap
    finally:
        disable_paged_cache(model)


def test_the_cap_applies_to_the_block_size_auto_picks(model):
    """block_size="auto" resolves per call; the cap is the same bytes whatever it picks."""
    enable_paged_cache(model)
    try:
        tokens = _call(model, num_beams=4)
        peak, block_size = cache_stats(model).peak_kv_bytes, cache_stats(model).block_size
        enable_paged_cache(model, max_cache_bytes=peak)
        assert torch.equal(_call(model, num_beams=4), tokens) and cache_stats(model).block_size == block_size
        enable_paged_cache(model, max_cache_bytes=peak - 1)
        with pytest.raises(OutOfBlocksError):
            _call(model, num_beams=4)
    finally:
        disable_paged_cache(model)
