"""Rows whose prompts are equal are computed once and share their blocks, wherever they sit in the batch.

Callers repeat prompts themselves (TRL's GRPO trainer passes each prompt `num_generations` times as rows; eval loops
batch one prompt several times): those rows must give stock's tokens, scores and logits in the caller's row order,
with `num_beams` / `num_return_sequences` on top, while the prompt forward runs on the distinct prompts only
(`prefill_rows`) and the rows share blocks as the samples of one prompt do. Rows that differ in anything the forward
sees (one token, the mask, position ids, token types, images) are not merged.
"""

import numpy as np
import pytest
import torch

from family_models import BY_NAME, VISION_LANGUAGE, prompts_with_images
from helpers import generate_both
from paged_generate import OutOfBlocksError, cache_stats, capture_caches, disable_paged_cache, enable_paged_cache
from paged_generate.attention import dispatch, split_rule
from paged_generate.patches import prefill_once
from paged_generate.patches.prefill_once import equal_prompts
from tiny_models import left_padded_prompts, tiny_model

ORDER = [0, 1, 0, 2, 1, 0]  # prompts a, b, a, c, b, a: three distinct, equal ones apart
MODES = {
    "greedy": {},
    "sample": dict(do_sample=True, top_k=0),
    "beam": dict(num_beams=3, num_return_sequences=2),
    "sample x2": dict(do_sample=True, top_k=0, num_return_sequences=2),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _repeated(order=ORDER, lengths=(37, 21, 29), seed=1):
    input_ids, attention_mask = left_padded_prompts(lengths, seed=seed)
    return dict(input_ids=input_ids[order], attention_mask=attention_mask[order], pad_token_id=0)


def _expand(mode):
    return max(MODES[mode].get("num_beams", 1), MODES[mode].get("num_return_sequences", 1))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_repeated_prompts_in_any_order_are_token_identical_and_computed_once(model, mode):
    stock, paged, stats = generate_both(model, seed=5, **_repeated(), max_new_tokens=24, **MODES[mode])
    assert torch.equal(stock, paged)
    assert stats.rows == len(ORDER) * _expand(mode)
    assert stats.prefill_rows == 3


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_scores_and_logits_are_stocks_in_the_callers_row_order(model, mode):
    wanted = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, max_new_tokens=6)
    stock, paged, stats = generate_both(model, seed=2, **_repeated(), **wanted, **MODES[mode])
    assert stats.prefill_rows == 3
    assert torch.equal(stock.sequences, paged.sequences)
    for name in ("scores", "logits"):
        for step, (expected, actual) in enumerate(zip(getattr(stock, name), getattr(paged, name), strict=True)):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"{name} of step {step}")


def test_rows_differing_in_one_token_or_in_padding_are_not_merged(model):
    inputs = _repeated(order=[1, 1, 1, 1])  # prompt b: 21 tokens left-padded to 37
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    input_ids[1, -5] = 3 if input_ids[1, -5] != 3 else 4  # one token differs
    first = int(attention_mask[2].argmax())
    attention_mask[2, first - 1] = 1  # same ids, one position less padding: row 2 reads a pad token as a token
    # Row 3 equals row 0.
    for kwargs in ({}, dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
        stock, paged, stats = generate_both(model, **inputs, max_new_tokens=12, **kwargs)
        assert torch.equal(stock, paged)
        assert stats.prefill_rows == 3
    assert not torch.equal(stock[0], stock[1]) and not torch.equal(stock[0], stock[2])


def test_equal_prompts_compares_every_row_input_bit_for_bit():
    ids = torch.tensor([[5, 6], [7, 8], [5, 6], [9, 9], [7, 8], [5, 6]])
    assert equal_prompts(ids, {}).tolist() == [0, 1, 0, 2, 1, 0]
    assert equal_prompts(ids[:3], {"attention_mask": torch.tensor([[1, 1], [1, 1], [0, 1]])}) is None
    token_types = torch.tensor([[0, 0], [0, 0], [0, 1], [0, 0], [0, 0], [0, 0]])
    assert equal_prompts(ids, {"token_type_ids": token_types}).tolist() == [0, 1, 2, 3, 1, 0]
    # Multimodal position ids [3, rows, len]: rows along dimension 1.
    positions = torch.zeros(3, 6, 2, dtype=torch.long)
    positions[1, 5, 1] = 4
    assert equal_prompts(ids, {"position_ids": positions}).tolist() == [0, 1, 0, 2, 1, 3]
    embeds = torch.zeros(6, 2, 4, dtype=torch.bfloat16)
    embeds[2, 0, 0] = -0.0  # equal as numbers, not as bits: the forward could tell them apart (1 / x)
    labels = equal_prompts(torch.zeros(6, 0, dtype=torch.long), {"inputs_embeds": embeds})
    assert labels.tolist() == [0, 0, 1, 0, 0, 0]
    # Mixed widths (int64 ids, int32 mask, bool flags) are compared together.
    mask = torch.ones(6, 2, dtype=torch.int32)
    mask[5, 0] = 0
    assert equal_prompts(ids, {"attention_mask": mask, "token_type_ids": token_types.bool()}).tolist() == [
        0, 1, 2, 3, 1, 4]
    # Inputs not one per row (images, their grids) make the rows' owners unknown: nothing is merged.
    assert equal_prompts(ids, {"pixel_values": torch.zeros(6, 3, 4, 4)}) is None
    assert equal_prompts(ids, {"mm_encoder_outputs": {"image": (torch.zeros(2, 4),)}}) is None
    # What generate() adds that is not per row, or holds no tensor, does not count.
    assert equal_prompts(ids, {"use_cache": True, "logits_to_keep": 1, "mm_encoder_outputs": {}}) is not None
    assert equal_prompts(ids[:1], {}) is None


def test_a_single_row_is_not_compared(model, monkeypatch):
    def compare(*args):
        raise AssertionError("a batch of one row needs no comparison")

    monkeypatch.setattr(prefill_once, "_row_labels", compare)
    stock, paged, stats = generate_both(model, **_repeated(order=[1]), max_new_tokens=6)
    assert torch.equal(stock, paged) and stats.prefill_rows == 1


def test_repeated_rows_take_what_num_return_sequences_takes(model):
    """TRL's layout (each prompt `g` times, adjacent) against the same prompts with `num_return_sequences=g`: same
    samples (generate() lays the rows out alike), and the cache does the same work: the same block tables and
    copy-on-write copies at every step, the same blocks at the peak, the same pool."""
    generations = 4
    prompts = _repeated(order=[0, 1], lengths=(53, 40))
    repeated = {key: value.repeat_interleave(generations, dim=0) if isinstance(value, torch.Tensor) else value
                for key, value in prompts.items()}
    common = dict(do_sample=True, top_k=0, max_new_tokens=20)
    stock, paged, rows_stats = generate_both(model, seed=9, **repeated, **common)
    stock_samples, paged_samples, samples_stats = generate_both(model, seed=9, **prompts, **common,
                                                                num_return_sequences=generations)
    assert torch.equal(stock, paged) and torch.equal(stock_samples, paged_samples)
    assert torch.equal(paged, paged_samples)
    assert rows_stats.prefill_rows == samples_stats.prefill_rows == 2
    for figure in ("peak_blocks", "peak_kv_bytes", "pool_bytes", "dense_kv_bytes", "rows"):
        assert getattr(rows_stats, figure) == getattr(samples_stats, figure), figure
    assert rows_stats.saving > 0.3

    enable_paged_cache(model)
    try:
        with capture_caches(model, record_steps=True) as rows_run:
            torch.manual_seed(9)
            model.generate(**repeated, **common)
        with capture_caches(model, record_steps=True) as samples_run:
            torch.manual_seed(9)
            model.generate(**prompts, **common, num_return_sequences=generations)
    finally:
        disable_paged_cache(model)
    assert len(rows_run.steps) == len(samples_run.steps) == common["max_new_tokens"]
    for step, (ours, theirs) in enumerate(zip(rows_run.steps, samples_run.steps)):
        assert np.array_equal(ours.block_tables, theirs.block_tables), f"step {step}"
        assert np.array_equal(ours.copied, theirs.copied), f"step {step}"


def test_groups_of_equal_prompts_share_prefix_attention_wherever_their_rows_sit(model, monkeypatch):
    monkeypatch.setitem(split_rule.SPLIT_MIN_REDUNDANT_TOKENS, "torch", 1)  # split whatever the prefix
    seen = []
    original = dispatch._shared_prefix_forward

    def spy(module, query, read, attention_mask, scaling):
        shared = read.step.shared
        prefix = read.step.tables[:, : shared.num_blocks]
        for group in range(shared.num_groups):
            rows = prefix[shared.row_group == group]
            assert (rows == rows[:1]).all(), "rows of a group must hold the same leading blocks"
        seen.append((shared.row_group.tolist(), shared.num_blocks))
        return original(module, query, read, attention_mask, scaling)

    monkeypatch.setattr(dispatch, "_shared_prefix_forward", spy)
    stock, paged, _ = generate_both(model, seed=4, **_repeated(), max_new_tokens=8, do_sample=True)
    assert torch.equal(stock, paged)
    # Every prompt left-padded to 37 tokens, in blocks of 4 (block_size="auto" for several short rows): 9 full blocks
    # shared per group, in every layer and step.
    assert seen and all(entry == ([0, 1, 0, 2, 1, 0], 37 // 4) for entry in seen)


def test_blocks_are_freed_and_a_refused_call_leaves_the_model_usable(model):
    inputs = _repeated()
    enable_paged_cache(model)
    try:
        with capture_caches(model) as captured:
            model.generate(**inputs, max_new_tokens=10, do_sample=True)
        assert captured.caches[0].allocator.num_used == 0
        assert cache_stats(model).prefill_rows == 3
    finally:
        disable_paged_cache(model)
    enable_paged_cache(model, max_blocks=8)  # the prompts alone take 3 x 3 blocks
    try:
        with capture_caches(model) as captured, pytest.raises(OutOfBlocksError):
            model.generate(**inputs, max_new_tokens=10)
        assert captured.caches[0].allocator.num_used == 0
    finally:
        disable_paged_cache(model)
    stock, paged, stats = generate_both(model, **inputs, max_new_tokens=10)
    assert torch.equal(stock, paged) and stats.prefill_rows == 3


def test_inputs_embeds(model):
    inputs = _repeated()
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    stock, paged, stats = generate_both(model, inputs_embeds=embeds, **inputs, max_new_tokens=10)
    assert torch.equal(stock, paged) and stats.prefill_rows == 3


def test_dropout_in_training_mode_keeps_every_row_its_own_prompt_forward():
    """A model in training mode with dropout draws a mask per row in stock's prompt forward (TRL generates in training
    mode): rows computed once would all hold one draw. Such calls compute every row, as stock does."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    model.train()
    for kwargs in (dict(do_sample=True, num_return_sequences=2), dict(num_beams=2)):
        stock, paged, stats = generate_both(model, seed=3, **_repeated(), max_new_tokens=8, **kwargs)
        assert torch.equal(stock, paged)
        assert stats.prefill_rows == stats.rows
    model.eval()
    stock, paged, stats = generate_both(model, seed=3, **_repeated(), max_new_tokens=8, num_beams=2)
    assert torch.equal(stock, paged) and stats.prefill_rows == 3


def test_multimodal_positions_text_only():
    """Qwen2-VL's position ids are [3, rows, len]: rows are picked along their second dimension."""
    family = BY_NAME["Qwen2-VL"]
    if not family.available():
        pytest.skip("this transformers has no Qwen2-VL")
    model = family.build()
    for kwargs in ({}, dict(num_beams=2, num_return_sequences=2)):
        stock, paged, stats = generate_both(model, **_repeated(), max_new_tokens=8, **kwargs)
        assert torch.equal(stock, paged) and stats.prefill_rows == 3


@pytest.mark.parametrize("family", VISION_LANGUAGE, ids=lambda family: family.name)
def test_repeated_prompts_with_images_are_token_identical_and_not_merged(family):
    """Which rows a batch's images belong to is the family's business (counted from placeholders, grouped per
    prompt or not): rows with images are computed one by one, as stock does, and still give stock's tokens."""
    if not family.available():
        pytest.skip(f"this transformers has no {family.model_class}")
    model = family.build()
    inputs = prompts_with_images(family, images_per_prompt=(1, 1))
    order = [0, 1, 0]
    repeated = {}
    for key, value in inputs.items():
        if key == "pixel_values":  # the images of prompts 0 and 1, in rows' order (Qwen's are patches per image)
            value = value.reshape(2, -1, *value.shape[1:])[order].reshape(-1, *value.shape[1:])
        else:
            value = value[order]
        repeated[key] = value
    stock, paged, stats = generate_both(model, **repeated, pad_token_id=0, max_new_tokens=6)
    assert torch.equal(stock, paged)
    assert stats.prefill_rows == 3


def test_prefill_rows_plan_maps_every_row_to_its_distinct_prompt():
    rows = prefill_once.PrefillRows.of_prompts(np.array([0, 1, 0, 2, 1, 0]), expand=2)
    assert rows.computed.tolist() == [0, 2, 6]
    assert rows.source.tolist() == [0, 0, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0]
