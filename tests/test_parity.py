"""Token-for-token parity of the paged generate() with stock generate()."""

import pytest
import torch

from helpers import generate_both, sequences
from tiny_models import FAMILIES, left_padded_prompts, tiny_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return tiny_model(request.param)


def _inputs(lengths=(37, 21)):
    input_ids, attention_mask = left_padded_prompts(lengths)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0)


def test_greedy(model):
    stock, paged, stats = generate_both(model, **_inputs(), max_new_tokens=40)
    assert torch.equal(stock, paged)
    assert stats.prefill_rows == 2


@pytest.mark.parametrize("num_beams", [2, 4, 8])
def test_beam_search(model, num_beams):
    stock, paged, stats = generate_both(
        model, **_inputs(), max_new_tokens=30, num_beams=num_beams, num_return_sequences=num_beams // 2
    )
    assert torch.equal(stock, paged)
    assert stats.rows == 2 * num_beams
    assert stats.prefill_rows == 2  # the prompt forward ran on the distinct prompts only
    assert stats.peak_kv_bytes < stats.dense_kv_bytes


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.5])
def test_beam_search_options(model, early_stopping, length_penalty):
    stock, paged, _ = generate_both(
        model, **_inputs(), max_new_tokens=24, num_beams=4, num_return_sequences=3,
        early_stopping=early_stopping, length_penalty=length_penalty,
    )
    assert torch.equal(stock, paged)


def test_beam_search_with_eos_mid_search(model):
    input_ids, attention_mask = left_padded_prompts((9, 5), seed=3)
    common = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=30, num_beams=4)
    probe, _, _ = generate_both(model, **common)
    # Try tokens the search actually produces mid-way as EOS until one ends some hypothesis early.
    for eos in probe[0, input_ids.shape[1] + 3 : input_ids.shape[1] + 12].tolist():
        stock, paged, _ = generate_both(model, **common, eos_token_id=eos, num_return_sequences=2)
        assert torch.equal(stock, paged)
        if (stock[:, input_ids.shape[1] :] == eos).any():
            return
    pytest.fail("no candidate EOS was reached during the search")


def test_sampling_num_return_sequences(model):
    stock, paged, stats = generate_both(
        model, seed=7, **_inputs(), max_new_tokens=30, do_sample=True, num_return_sequences=4, top_k=20
    )
    assert torch.equal(stock, paged)
    assert stats.prefill_rows == 2 and stats.rows == 8


def test_output_scores_match(model):
    kwargs = dict(**_inputs(), max_new_tokens=12, num_beams=4, return_dict_in_generate=True, output_scores=True,
                  output_logits=True)
    stock, paged, _ = generate_both(model, **kwargs)
    assert torch.equal(sequences(stock), sequences(paged))
    for name in ("scores", "logits"):
        for stock_step, paged_step in zip(getattr(stock, name), getattr(paged, name), strict=True):
            torch.testing.assert_close(paged_step, stock_step, atol=1e-4, rtol=0)
    torch.testing.assert_close(paged.sequences_scores, stock.sequences_scores, atol=1e-4, rtol=0)


def test_prompt_crossing_many_blocks(model):
    # 50 tokens: three full blocks and a shared partial block that beams must copy on write.
    input_ids, attention_mask = left_padded_prompts((50, 33), seed=5)
    stock, paged, _ = generate_both(
        model, input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=20, num_beams=3
    )
    assert torch.equal(stock, paged)


def _record_splits(monkeypatch):
    """(group size, shared blocks) of every layer call that took the shared-prefix split."""
    import paged_generate.attention.dispatch as attention

    seen = []
    original = attention._shared_prefix_forward

    def spy(module, query, read, attention_mask, scaling):
        step = read.step
        shared = step.shared
        prefix = step.tables[:, : shared.num_blocks].reshape(-1, shared.uniform_size, shared.num_blocks)
        assert (prefix == prefix[:, :1]).all(), "rows of a group must hold the same leading blocks"
        seen.append((shared.uniform_size, shared.num_blocks))
        return original(module, query, read, attention_mask, scaling)

    monkeypatch.setattr(attention, "_shared_prefix_forward", spy)
    return seen


def test_shared_prefix_path_runs_and_groups_match_tables(model, monkeypatch):
    from paged_generate.attention import split_rule

    monkeypatch.setitem(split_rule.SPLIT_MIN_REDUNDANT_TOKENS, "torch", 1)  # split whatever the prefix
    seen = _record_splits(monkeypatch)
    for kwargs in (dict(num_beams=4), dict(do_sample=True, num_return_sequences=3)):
        stock, paged, _ = generate_both(model, **_inputs(), max_new_tokens=10, **kwargs)
        assert torch.equal(stock, paged)
    # 37-token prompts in blocks of 4 (block_size="auto" for these short calls): 9 full blocks shared per group.
    assert (4, 37 // 4) in seen and (3, 37 // 4) in seen


@pytest.mark.parametrize("prompt_len, splits", [(37, False), (101, True)])
def test_split_rule_sides_are_both_token_identical(model, monkeypatch, prompt_len, splits):
    # 4 beams of one prompt: 3 redundant rows x 36 (37 tokens) or 100 (101 tokens) shared tokens in blocks of 4; a
    # threshold between the two sends one case each way.
    from paged_generate.attention import split_rule

    monkeypatch.setitem(split_rule.SPLIT_MIN_REDUNDANT_TOKENS, "torch", 3 * 64)
    assert split_rule.split_pays(3 * 96, "torch") and not split_rule.split_pays(3 * 32, "torch")
    seen = _record_splits(monkeypatch)
    input_ids, attention_mask = left_padded_prompts((prompt_len,))
    stock, paged, _ = generate_both(model, input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0,
                                    max_new_tokens=12, num_beams=4)
    assert torch.equal(stock, paged)
    assert bool(seen) == splits
