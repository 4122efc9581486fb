"""Vision-language families with images: token-identical to stock generate(), the prompt forward once per prompt.

Each family of tests/family_models.py with a `Vision` takes a left-padded batch of two prompts, the first with two
images and the second with one (generate() repeats images per prompt, not per row: a wrong split shows), with greedy
search, beam search (3 beams, 2 returned) and sampling (3 returned). The parity only means something if the images
reach the tokens: `test_images_change_the_tokens` checks that they do.

Before transformers 5.24, generate() repeats Llava's and Gemma 3's images one by one (image A, A, A, B, B, B), not
per prompt: the beams of a prompt with two images then see different images, so the plugin runs that prompt forward
on every row, as stock does, and stays token-identical; with one image per prompt it computes each prompt once.
"""

import pytest
import torch

from packaging.version import Version

from family_models import VISION_LANGUAGE, prompts_with_images
from helpers import generate_both
from paged_generate.patches.compat import TRANSFORMERS_VERSION

MAX_NEW_TOKENS = 8
MODES = {
    "greedy": {},
    "beam": dict(num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=0),
}

# Families whose images generate() repeats one by one before 5.24 (the default expansion; Qwen2-VL's groups them).
REPEATS_IMAGES_ONE_BY_ONE = {"Llava", "Gemma 3 vision"} if TRANSFORMERS_VERSION < Version("5.24.0.dev0") else set()

_models = {}


def _model(family):
    if not family.available():
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no {family.model_class}")
    if family.name not in _models:
        _models[family.name] = family.build()
    return _models[family.name]


def _inputs(family, seed=0, **changes):
    return dict(**prompts_with_images(family, seed=seed, **changes), pad_token_id=0, max_new_tokens=MAX_NEW_TOKENS)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", VISION_LANGUAGE, ids=lambda family: family.name)
def test_token_identical_with_images(family, mode):
    model = _model(family)
    inputs = _inputs(family)
    stock, paged, stats = generate_both(model, seed=7, **inputs, **MODES[mode])
    assert stock.shape[1] == inputs["input_ids"].shape[1] + MAX_NEW_TOKENS
    assert torch.equal(stock, paged), f"{family.name} {mode}: paged tokens differ from stock"
    expand = max(MODES[mode].get("num_beams", 1), MODES[mode].get("num_return_sequences", 1))
    assert stats.rows == 2 * expand
    # The images and the prompt are computed once per prompt, unless stock gives a prompt's rows different images.
    assert stats.prefill_rows == (stats.rows if family.name in REPEATS_IMAGES_ONE_BY_ONE else 2)


@pytest.mark.parametrize("family", VISION_LANGUAGE, ids=lambda family: family.name)
def test_one_image_per_prompt_and_longer_prompts(family):
    """One image each and prompts spanning two blocks: rows and images line up one to one."""
    model = _model(family)
    inputs = _inputs(family, images_per_prompt=(1, 1), text=(21, 3), seed=1)
    stock, paged, stats = generate_both(model, seed=3, **inputs, **MODES["beam"])
    assert torch.equal(stock, paged) and stats.prefill_rows == 2


@pytest.mark.parametrize("family", VISION_LANGUAGE, ids=lambda family: family.name)
def test_images_change_the_tokens(family):
    model = _model(family)
    inputs = _inputs(family)
    other_images = _inputs(family, seed=5)
    other_images["input_ids"], other_images["attention_mask"] = inputs["input_ids"], inputs["attention_mask"]
    assert not torch.equal(model.generate(**inputs, num_beams=3), model.generate(**other_images, num_beams=3))


def test_gemma3_image_tokens_see_each_other_both_ways():
    """Gemma 3's image tokens attend to later image tokens in the prompt (its token types say which are images): the
    parity above covers that mask only if it changes the tokens."""
    (family,) = [family for family in VISION_LANGUAGE if family.vision.token_types == "token_type_ids"]
    model = _model(family)
    inputs = _inputs(family, images_per_prompt=(1, 1))
    causal_only = {key: value for key, value in inputs.items() if key != "token_type_ids"}
    assert not torch.equal(model.generate(**inputs, num_beams=3), model.generate(**causal_only, num_beams=3))
