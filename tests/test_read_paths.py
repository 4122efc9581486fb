"""How attention reads the rows' K/V on the PyTorch path: in place while the rows' blocks are laid out regularly,
gathered through the block tables otherwise; the tokens are stock's either way."""

import numpy as np
import pytest
import torch

import paged_generate.attention.dispatch as attention_module
import paged_generate.attention.stock as stock_module
from helpers import generate_both
from paged_generate import PagedCache, disable_paged_cache, enable_paged_cache
from paged_generate.blocks.tables import NO_COPIES
from paged_generate.cache import paged_read_of
from paged_generate.layout import gather_rows as gather_kv
from paged_generate.step import PagedStep
from paged_generate.patches.compat import CACHE_KWARG
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def keys_seen(monkeypatch):
    """The K tensors the model handed the plugin's attention function ("entry": enable_paged_cache registers the
    module's function, patched here), whether each came with a paged read, i.e. was a layer's pools ("pools"), and
    the K tensors the attention itself was computed on: stock's function, or SDPA with packed query heads for an fp32
    decode step ("stock")."""
    seen = {"entry": [], "pools": [], "stock": []}

    def recording_entry(module, query, key, *args, **kwargs):
        seen["entry"].append(key)
        seen["pools"].append(paged_read_of(key) is not None)
        return entry(module, query, key, *args, **kwargs)

    def recording_stock(implementation, module, query, key, *args, **kwargs):
        seen["stock"].append(key)
        return stock(implementation, module, query, key, *args, **kwargs)

    def recording_packed(module, query, key, *args, **kwargs):
        seen["stock"].append(key)
        return packed(module, query, key, *args, **kwargs)

    entry = attention_module.paged_attention_forward
    stock = stock_module.stock_attention
    packed = attention_module.packed_decode_attention
    monkeypatch.setattr(attention_module, "paged_attention_forward", recording_entry)
    monkeypatch.setattr(stock_module, "stock_attention", recording_stock)
    monkeypatch.setattr(attention_module, "stock_attention", recording_stock)
    monkeypatch.setattr(attention_module, "packed_decode_attention", recording_packed)
    # The plain-K/V shortcut of the SDPA entry calls transformers' function directly.
    monkeypatch.setattr(attention_module, "sdpa_attention_forward",
                        lambda module, query, key, *args, **kwargs: recording_stock("sdpa", module, query, key, *args,
                                                                                    **kwargs))
    return seen


def _generate_matching_stock(model, cache, input_ids, seed: int = 0, **kwargs):
    """`model.generate` through `cache` with the plugin on; asserts stock gives the same tokens."""
    enable_paged_cache(model)
    try:
        torch.manual_seed(seed)
        paged = model.generate(input_ids, pad_token_id=0, **kwargs, **{CACHE_KWARG: cache})
    finally:
        disable_paged_cache(model)
    torch.manual_seed(seed)
    assert torch.equal(paged, model.generate(input_ids, pad_token_id=0, **kwargs))
    return paged


def _reads_pool(key: torch.Tensor, cache: PagedCache) -> bool:
    pools = {layer.keys.untyped_storage().data_ptr() for layer in cache.layers}
    return key.untyped_storage().data_ptr() in pools


def _keep_pools(cache: PagedCache) -> None:
    # Pools sized up front never grow (a grown pool is a new tensor), and generate() releases them at the end of a
    # call unless told otherwise: the test can then compare storages.
    cache.allocator.grow(32)
    cache.release = cache.stats


def test_a_lone_row_reaches_attention_as_views_of_the_pool(model, keys_seen):
    input_ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = PagedCache.from_model(model)
    _keep_pools(cache)
    _generate_matching_stock(model, cache, input_ids, max_new_tokens=30, min_new_tokens=30)
    # The layer hands attention each row's K as a view of its pool: no gather, no block tables to read.
    assert len(keys_seen["entry"]) == 30 * model.config.num_hidden_layers
    for key, pools in zip(keys_seen["entry"], keys_seen["pools"]):
        assert _reads_pool(key, cache) and key.shape[0] == 1 and not pools


def test_scattered_blocks_are_gathered_and_give_stock_tokens(model, keys_seen):
    cache = PagedCache.from_model(model)
    _keep_pools(cache)
    # Hand out and free every block one by one in a shuffled order: the free list then gives a row scattered blocks.
    for block in np.random.default_rng(0).permutation(cache.allocator.allocate(32)):
        cache.allocator.decref(np.array([block]))
    input_ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(1))
    _generate_matching_stock(model, cache, input_ids, max_new_tokens=30, min_new_tokens=30)
    assert cache.tables.tables.shape == (1, 5) and cache.tables.tables.tolist() != [[0, 1, 2, 3, 4]]
    # Attention gets the pools with the step and hands stock's function K gathered through the tables.
    assert all(keys_seen["pools"])
    assert keys_seen["stock"] and not any(_reads_pool(key, cache) for key in keys_seen["stock"])


def test_regular_rows_side_by_side_are_read_in_place(model, keys_seen):
    # Three prompts (no beams, nothing shared): each row gets its own consecutive run of a fresh pool.
    input_ids = torch.randint(3, 90, (3, 20), generator=torch.Generator().manual_seed(2))
    cache = PagedCache.from_model(model)
    _keep_pools(cache)
    _generate_matching_stock(model, cache, input_ids, max_new_tokens=10, min_new_tokens=10)
    assert cache.tables.tables.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert all(_reads_pool(key, cache) and not pools for key, pools in zip(keys_seen["entry"], keys_seen["pools"]))


@pytest.mark.parametrize("from_model", [True, False], ids=["from_model", "bare"])
def test_sliding_window_layers_past_the_window_take_the_cutting_path(from_model, keys_seen):
    # Mistral's window is 24: stock's cache keeps the last 23 tokens for the attention, so past that point the
    # paged rows go through the path that cuts them the same way. A cache built without the model cannot know the
    # windows and always takes that path.
    model = tiny_model("mistral")
    input_ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=True)
    cache = PagedCache.from_model(model) if from_model else PagedCache(num_layers=model.config.num_hidden_layers)
    _generate_matching_stock(model, cache, input_ids, **kwargs)
    layers = model.config.num_hidden_layers
    as_views = [not pools for pools in keys_seen["pools"]]
    past_lens = [0] * layers + [12 + step for step in range(29) for _ in range(layers)]  # prompt, then decode steps
    if from_model:
        assert as_views == [past_len < 24 for past_len in past_lens]
    else:
        assert not any(as_views)
    assert max(key.shape[2] for key in keys_seen["stock"]) == 24  # 23 past tokens + the new one, as stock's cache


def test_rows_spaced_wider_than_their_runs_are_viewed_within_the_pool():
    # Rows holding blocks 0, 5 and 10 are regular (stride 5) though each holds one block; a pool of 11 blocks ends
    # with the last row's block, so a view reaching 5 blocks per row would run past it.
    tables = np.array([[0], [5], [10]])
    step = PagedStep(past_len=11, query_len=1, block_size=16, tables=tables, copies=NO_COPIES, pool_blocks=11)
    pool = torch.randn(11, 16, 2, 8)
    assert step.row_layout == (0, 5) and step.reads_rows_in_place
    assert torch.equal(step.rows_view(pool)[:, :, :12], gather_kv(pool, torch.from_numpy(tables), 12))


def test_prompts_sharing_nothing_grow_in_runs_and_stay_views(model, keys_seen):
    # generate() tells the cache how long rows will grow when nothing is shared; each row then keeps a run of
    # blocks, instead of rows taking fresh blocks in turn and interleaving.
    input_ids = torch.randint(3, 90, (3, 20), generator=torch.Generator().manual_seed(5))
    stock, paged, stats = generate_both(model, input_ids=input_ids, max_new_tokens=40, min_new_tokens=40,
                                        pad_token_id=0)
    assert torch.equal(stock, paged)
    assert stats.peak_blocks == 3 * -(-59 // stats.block_size)  # 59 tokens per row: their blocks, no more held
    assert len(keys_seen["entry"]) == 40 * model.config.num_hidden_layers
    assert not any(keys_seen["pools"])


def test_rows_outgrowing_their_runs_fall_back_to_gathering(model, keys_seen):
    input_ids = torch.randint(3, 90, (3, 20), generator=torch.Generator().manual_seed(6))
    cache = PagedCache.from_model(model)
    cache.expected_seq_len = 32  # runs of 2 blocks; the rows grow to 4
    _keep_pools(cache)
    _generate_matching_stock(model, cache, input_ids, max_new_tokens=40, min_new_tokens=40)
    assert cache.tables.tables[:, :2].tolist() == [[0, 1], [2, 3], [4, 5]]
    as_views = [not pools for pools in keys_seen["pools"]]
    assert any(as_views) and not all(as_views)
    assert cache.allocator.num_used == 3 * 4
