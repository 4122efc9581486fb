"""Repeated prompts through the Triton kernels (under TRITON_INTERPRET=1 on CPU): rows of equal prompts, not adjacent,
in groups of different sizes, computed once and attended through the shared-prefix kernel, give stock's tokens."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import left_padded_prompts, tiny_model  # noqa: E402

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache  # noqa: E402


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
def test_repeated_prompts_with_kernels(device, split, monkeypatch):
    from paged_generate import kernels
    from paged_generate.attention import split_rule

    if split:  # the 37-token prompts share two blocks per group: far below where the split pays, so it is forced
        monkeypatch.setitem(split_rule.SPLIT_MIN_REDUNDANT_TOKENS, "triton", 1)
    calls = []
    original = kernels.launch_shared_prefix_paged_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "launch_shared_prefix_paged_attention", counting)
    model = tiny_model("llama").to(device)
    input_ids, attention_mask = left_padded_prompts((37, 21), seed=2)
    order = [0, 1, 0, 0]  # groups of 3 and 1 rows, the first group's rows apart
    kwargs = dict(input_ids=input_ids[order].to(device), attention_mask=attention_mask[order].to(device),
                  pad_token_id=0, max_new_tokens=4, do_sample=True)
    torch.manual_seed(1)
    stock = model.generate(**kwargs)
    enable_paged_cache(model, backend="triton")
    try:
        torch.manual_seed(1)
        paged = model.generate(**kwargs)
        stats = cache_stats(model)
    finally:
        disable_paged_cache(model)
    assert torch.equal(stock, paged)
    assert stats.prefill_rows == 2
    assert bool(calls) == split
