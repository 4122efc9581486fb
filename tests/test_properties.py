"""Stateful property tests: PagedCache against a dense per-row reference under random cache operations.

Caches storing full blocks compressed (`kv_cache_dtype` "int8" / "fp8") run the same machine; their reference
quantizes and dequantizes each block of every row as it fills (`quantize.py`'s functions), so rows read must still
equal it exactly.

Profiles: `ci` (default) and `thorough` (`HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py`).
"""

import os

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged_generate import OutOfBlocksError, PagedCache
from paged_generate.cache import paged_read_of
from paged_generate.layout import gather_rows as gather_kv
from paged_generate.quantize import dequantize_blocks, quantize_blocks

settings.register_profile(
    "ci", max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=3000, stateful_step_count=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NUM_LAYERS, HEADS, HEAD_DIM = 2, 2, 3
MAX_ROWS = 8
OPERATIONS = {"count": 0}


class PagedCacheMachine(RuleBasedStateMachine):
    KV_CACHE_DTYPES = ["auto"]

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        max_blocks=st.one_of(st.none(), st.integers(4, 40)),
        rows=st.integers(1, 4),
        expected_seq_len=st.one_of(st.none(), st.integers(1, 24)),
        data=st.data(),
    )
    def start(self, block_size, max_blocks, rows, expected_seq_len, data):
        kv_cache_dtype = data.draw(st.sampled_from(self.KV_CACHE_DTYPES))
        self.cache = PagedCache(num_layers=NUM_LAYERS, block_size=block_size, max_blocks=max_blocks,
                                kv_cache_dtype=kv_cache_dtype)
        self.kv_cache_dtype = kv_cache_dtype
        # As generate() sets them: rows placed apart to grow in runs, and layers without a sliding window, whose
        # rows can reach attention as views of the pools.
        self.cache.expected_seq_len = expected_seq_len
        for layer in self.cache.layers:
            layer.set_stock_window(None)
        self.rows = rows
        # reference[layer] = (K, V) each [rows, seq_len, heads, head_dim]
        self.reference = [(torch.zeros(rows, 0, HEADS, HEAD_DIM),) * 2 for _ in range(NUM_LAYERS)]
        self.counter = 0

    def _fresh(self, rows, tokens):
        self.counter += 1
        generator = torch.Generator().manual_seed(self.counter)
        return torch.randn(rows, HEADS, tokens, HEAD_DIM, generator=generator)

    @rule(tokens=st.integers(1, 5))
    def append(self, tokens):
        OPERATIONS["count"] += 1
        shared_before = self._snapshot_shared_blocks()
        new = [(self._fresh(self.rows, tokens), self._fresh(self.rows, tokens)) for _ in range(NUM_LAYERS)]
        try:
            returned = []
            for layer, (k, v) in enumerate(new):
                keys, values = self.cache.update(k, v, layer)
                returned.append((keys, values, paged_read_of(keys)))
        except OutOfBlocksError:
            assert all(layer.num_written == self.cache.get_seq_length() for layer in self.cache.layers)
            return
        old_len = self.reference[0][0].shape[1]
        self.reference = [
            (self._compress(torch.cat([rk, k.transpose(1, 2)], 1), old_len),
             self._compress(torch.cat([rv, v.transpose(1, 2)], 1), old_len))
            for (rk, rv), (k, v) in zip(self.reference, new)
        ]
        # What attention gets: the pools with the step, or every row's K/V [rows, heads, seq_len, head_dim] as views;
        # compressed pools are read dequantized, as attention's PyTorch path reads them.
        for (keys, values, read), (ref_k, ref_v) in zip(returned, self.reference):
            if read is None:
                assert torch.equal(keys.transpose(1, 2), ref_k) and torch.equal(values.transpose(1, 2), ref_v)
            elif self.kv_cache_dtype != "auto":
                read_k, read_v = read.rows()
                assert torch.equal(read_k.transpose(1, 2), ref_k) and torch.equal(read_v.transpose(1, 2), ref_v)
        # Blocks shared before and after the step were not written: writes go to each row's exclusive tail.
        for layer, blocks, keys in shared_before:
            still_shared = torch.from_numpy(self.cache.allocator.ref_counts[blocks.numpy()] > 1)
            after = self.cache.layers[layer].keys.view(torch.uint8)[blocks]
            assert torch.equal(after[still_shared], keys[still_shared]), "a write landed in a shared block"

    @precondition(lambda self: self.rows * 3 <= MAX_ROWS)
    @rule(repeats=st.integers(1, 3))
    def fork(self, repeats):
        OPERATIONS["count"] += 1
        self.cache.batch_repeat_interleave(repeats)
        self.rows *= repeats
        self.reference = [(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in self.reference]

    @rule(data=st.data())
    def reorder(self, data):
        OPERATIONS["count"] += 1
        indices = data.draw(st.lists(st.integers(0, self.rows - 1), min_size=self.rows, max_size=self.rows))
        self._select(indices, self.cache.reorder_cache)

    @rule(data=st.data())
    def select(self, data):
        OPERATIONS["count"] += 1
        indices = data.draw(st.lists(st.integers(0, self.rows - 1), min_size=1, max_size=MAX_ROWS, unique=True))
        self._select(sorted(indices), self.cache.batch_select_indices)

    def _select(self, indices, method):
        method(torch.tensor(indices))
        self.rows = len(indices)
        self.reference = [(k[indices], v[indices]) for k, v in self.reference]

    @precondition(lambda self: self.cache.get_seq_length() > 0)
    @rule(data=st.data())
    def crop(self, data):
        OPERATIONS["count"] += 1
        remove = data.draw(st.integers(1, self.cache.get_seq_length()))
        self.cache.crop(-remove)
        new_len = self.cache.get_seq_length()
        self.reference = [(k[:, :new_len], v[:, :new_len]) for k, v in self.reference]

    @rule()
    def reset(self):
        OPERATIONS["count"] += 1
        self.cache.reset()
        self.reference = [(k[:, :0], v[:, :0]) for k, v in self.reference]

    def _compress(self, rows, old_len):
        """rows [rows, seq_len, heads, head_dim] with the blocks filled since `old_len` tokens quantized and
        dequantized, as the cache stores them (rows sharing a block hold the same values, so row by row is the same)."""
        if self.kv_cache_dtype == "auto":
            return rows
        bs = self.cache.block_size
        rows = rows.clone()
        for col in range(old_len // bs, rows.shape[1] // bs):
            block = rows[:, col * bs : (col + 1) * bs]
            rows[:, col * bs : (col + 1) * bs] = dequantize_blocks(*quantize_blocks(block, self.kv_cache_dtype),
                                                                  rows.dtype)
        return rows

    def _snapshot_shared_blocks(self):
        """(layer, block ids referenced more than once, their K) before a write."""
        allocator = self.cache.allocator
        shared = np.flatnonzero(allocator.ref_counts > 1)
        if len(shared) == 0:
            return []
        blocks = torch.from_numpy(shared)
        # As bytes: float8 pools have no torch.equal.
        return [(i, blocks, layer.keys.view(torch.uint8)[blocks].clone()) for i, layer in enumerate(self.cache.layers)
                if layer.is_initialized and layer.keys.shape[0] > int(shared.max())]

    @invariant()
    def rows_read_through_tables_equal_reference(self):
        seq_len = self.cache.get_seq_length()
        if seq_len == 0 or not self.cache.layers[0].is_initialized:
            return
        tables = torch.from_numpy(self.cache.tables.tables).to(torch.int32)
        assert tables.shape[0] == self.rows
        for layer, (ref_k, ref_v) in zip(self.cache.layers, self.reference):
            if self.kv_cache_dtype == "auto":
                keys, values = gather_kv(layer.keys, tables, seq_len), gather_kv(layer.values, tables, seq_len)
            else:
                keys, values = self._compressed_rows(layer, seq_len)
            assert torch.equal(keys.transpose(1, 2), ref_k) and torch.equal(values.transpose(1, 2), ref_v)

    def _compressed_rows(self, layer, seq_len):
        """Every row's K and V [rows, heads, seq_len, head_dim] read through the current tables and slots: full blocks
        dequantized, the partial block from its slot."""
        tables, storage, bs = self.cache.tables.tables, layer.storage, self.cache.block_size
        num_full, rest = divmod(seq_len, bs)
        full = torch.from_numpy(tables[:, :num_full].reshape(-1))
        out = []
        for pool, scales, partial in ((storage.keys, storage.key_scales, storage.partial_keys),
                                      (storage.values, storage.value_scales, storage.partial_values)):
            rows = dequantize_blocks(pool[full], scales[full], storage.dtype)
            rows = rows.view(self.rows, num_full * bs, HEADS, HEAD_DIM)
            if rest:
                slots = torch.from_numpy(self.cache.partial.slot_of[tables[:, num_full]])
                assert (slots >= 0).all(), "a partial block without a slot"
                rows = torch.cat([rows, partial[slots, :rest]], 1)
            out.append(rows.transpose(1, 2))
        return out

    @invariant()
    def counts_equal_table_references_and_free_list_partitions_pool(self):
        allocator = self.cache.allocator
        references = np.bincount(self.cache.tables.tables.ravel(), minlength=allocator.capacity)
        np.testing.assert_array_equal(allocator.ref_counts, references)
        free = allocator._free_stack[: allocator.num_free].tolist()
        assert len(set(free)) == len(free)
        assert set(free) == set(np.flatnonzero(references == 0).tolist())
        if allocator.max_blocks is not None:
            assert allocator.capacity <= allocator.max_blocks

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.release()
            assert self.cache.allocator.num_used == 0


class CompressedPagedCacheMachine(PagedCacheMachine):
    """The same operations on a cache storing full blocks compressed."""

    KV_CACHE_DTYPES = ["int8", "fp8"]


TestPagedCache = PagedCacheMachine.TestCase
TestCompressedPagedCache = CompressedPagedCacheMachine.TestCase


class _Model:
    """What a pool keys a model's blocks by (its identity and dtype), without a model."""

    dtype = torch.float32


class PrefixPoolMachine(RuleBasedStateMachine):
    """Calls on a `KVPool` with prefix caching, driven as generate() drives them: begin with the cached blocks of a
    prompt (a hit), compute the rest, leave the prompt's full blocks cached (an insert), decode, release; meanwhile
    caches kept open (blocks not evictable), a budget forcing evictions, `clear` and `trim`. Each token's K/V is a
    function of the tokens up to it, so a cached block serving a prompt must hold exactly what computing it gives."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), budget=st.one_of(st.none(), st.integers(6, 40)),
                data=st.data())
    def start(self, block_size, budget, data):
        from paged_generate import KVPool

        self.pool = KVPool(max_cache_bytes=budget)
        self.model = _Model()
        self.space = self.pool._space_of(self.model, block_size, "auto", 1)  # 1 byte a block: the budget in blocks
        self.block_size = block_size
        # A few stems that prompts begin with, so that prompts share prefixes of every length.
        self.stems = [data.draw(st.lists(st.integers(3, 6), min_size=1, max_size=12)) for _ in range(3)]
        self.open = []  # (cache, token rows) of calls kept open

    def _kv(self, layer, prefix):
        """K or V [heads, head_dim] of the last token of `prefix` at `layer`."""
        generator = torch.Generator().manual_seed(hash((layer, tuple(prefix))) % (2**31))
        return torch.randn(2, HEADS, HEAD_DIM, generator=generator)

    def _rows_kv(self, layer, rows, start, end):
        """[num_rows, heads, end - start, head_dim] K and V of rows' tokens start..end-1."""
        kv = torch.stack([torch.stack([self._kv(layer, row[: p + 1]) for p in range(start, end)], 2) for row in rows])
        return kv[:, 0], kv[:, 1]

    def _new_cache(self):
        from paged_generate.pooled_cache import PooledCache

        cache = PooledCache(space=self.space, prefix_caching=True, num_layers=NUM_LAYERS, block_size=self.block_size)
        for layer in cache.layers:
            layer.set_stock_window(None)
        self.space.caches.add(cache)
        return cache

    def _forward(self, cache, rows, start):
        """Compute rows' tokens from `start` on, as a model's forward would (planned by the pool first)."""
        end = len(rows[0])
        cache.enter_forward(len(rows), end - start)
        try:
            for layer in range(NUM_LAYERS):
                cache.update(*self._rows_kv(layer, rows, start, end), layer)
        finally:
            cache.leave_forward()

    @rule(stem=st.integers(0, 2), cut=st.integers(0, 12), tails=st.lists(st.lists(st.integers(3, 6), max_size=6),
                                                                          min_size=1, max_size=3),
          decode=st.integers(0, 3), keep_open=st.booleans())
    def call(self, stem, cut, tails, decode, keep_open):
        from paged_generate.patches.prefix_hits import PromptKeys

        OPERATIONS["count"] += 1
        base = self.stems[stem][:cut]
        rows = [base + tail for tail in tails]
        width = max(len(row) for row in rows)
        rows = [[3] * (width - len(row)) + row for row in rows]  # one length, as generate() pads
        if width == 0:
            return
        hits_before = self.pool.stats().hits
        cache = self._new_cache()
        try:
            fields = np.stack([np.array(rows), np.ones((len(rows), width)), np.tile(np.arange(width), (len(rows), 1))],
                              -1).astype(np.int64)
            keys = PromptKeys(fields, self.block_size)
            cached = cache.attach_prefix(keys.reusable)
            assert cached % self.block_size == 0 and cached < width
            assert self.pool.stats().hits - hits_before == len(rows) * cached // self.block_size
            self._forward(cache, rows, cached)
            self._check_rows(cache, rows)  # the hit's blocks hold what computing them gives
            cache.cache_prompt(keys.full)
            for step in range(decode):
                rows = [row + [3 + (step + i) % 4] for i, row in enumerate(rows)]
                self._forward(cache, rows, len(rows[0]) - 1)
            self._check_rows(cache, rows)
        except OutOfBlocksError:
            assert self.pool.max_cache_bytes is not None
            cache.release()
            return
        if keep_open and len(self.open) < 3:
            self.open.append((cache, rows))
        else:
            cache.release()

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release_open(self, data):
        OPERATIONS["count"] += 1
        cache, rows = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        self._check_rows(cache, rows)
        cache.release()

    @rule()
    def clear(self):
        OPERATIONS["count"] += 1
        self.pool.clear()
        assert self.space.index.num_cached == 0
        held = [c.tables.tables.ravel() for c, _ in self.open]  # open calls may share blocks a hit gave them
        assert self.space.allocator.num_used == (len(np.unique(np.concatenate(held))) if held else 0)

    @rule()
    def trim(self):
        OPERATIONS["count"] += 1
        self.pool.trim()
        assert self.space.allocator.capacity == self.space.allocator.highest_used() + 1

    def _check_rows(self, cache, rows):
        seq_len = cache.get_seq_length()
        assert seq_len == len(rows[0])
        tables = torch.from_numpy(cache.tables.tables).to(torch.int32)
        for index, layer in enumerate(cache.layers):
            keys, values = self._rows_kv(index, rows, 0, seq_len)
            assert torch.equal(gather_kv(layer.keys, tables, seq_len), keys)
            assert torch.equal(gather_kv(layer.values, tables, seq_len), values)

    @invariant()
    def counts_are_the_open_calls_and_the_index(self):
        if not hasattr(self, "space"):
            return
        allocator, index = self.space.allocator, self.space.index
        references = np.zeros(allocator.capacity, dtype=np.int64)
        for cache, _ in self.open:
            references += np.bincount(cache.tables.tables.ravel(), minlength=allocator.capacity)
        cached = index.cached_blocks()
        references[cached] += 1
        np.testing.assert_array_equal(allocator.ref_counts, references)
        assert allocator.num_used == np.count_nonzero(references)
        if self.pool.max_cache_bytes is not None:
            assert self.pool.stats().bytes_held <= self.pool.max_cache_bytes

    @invariant()
    def every_cached_block_holds_its_tokens_kv(self):
        """Whatever was evicted, trimmed or resized, a cached block holds the K/V of the tokens its key chain names."""
        if not hasattr(self, "space"):
            return
        index, storage = self.space.index, self.space.storage
        for entry, block in index._block.items():
            chain, parent = [], entry
            while parent:
                parent, key = index._parent_key[parent]
                chain.insert(0, np.frombuffer(key, dtype=np.int64).reshape(self.block_size, 3)[:, 0].tolist())
            tokens = sum(chain, [])
            for layer, tensors in storage.items():
                # K and V fused [capacity, block_size, 2, heads, head_dim] (the PyTorch path), or a pool each
                keys, values = (tensors[0][:, :, 0], tensors[0][:, :, 1]) if len(tensors) == 1 else tensors
                expected = self._rows_kv(layer, [tokens], len(tokens) - self.block_size, len(tokens))
                assert torch.equal(keys[block], expected[0][0].transpose(0, 1))
                assert torch.equal(values[block], expected[1][0].transpose(0, 1))

    def teardown(self):
        if hasattr(self, "pool"):
            for cache, _ in self.open:
                cache.release()
            self.pool.clear()
            assert self.pool.stats().blocks_held == 0


TestPrefixPool = PrefixPoolMachine.TestCase


def test_report_operation_count():
    # Runs after the machine (file order): the number of cache operations this run exercised.
    print(f"\nhypothesis exercised {OPERATIONS['count']} cache operations")
    assert OPERATIONS["count"] > 0
