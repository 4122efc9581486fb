"""`KVPool`: one budget for many calls and models, threads, eviction, clear / trim, and the errors of bad settings."""

import copy
import gc
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from paged_generate import KVPool, OutOfBlocksError, PoolStats, cache_stats, disable_paged_cache, enable_paged_cache
from paged_generate.patches.compat import CACHE_KWARG
from tiny_models import tiny_model

BLOCK = 4
# One block of a tiny model over its 2 layers: K and V, 2 KV heads of 16 dims, fp32.
BLOCK_BYTES = BLOCK * 2 * 2 * 2 * 16 * 4


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))


def _spaces(pool):
    return list(pool._spaces)


def _assert_only_cached_blocks_held(pool):
    """After the calls: every block held is a cached one, referenced by the prefix index alone."""
    for space in _spaces(pool):
        cached = space.index.cached_blocks()
        assert space.allocator.num_used == len(cached)
        assert (space.allocator.ref_counts[cached] == 1).all()
        assert space.in_flight == 0


@pytest.fixture()
def models():
    built = [tiny_model(family, seed=i) for i, family in enumerate(("llama", "qwen2", "mistral"))]
    yield built
    for model in built:
        disable_paged_cache(model)


def test_default_has_no_pool_and_reports_no_hits(models):
    model = models[0]
    enable_paged_cache(model)
    model.generate(_tokens(30, 0), max_new_tokens=3)
    assert cache_stats(model).prefix_hit_tokens is None


def test_prefix_caching_without_a_pool_gives_a_private_one(models):
    model, other = models[0], models[1]
    enable_paged_cache(model, prefix_caching=True, block_size=BLOCK, max_blocks=40)
    enable_paged_cache(other, prefix_caching=True, block_size=BLOCK)
    pool = model._paged_generate_state.pool
    assert isinstance(pool, KVPool) and pool is not other._paged_generate_state.pool
    assert pool.max_cache_bytes == 40 * BLOCK_BYTES
    prompt = _tokens(21, 1)
    model.generate(prompt, max_new_tokens=3)
    assert cache_stats(model).prefix_hit_tokens == 0
    model.generate(prompt, max_new_tokens=3)
    assert cache_stats(model).prefix_hit_tokens == 20  # 5 full blocks; the last token's block is recomputed
    stats = pool.stats()
    assert isinstance(stats, PoolStats) and stats.hits == 5 and stats.cached_blocks == 5
    assert stats.bytes_held == 5 * BLOCK_BYTES == stats.blocks_held * BLOCK_BYTES


def test_a_pool_shared_only_for_its_budget_caches_nothing(models):
    model = models[0]
    pool = KVPool(max_cache_bytes=100 * BLOCK_BYTES)
    enable_paged_cache(model, pool=pool, prefix_caching=False, block_size=BLOCK)
    prompt = _tokens(21, 2)
    first = model.generate(prompt, max_new_tokens=3)
    assert torch.equal(model.generate(prompt, max_new_tokens=3), first)
    assert cache_stats(model).prefix_hit_tokens == 0
    assert pool.stats().cached_blocks == pool.stats().blocks_held == 0


@pytest.mark.parametrize("settings, error, words", [
    (dict(pool="pool"), TypeError, "KVPool"),
    (dict(prefix_caching="yes"), TypeError, "prefix_caching"),
    (dict(pool=KVPool(), max_blocks=10), ValueError, "KVPool(max_cache_bytes=...)"),
    (dict(pool=KVPool(), max_cache_bytes=10 << 20), ValueError, "KVPool(max_cache_bytes=...)"),
])
def test_bad_pool_settings_name_the_fix(models, settings, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        enable_paged_cache(models[0], **settings)


@pytest.mark.parametrize("budget", [0, -5, 1.5, True])
def test_a_pool_budget_must_be_a_positive_int(budget):
    with pytest.raises(ValueError, match="max_cache_bytes"):
        KVPool(max_cache_bytes=budget)


def test_models_never_read_each_others_blocks(models):
    """Two models of one shape on one pool, the same prompt: neither hits the other's blocks, each outputs what it
    does alone; the same model under another block size or kv_cache_dtype keeps blocks apart too."""
    llama, other = models[0], tiny_model("llama", seed=5)
    prompt = _tokens(25, 3)
    alone = [model.generate(prompt, max_new_tokens=4) for model in (llama, other)]
    pool = KVPool()
    for model in (llama, other):
        enable_paged_cache(model, pool=pool, block_size=BLOCK)
    for model, expected in zip((llama, other), alone):
        assert torch.equal(model.generate(prompt, max_new_tokens=4), expected)
        assert cache_stats(model).prefix_hit_tokens == 0
    enable_paged_cache(llama, pool=pool, block_size=2 * BLOCK)
    assert torch.equal(llama.generate(prompt, max_new_tokens=4), alone[0])
    assert cache_stats(llama).prefix_hit_tokens == 0
    enable_paged_cache(llama, pool=pool, block_size=BLOCK, kv_cache_dtype="int8")
    llama.generate(prompt, max_new_tokens=4)
    assert cache_stats(llama).prefix_hit_tokens == 0
    disable_paged_cache(other)


def test_changed_weights_drop_the_cached_blocks(models):
    model = models[0]
    stock_model = copy.deepcopy(model)
    prompt = _tokens(25, 4)
    pool = KVPool()
    enable_paged_cache(model, pool=pool, block_size=BLOCK)
    model.generate(prompt, max_new_tokens=3)
    for changed in (model, stock_model):
        with torch.no_grad():
            changed.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    stock = stock_model.generate(prompt, max_new_tokens=3, output_logits=True, return_dict_in_generate=True)
    out = model.generate(prompt, max_new_tokens=3, output_logits=True, return_dict_in_generate=True)
    assert cache_stats(model).prefix_hit_tokens == 0
    assert torch.equal(out.sequences, stock.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(stock.logits), atol=1e-4, rtol=0)


def test_disabling_a_model_drops_its_blocks(models):
    model, other = models[0], models[1]
    pool = KVPool()
    for enabled in (model, other):
        enable_paged_cache(enabled, pool=pool, block_size=BLOCK)
        enabled.generate(_tokens(25, 7), max_new_tokens=3)
    held = pool.stats().bytes_held
    disable_paged_cache(model)
    assert 0 < pool.stats().bytes_held < held
    enable_paged_cache(other, pool=KVPool(), block_size=BLOCK)  # moved to another pool
    assert pool.stats().bytes_held == pool.stats().storage_bytes == 0


def test_out_of_blocks_only_when_nothing_is_evictable(models):
    model = models[0]
    pool = KVPool(max_cache_bytes=12 * BLOCK_BYTES)
    enable_paged_cache(model, pool=pool, block_size=BLOCK)
    for seed in range(4):  # each call evicts what the previous ones cached
        model.generate(_tokens(30, 10 + seed), max_new_tokens=4)
        assert pool.stats().bytes_held <= pool.max_cache_bytes
    assert pool.stats().evictions > 0
    with pytest.raises(OutOfBlocksError, match=r"KVPool\(max_cache_bytes=\.\.\.\)"):
        model.generate(_tokens(30, 20).repeat(2, 1), max_new_tokens=4, do_sample=True, num_return_sequences=2)
    _assert_only_cached_blocks_held(pool)
    model.generate(_tokens(30, 21), max_new_tokens=4)  # still usable


def test_a_returned_cache_holds_its_blocks_until_dropped(models):
    model = models[0]
    pool = KVPool()
    enable_paged_cache(model, pool=pool, block_size=BLOCK)
    out = model.generate(_tokens(22, 5), max_new_tokens=4, return_dict_in_generate=True)
    cached = pool.stats().cached_blocks
    assert pool.stats().blocks_held > cached
    # A later turn continues it, as with stock's cache.
    follow = torch.cat([out.sequences, _tokens(3, 6)], 1)
    returned = out.cache if hasattr(out, "cache") else out.past_key_values
    model.generate(follow, max_new_tokens=2, **{CACHE_KWARG: returned})
    del returned
    del out
    gc.collect()
    pool.stats()  # the bookkeeping frees dropped caches' blocks
    _assert_only_cached_blocks_held(pool)


def test_clear_empties_and_trim_releases_free_storage(models):
    model = models[0]
    pool = KVPool()
    enable_paged_cache(model, pool=pool, block_size=BLOCK)
    for seed in range(3):
        model.generate(_tokens(26, 30 + seed), max_new_tokens=3, num_beams=2)
    before = pool.stats()
    assert before.cached_blocks > 0
    pool.trim()
    trimmed = pool.stats()
    assert trimmed.cached_blocks == before.cached_blocks
    (space,) = _spaces(pool)
    assert trimmed.storage_bytes == (space.allocator.highest_used() + 1) * BLOCK_BYTES
    pool.clear()
    assert pool.stats() == PoolStats(bytes_held=0, blocks_held=0, cached_blocks=0, hits=before.hits,
                                     evictions=before.evictions, storage_bytes=0, max_cache_bytes=None)
    model.generate(_tokens(26, 30), max_new_tokens=3)
    assert cache_stats(model).prefix_hit_tokens == 0


def _reliability_jobs(num_calls: int, seed: int = 0):
    """Calls of 3 models over a few shared contexts: each (model index, prompt, generate kwargs)."""
    rng = random.Random(seed)
    contexts = [_tokens(length, 100 + i) for i, length in enumerate((12, 17, 24))]
    # No sampling: threads share torch's global generator, so a sampled call's draws depend on the others' (sampling
    # after a hit is checked alone, in test_prefix_cache.py).
    decodings = [dict(max_new_tokens=3), dict(max_new_tokens=3, num_beams=2),
                 dict(max_new_tokens=3, num_beams=2, num_return_sequences=2)]
    jobs = []
    for i in range(num_calls):
        context = contexts[rng.randrange(len(contexts))]
        prompt = torch.cat([context, _tokens(rng.randrange(1, 9), 1000 + i)], 1)
        if rng.random() < 0.3:  # a second row, left-padded
            other = torch.cat([contexts[rng.randrange(len(contexts))], _tokens(3, 5000 + i)], 1)
            width = max(prompt.shape[1], other.shape[1])
            ids = torch.zeros(2, width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate((prompt, other)):
                ids[row, width - tokens.shape[1]:], mask[row, width - tokens.shape[1]:] = tokens[0], 1
        else:
            ids, mask = prompt, torch.ones_like(prompt)
        jobs.append((rng.randrange(3), ids, mask, dict(decodings[rng.randrange(len(decodings))])))
    return jobs


def _run(model, ids, mask, decoding):
    return model.generate(ids, attention_mask=mask, pad_token_id=0, **decoding)


@pytest.mark.parametrize("num_calls", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_threads_and_models_on_one_budget(models, num_calls):
    """4 threads x 3 models on a pool too small to cache every prefix: every output equals the call's run alone
    (stock), the budget holds at every forward, and after the calls only cached blocks are held."""
    jobs = _reliability_jobs(num_calls)
    alone = [_run(models[m], ids, mask, decoding) for m, ids, mask, decoding in jobs]
    pool = KVPool(max_cache_bytes=110 * BLOCK_BYTES)
    peaks = []

    def check_budget(module, args, kwargs):  # runs after the pool planned the forward (its hooks come first)
        held = pool.stats().bytes_held
        peaks.append(held)
        assert held <= pool.max_cache_bytes

    hooks = []
    for model in models:
        enable_paged_cache(model, pool=pool, block_size=BLOCK)
        hooks.append(model.register_forward_pre_hook(check_budget, with_kwargs=True))
    try:
        with ThreadPoolExecutor(4) as threads:
            results = list(threads.map(lambda job: _run(models[job[0]], *job[1:]), jobs))
    finally:
        for hook in hooks:
            hook.remove()
    for result, expected in zip(results, alone):
        assert torch.equal(result, expected)
    stats = pool.stats()
    assert max(peaks) <= pool.max_cache_bytes and len(peaks) >= num_calls
    assert stats.hits > 0 and stats.evictions > 0 and stats.cached_blocks > 0
    _assert_only_cached_blocks_held(pool)
    assert len(_spaces(pool)) == 3
    pool.clear()
    stats = pool.stats()
    assert stats.blocks_held == stats.cached_blocks == stats.bytes_held == stats.storage_bytes == 0
    assert all(np.all(space.allocator.ref_counts == 0) for space in _spaces(pool))


def test_assisted_decoding_on_one_pool_matches_stock(models):
    """The target and its assistant share one pool; the assistant's cache, cropped from round to round, may start
    from its cached prompt blocks; the tokens stay stock's."""
    target, assistant = models[0], tiny_model("llama", seed=3)
    prompt = _tokens(30, 8)
    stock = target.generate(prompt, assistant_model=assistant, max_new_tokens=8, do_sample=False)
    pool = KVPool(max_cache_bytes=40 * BLOCK_BYTES)
    for model in (target, assistant):
        enable_paged_cache(model, pool=pool, block_size=BLOCK)
    try:
        for _ in range(2):
            out = target.generate(prompt, assistant_model=assistant, max_new_tokens=8, do_sample=False)
            assert torch.equal(out, stock)
        assert pool.stats().hits > 0
        _assert_only_cached_blocks_held(pool)
    finally:
        disable_paged_cache(assistant)


def test_pooled_calls_are_paged_whatever_the_call_rule(models, monkeypatch):
    """A call sharing nothing across its rows runs on stock's cache by the measured rule (call_rule.py), unless the
    model has a pool: its blocks are what later calls reuse."""
    from paged_generate import call_rule

    monkeypatch.setattr(call_rule, "SHARED_TOKENS_PER_NEW_TOKEN", 4)
    model = models[0]
    prompt = _tokens(25, 9)
    enable_paged_cache(model, block_size=BLOCK)
    model.generate(prompt, max_new_tokens=3)
    assert not cache_stats(model).paged  # the rule holds for this call without a pool
    enable_paged_cache(model, pool=KVPool(), block_size=BLOCK)
    for hits in (0, 24):
        model.generate(prompt, max_new_tokens=3)
        assert cache_stats(model).paged and cache_stats(model).prefix_hit_tokens == hits
