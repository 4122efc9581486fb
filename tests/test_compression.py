"""Compressed KV blocks (`kv_cache_dtype` "int8" / "fp8"): full blocks quantized once when they fill, partial blocks
exact in the model's dtype, crops back into a compressed block, the memory figures, and bad input."""

import numpy as np
import pytest
import torch

import paged_generate.attention.dispatch as dispatch
from paged_generate import PagedCache, cache_stats, capture_caches, disable_paged_cache, enable_paged_cache
from paged_generate import is_paged_cache_enabled
from paged_generate.quantize import dequantize_blocks, quantize_blocks
from tiny_models import left_padded_prompts, tiny_model

HEADS, HEAD_DIM = 2, 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def qdq(tokens, kv_cache_dtype):
    """tokens [rows, block_size, heads, head_dim] as one stored block per row: quantized, then dequantized."""
    return dequantize_blocks(*quantize_blocks(tokens, kv_cache_dtype), tokens.dtype)


class Rows:
    """A one-layer compressing cache driven directly, beside the K it should hold [rows, seq_len, heads, head_dim]
    (values are written alike and checked alike, so K stands for both)."""

    def __init__(self, kv_cache_dtype="int8", block_size=4, rows=1):
        self.cache = PagedCache(num_layers=1, block_size=block_size, kv_cache_dtype=kv_cache_dtype)
        self.kv_cache_dtype, self.block_size = kv_cache_dtype, block_size
        self.expected = torch.zeros(rows, 0, HEADS, HEAD_DIM)
        self.generator = torch.Generator().manual_seed(0)

    @property
    def layer(self):
        return self.cache.layers[0]

    def append(self, tokens):
        """Write `tokens` fresh tokens to every row; the blocks they complete are stored quantized."""
        rows, old_len = self.expected.shape[0], self.expected.shape[1]
        new = torch.randn(rows, HEADS, tokens, HEAD_DIM, generator=self.generator)
        keys, _ = self.cache.update(new, new.clone(), 0)
        self.expected = torch.cat([self.expected, new.transpose(1, 2)], 1)
        bs = self.block_size
        for col in range(old_len // bs, self.expected.shape[1] // bs):
            block = self.expected[:, col * bs : (col + 1) * bs]
            self.expected[:, col * bs : (col + 1) * bs] = qdq(block, self.kv_cache_dtype)
        return new

    def read(self):
        """Every row's K [rows, seq_len, heads, head_dim] as attention's PyTorch path reads it."""
        keys, _ = self.layer.rows(self.cache.current_step)
        return keys.transpose(1, 2)

    def slot_of_row(self, row):
        return int(self.cache.partial.slot_of[self.cache.tables.tables[row, -1]])


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_quantize_roundtrip_error_and_zero_blocks(kv_cache_dtype):
    blocks = torch.randn(5, 16, 2, 32) * torch.tensor([0.01, 1.0, 100.0, 1e4, 0.0])[:, None, None, None]
    q, scales = quantize_blocks(blocks, kv_cache_dtype)
    assert q.dtype == (torch.int8 if kv_cache_dtype == "int8" else torch.float8_e4m3fn)
    assert scales.shape == (5, 2) and torch.isfinite(scales).all() and (scales > 0).all()
    error = (dequantize_blocks(q, scales, torch.float32) - blocks).abs()
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    # int8: half a step of amax / 127; e4m3: 3 mantissa bits, a relative error of at most 2**-4.
    bound = amax / 254 if kv_cache_dtype == "int8" else blocks.abs() / 16 + amax / 448 * 2**-9
    assert (error <= bound * (1 + 1e-6) + 1e-30).all()
    assert torch.equal(dequantize_blocks(q, scales, torch.float32)[4], torch.zeros(16, 2, 32))


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_blocks_are_quantized_when_full_and_partial_tokens_stay_exact(kv_cache_dtype):
    rows = Rows(kv_cache_dtype, rows=2)
    new = rows.append(6)  # block 0 of each row full, 2 tokens in the partial block 1
    storage, tables = rows.layer.storage, rows.cache.tables.tables
    assert storage.keys.dtype == (torch.int8 if kv_cache_dtype == "int8" else torch.float8_e4m3fn)
    q, scales = quantize_blocks(new.transpose(1, 2)[:, :4], kv_cache_dtype)
    full = torch.from_numpy(tables[:, 0])
    assert torch.equal(storage.keys.view(torch.uint8)[full], q.view(torch.uint8))
    assert torch.equal(storage.key_scales[full], scales)
    for row in range(2):
        assert torch.equal(storage.partial_keys[rows.slot_of_row(row), :2], new[row, :, 4:].transpose(0, 1))
    assert torch.equal(rows.read(), rows.expected)
    rows.append(1)  # a decode step into the partial block: still exact
    rows.append(1)  # ... which fills it: quantized, its slot freed
    assert rows.cache.partial.num_used == 0 and torch.equal(rows.read(), rows.expected)
    assert not torch.equal(rows.expected[:, 4:8], torch.cat([new.transpose(1, 2)[:, 4:6], rows.expected[:, 6:8]], 1))


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_a_copied_partial_block_stays_exact_and_is_quantized_when_it_fills(kv_cache_dtype):
    rows = Rows(kv_cache_dtype)
    new = rows.append(6)
    rows.cache.batch_repeat_interleave(3)  # three rows share the partial block (2 tokens) ...
    rows.expected = rows.expected.repeat_interleave(3, 0)
    rows.append(1)  # ... until they write: rows 1 and 2 get copies of it, slot to slot
    step = rows.cache.current_step
    assert len(step.slots.copy_dst) == 2 and len(step.copy_dst) == 2
    slots = [rows.slot_of_row(row) for row in range(3)]
    assert len(set(slots)) == 3
    partial = rows.layer.storage.partial_keys
    for slot in slots:
        assert torch.equal(partial[slot, :2], new[0, :, 4:6].transpose(0, 1))  # bit for bit the tokens written
    assert torch.equal(rows.read(), rows.expected)
    rows.append(1)  # the copies fill: each row's block quantized from its exact tokens
    assert rows.cache.partial.num_used == 0 and torch.equal(rows.read(), rows.expected)
    assert len(np.unique(rows.cache.tables.tables[:, 1])) == 3


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_crop_back_into_a_compressed_block_reopens_it(kv_cache_dtype):
    rows = Rows(kv_cache_dtype, rows=2)
    rows.append(10)  # blocks 0 and 1 full (compressed), 2 tokens partial
    rows.cache.crop(-5)  # 5 tokens left: block 1 keeps 1 token, and must take writes again
    rows.expected = rows.expected[:, :5]
    assert rows.cache.partial.num_used == 2  # block 1 of each row, back in a slot
    storage = rows.layer.storage
    block = torch.from_numpy(rows.cache.tables.tables[:, 1])
    for row in range(2):  # the slot holds the block's dequantized tokens: re-derived, as everything reads it
        reopened = dequantize_blocks(storage.keys[block[row : row + 1]], storage.key_scales[block[row : row + 1]],
                                     torch.float32)
        assert torch.equal(storage.partial_keys[rows.slot_of_row(row)], reopened[0])
    new = rows.append(2)  # writable again, and the new tokens exact
    assert torch.equal(rows.read(), rows.expected)
    assert torch.equal(rows.read()[:, 5:7], new.transpose(1, 2))
    rows.append(2)  # block 1 fills again: quantized from its re-derived and new tokens
    assert rows.cache.partial.num_used == 1 * 2 and torch.equal(rows.read(), rows.expected)


def test_crop_into_a_block_rows_share():
    rows = Rows("int8")
    rows.append(8)  # two full blocks
    rows.cache.batch_repeat_interleave(2)
    rows.expected = rows.expected.repeat_interleave(2, 0)
    rows.cache.crop(-2)  # both rows now share a partial block 1, reopened once
    rows.expected = rows.expected[:, :6]
    assert rows.cache.partial.num_used == 1
    rows.append(1)  # the second row copies it (slot to slot) before writing
    assert rows.cache.partial.num_used == 2 and torch.equal(rows.read(), rows.expected)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_memory_figures_count_what_is_held(kv_cache_dtype):
    cache = PagedCache(num_layers=2, block_size=16, kv_cache_dtype=kv_cache_dtype)
    states = torch.randn(3, HEADS, 40, HEAD_DIM)
    for layer in range(2):
        cache.update(states, states, layer)
    stats = cache.stats()
    # Per layer: a full block is 16 tokens x 2 heads x (8 + 8) dims x 1 byte, plus a 4-byte scale per head for K and
    # V; a partial block the same tokens in fp32. 3 rows hold 2 full blocks and 1 partial block each.
    full, partial = 16 * 2 * 16 + 2 * 2 * 4, 16 * 2 * 16 * 4
    assert stats.kv_cache_dtype == kv_cache_dtype
    assert stats.peak_kv_bytes == cache.kv_bytes() == 2 * (6 * full + 3 * partial)
    assert stats.dense_kv_bytes == 2 * 3 * 40 * 2 * 16 * 4  # stock's figure, in fp32
    assert stats.pool_bytes >= stats.peak_kv_bytes
    assert stats.saving == pytest.approx(1 - stats.peak_kv_bytes / stats.dense_kv_bytes)
    auto = PagedCache(num_layers=2, block_size=16)
    for layer in range(2):
        auto.update(states, states, layer)
    assert auto.stats().kv_cache_dtype == "auto" and auto.stats().dense_kv_bytes == stats.dense_kv_bytes


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_generate_beams_and_samples(model, kv_cache_dtype):
    input_ids, attention_mask = left_padded_prompts((40, 23))
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=20,
                  min_new_tokens=20)
    outputs, savings = {}, {}
    for dtype in ("auto", kv_cache_dtype):
        enable_paged_cache(model, kv_cache_dtype=dtype)
        try:
            with capture_caches(model) as captured:
                torch.manual_seed(0)
                outputs[dtype] = [model.generate(**kwargs, num_beams=4),
                                  model.generate(**kwargs, do_sample=True, num_return_sequences=3)]
            savings[dtype] = cache_stats(model).saving
        finally:
            disable_paged_cache(model)
        for cache in captured.caches:  # every block and slot back
            assert cache.allocator.num_used == 0 and (cache.partial is None or cache.partial.num_used == 0)
    assert savings[kv_cache_dtype] > savings["auto"] + 0.3  # fp32 -> 1 byte: well beyond sharing alone
    # Lossy, but on this peaked model nearly every token agrees with full precision.
    for lossy, exact in zip(outputs[kv_cache_dtype], outputs["auto"]):
        assert lossy.shape == exact.shape and (lossy == exact).float().mean() > 0.9


def test_shared_prefix_split_reads_compressed_blocks_like_the_unsplit_path(model, monkeypatch):
    # fp32 on CPU takes the shared-prefix split (the group's prefix dequantized once); forbidding it reads every row.
    input_ids = torch.randint(3, 90, (2, 37), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=input_ids, pad_token_id=0, max_new_tokens=12, num_beams=4, num_return_sequences=2,
                  output_scores=True, return_dict_in_generate=True)
    enable_paged_cache(model, kv_cache_dtype="int8")
    try:
        split = model.generate(**kwargs)
        monkeypatch.setattr(dispatch, "_can_split_shared_prefix", lambda *args: False)
        unsplit = model.generate(**kwargs)
    finally:
        disable_paged_cache(model)
    assert torch.equal(split.sequences, unsplit.sequences)
    for a, b in zip(split.scores, unsplit.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_each_distinct_block_is_dequantized_once_per_step(model):
    cache = PagedCache(num_layers=1, block_size=4, kv_cache_dtype="int8")
    states = torch.randn(1, HEADS, 10, HEAD_DIM)
    cache.update(states, states, 0)
    cache.batch_repeat_interleave(8)  # 8 rows share 2 full blocks
    cache.update(torch.randn(8, HEADS, 1, HEAD_DIM), torch.randn(8, HEADS, 1, HEAD_DIM), 0)
    view = cache.current_step.dense
    assert len(view.blocks) == 2 and len(view.slots) == 8  # not 8 x 2
    assert view.tables.shape == (8, 3)


def test_assisted_generation_crops_a_compressed_cache(model):
    assistant = tiny_model("llama", seed=1)
    input_ids = torch.randint(3, 90, (1, 30), generator=torch.Generator().manual_seed(2))
    enable_paged_cache(model, kv_cache_dtype="int8", block_size=4)
    try:
        with capture_caches(model) as captured:
            out = model.generate(input_ids, assistant_model=assistant, max_new_tokens=20, min_new_tokens=20,
                                 pad_token_id=0)
    finally:
        disable_paged_cache(model)
    assert out.shape == (1, 50)
    assert all(cache.allocator.num_used == 0 and cache.partial.num_used == 0 for cache in captured.caches)


@pytest.mark.parametrize("bad", ["int4", "bfloat16", None, 8])
def test_unknown_kv_cache_dtype_is_refused_listing_the_choices(model, bad):
    with pytest.raises(ValueError, match=r"choose one of \('auto', 'int8', 'fp8'\)"):
        enable_paged_cache(model, kv_cache_dtype=bad)
    assert not is_paged_cache_enabled(model)
    with pytest.raises(ValueError, match="PagedCache: kv_cache_dtype"):
        PagedCache(num_layers=1, kv_cache_dtype=bad)


def test_fp8_without_float8_in_torch_names_the_version_needed(model, monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' needs torch >= 2\.1"):
        enable_paged_cache(model, kv_cache_dtype="fp8")
    assert not is_paged_cache_enabled(model)
    enable_paged_cache(model, kv_cache_dtype="int8")  # the model is still usable, int8 still works
    try:
        out = model.generate(torch.randint(3, 90, (1, 8)), max_new_tokens=3, pad_token_id=0)
        assert out.shape == (1, 11)
    finally:
        disable_paged_cache(model)
