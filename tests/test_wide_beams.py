"""Wide calls (generative recommendation, constrained decoding): 64 and 128 beams, 256 samples, token-identical to
stock, with the blocks they share (the 512 / 64 shapes of the benchmark cut down for a tiny model)."""

import pytest
import torch

from helpers import generate_both
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _prompt(length: int) -> dict:
    ids = torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(3))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("num_beams", [64, 128])
def test_wide_beam_search_matches_stock(model, num_beams):
    stock, paged, stats = generate_both(model, **_prompt(24), num_beams=num_beams, num_return_sequences=4,
                                        max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(stock, paged)
    assert stats.rows == num_beams and stats.prefill_rows == 1
    assert stats.saving > 0.5  # the prompt once for every beam


def test_256_samples_match_stock(model):
    stock, paged, stats = generate_both(model, **_prompt(24), do_sample=True, num_return_sequences=256,
                                        max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(stock, paged)
    assert stats.rows == 256 and stats.prefill_rows == 1
    # The prompt's full blocks once; every sample its own blocks from its first new token's block on.
    token_bytes = stats.dense_kv_bytes // (stats.rows * stats.max_seq_len)
    block = stats.block_size
    own_blocks = -(-stats.max_seq_len // block) - 24 // block
    assert stats.peak_kv_bytes == (24 // block + 256 * own_blocks) * block * token_bytes


def test_wide_beams_over_two_prompts_match_stock(model):
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    stock, paged, stats = generate_both(model, input_ids=ids, attention_mask=mask, num_beams=64, max_new_tokens=6,
                                        min_new_tokens=6, pad_token_id=0)
    assert torch.equal(stock, paged) and stats.rows == 128
