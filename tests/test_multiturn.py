"""Multi-turn chat: the cache a call returns (`return_dict_in_generate=True`) keeps its K/V, as stock's does, so the
next call computes only the new tokens; its memory goes when the caller drops it; a call given a cache reports that
call's figures."""

import gc
import weakref

import pytest
import torch

from paged_generate import PagedCache, cache_stats, disable_paged_cache, enable_paged_cache
from paged_generate.layout import gather_rows
from paged_generate.patches.compat import CACHE_KWARG
from tiny_models import left_padded_prompts, tiny_model

TURN_TOKENS = ([7, 8, 9, 10], [11, 12])  # what the user says in turns 2 and 3


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


class _ForwardShapes:
    """The (rows, tokens) of the input ids every forward of the decoder saw."""

    def __init__(self, model):
        self.shapes = []
        self._handle = model.model.register_forward_pre_hook(
            lambda module, args, kwargs: self.shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)

    def remove(self):
        self._handle.remove()


def _rows_of(cache, layer: int = 0):
    """Every row's K [rows, kv_heads, seq_len, head_dim] of a stock `DynamicCache` or a `PagedCache`."""
    if isinstance(cache, PagedCache):
        tables = torch.from_numpy(cache.tables.tables)
        return gather_rows(cache.layers[layer].keys, tables, cache.get_seq_length())
    return cache.layers[layer].keys


def _chat(model, paged: bool):
    """Turn 1: beam search on a prompt, its returned cache cut to the best beam; turns 2 and 3: greedy, each given
    the cache the previous turn returned. Returns each turn's output and the prompt forward's shape per turn."""
    (disable_paged_cache if not paged else enable_paged_cache)(model)
    prompt = torch.randint(3, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    forwards = _ForwardShapes(model)
    try:
        first = model.generate(prompt, num_beams=3, max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True)
        turns, prompt_forwards, figures = [first], [forwards.shapes[0]], []
        cache = first.past_key_values
        cache.batch_select_indices(torch.tensor([0]))  # the best beam (no EOS: the returned one is running beam 0)
        history = first.sequences
        for said in TURN_TOKENS:
            forwards.shapes.clear()
            out = model.generate(torch.cat([history, torch.tensor([said])], 1), max_new_tokens=4, pad_token_id=0,
                                 return_dict_in_generate=True, **{CACHE_KWARG: cache})
            assert out.past_key_values is cache
            turns.append(out)
            prompt_forwards.append(forwards.shapes[0])
            figures.append(cache_stats(model) if paged else None)
            history = out.sequences
    finally:
        forwards.remove()
        disable_paged_cache(model)
    return turns, prompt_forwards, figures


def test_three_turns_compute_only_the_new_tokens_and_match_stock(model):
    stock, stock_forwards, _ = _chat(model, paged=False)
    paged, paged_forwards, figures = _chat(model, paged=True)
    for turn, (expected, got) in enumerate(zip(stock, paged, strict=True), start=1):
        assert torch.equal(expected.sequences, got.sequences), f"turn {turn}"
    # Turn 1: stock runs the prompt forward on the 3 beams, the paged cache once. Turns 2 and 3: only what the cache
    # does not hold yet, the last generated token and what the user said.
    assert stock_forwards[0] == (3, 20) and paged_forwards[0] == (1, 20)
    assert stock_forwards[1:] == paged_forwards[1:] == [(1, 1 + len(TURN_TOKENS[0])), (1, 1 + len(TURN_TOKENS[1]))]
    # The figures of each later turn are that call's: one row, the whole conversation so far.
    for turn_figures, out in zip(figures, paged[1:], strict=True):
        assert turn_figures.rows == 1 and turn_figures.prefill_rows == 1
        assert turn_figures.max_seq_len == out.sequences.shape[1] - 1
        assert turn_figures.peak_blocks == -(-turn_figures.max_seq_len // turn_figures.block_size)


def test_returned_beam_cache_holds_what_stocks_holds(model):
    """A beam search returns the beams' cache (3 rows after the last reorder), with stock's K/V row for row."""
    prompt = torch.randint(3, 90, (2, 18), generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_beams=3, max_new_tokens=5, pad_token_id=0, return_dict_in_generate=True)
    disable_paged_cache(model)
    stock = model.generate(prompt, **kwargs)
    enable_paged_cache(model)
    try:
        paged = model.generate(prompt, **kwargs)
    finally:
        disable_paged_cache(model)
    stock_cache, paged_cache = stock.past_key_values, paged.past_key_values
    assert isinstance(paged_cache, PagedCache) and paged_cache.num_rows == 6
    assert paged_cache.get_seq_length() == stock_cache.get_seq_length() == 18 + 5 - 1
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(_rows_of(paged_cache, layer), _rows_of(stock_cache, layer))


def test_sampled_rows_continue_in_a_second_turn(model):
    input_ids, attention_mask = left_padded_prompts((13, 7))
    said = torch.tensor([[20, 21, 22]] * 4)

    def two_turns():
        torch.manual_seed(5)
        first = model.generate(input_ids, attention_mask=attention_mask, do_sample=True, num_return_sequences=2,
                               max_new_tokens=5, pad_token_id=0, return_dict_in_generate=True)
        mask = torch.cat([attention_mask.repeat_interleave(2, 0), torch.ones(4, 5 + 3, dtype=torch.long)], 1)
        second = model.generate(torch.cat([first.sequences, said], 1), attention_mask=mask, do_sample=True,
                                max_new_tokens=5, pad_token_id=0, **{CACHE_KWARG: first.past_key_values})
        return first.sequences, second

    disable_paged_cache(model)
    stock = two_turns()
    enable_paged_cache(model)
    try:
        paged = two_turns()
        assert cache_stats(model).rows == 4
    finally:
        disable_paged_cache(model)
    assert all(torch.equal(expected, got) for expected, got in zip(stock, paged, strict=True))


def test_returned_cache_is_freed_when_dropped(model):
    enable_paged_cache(model)
    gc.disable()  # freed by reference counting, not left to the cycle collector
    try:
        out = model.generate(torch.randint(3, 90, (1, 20)), num_beams=3, max_new_tokens=6, pad_token_id=0,
                             return_dict_in_generate=True)
        cache = out.past_key_values
        assert cache.allocator.num_used > 0 and cache_stats(model).peak_blocks > 0  # kept, K/V and all
        pools = [weakref.ref(tensor) for layer in cache.layers for tensor in (layer.keys, layer.values)]
        cache_ref = weakref.ref(cache)
        del out, cache
        assert cache_ref() is None and all(pool() is None for pool in pools)
    finally:
        gc.enable()
        disable_paged_cache(model)


def test_a_cache_not_returned_is_released_at_the_end_of_its_call(model):
    from paged_generate import capture_caches

    enable_paged_cache(model)
    try:
        with capture_caches(model) as captured:
            out = model.generate(torch.randint(3, 90, (1, 20)), num_beams=3, max_new_tokens=4, pad_token_id=0,
                                 return_dict_in_generate=True, output_scores=True)
            model.generate(torch.randint(3, 90, (1, 20)), num_beams=3, max_new_tokens=4, pad_token_id=0)
    finally:
        disable_paged_cache(model)
    returned, released = captured.caches
    assert out.past_key_values is returned and returned.allocator.num_used > 0
    assert released.allocator.num_used == 0 and all(layer.keys is None for layer in released.layers)


def test_a_returned_cache_on_a_model_disabled_since_is_refused_clearly(model):
    enable_paged_cache(model)
    out = model.generate(torch.randint(3, 90, (1, 10)), max_new_tokens=3, pad_token_id=0,
                         return_dict_in_generate=True)
    disable_paged_cache(model)
    with pytest.raises(ValueError, match="enable_paged_cache"):
        model.generate(torch.cat([out.sequences, torch.tensor([[5, 6]])], 1), max_new_tokens=2, pad_token_id=0,
                       **{CACHE_KWARG: out.past_key_values})
