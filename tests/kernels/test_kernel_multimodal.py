"""Gemma 3 with images through the Triton kernels (under TRITON_INTERPRET=1 on CPU): its image tokens see each other
both ways in the prompt, which a causal kernel would hide, so the prompt forward must take stock's attention."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from family_models import VISION_LANGUAGE, prompts_with_images  # noqa: E402

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache  # noqa: E402


def test_gemma3_images_token_identical_through_the_kernels(device):
    (family,) = [family for family in VISION_LANGUAGE if family.vision.token_types == "token_type_ids"]
    model = family.build().to(device)
    inputs = {key: value.to(device) for key, value in prompts_with_images(family, images_per_prompt=(1, 1)).items()}
    kwargs = dict(**inputs, pad_token_id=0, max_new_tokens=6)
    disable_paged_cache(model)
    stock = model.generate(**kwargs)
    enable_paged_cache(model, backend="triton")
    try:
        paged = model.generate(**kwargs)
        assert cache_stats(model).peak_blocks > 0
    finally:
        disable_paged_cache(model)
    assert torch.equal(stock, paged)
