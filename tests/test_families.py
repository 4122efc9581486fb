"""Every decoder family of tests/family_models.py: token-identical to stock generate(), or refused up front.

Parity: fp32, a left-padded batch of two prompts (37 and 21 tokens: both span more than one 16-token block), greedy,
beam search (3 beams, 2 returned) and sampling (3 returned), plugin off vs on with the same seed. Vision-language
families take these text-only prompts here; tests/test_multimodal.py gives them images.
Refusal: `enable_paged_cache` raises `UnsupportedModelError` naming the reason and leaves the model untouched.
"""

import dataclasses

import pytest
import torch

from family_models import BY_NAME, FAMILIES, REFUSAL_REASONS, REFUSED, SUPPORTED, left_padded_prompts
from helpers import generate_both
from paged_generate import UnsupportedModelError, enable_paged_cache, is_paged_cache_enabled

MAX_NEW_TOKENS = 24
MODES = {
    "greedy": {},
    "beam": dict(num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=0),
}


def _skip_if_missing(family):
    if not family.available():
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no {family.model_class}")


_models = {}


def _model(family):
    _skip_if_missing(family)
    if family.name not in _models:
        _models[family.name] = family.build()
    return _models[family.name]


def _inputs():
    input_ids, attention_mask = left_padded_prompts((37, 21))
    return dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=MAX_NEW_TOKENS)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", SUPPORTED, ids=lambda family: family.name)
def test_token_identical(family, mode):
    model = _model(family)
    stock, paged, stats = generate_both(model, seed=11, **_inputs(), **MODES[mode])
    assert stock.shape[1] > 37, "stock generated nothing"
    assert torch.equal(stock, paged), f"{family.name} {mode}: paged tokens differ from stock"
    expand = max(MODES[mode].get("num_beams", 1), MODES[mode].get("num_return_sequences", 1))
    assert stats.prefill_rows == 2 and stats.rows == 2 * expand  # the prompt forward ran once per distinct prompt
    assert stats.peak_blocks > 2  # the K/V went through the paged cache


@pytest.mark.parametrize("mode", ["beam", "sample"])
@pytest.mark.parametrize("family", SUPPORTED, ids=lambda family: family.name)
def test_bf16_token_identical(family, mode):
    """In bf16 a rounding difference moves logits by ~0.1, enough to change sampled tokens: the paged path must give
    stock's logits bit for bit (fallback_attention.py: stock's kernel on stock's K/V, sliding windows included)."""
    _skip_if_missing(family)
    model = family.build().to(torch.bfloat16)
    stock, paged, _ = generate_both(
        model, seed=5, **_inputs(), **MODES[mode], return_dict_in_generate=True, output_logits=True
    )
    assert torch.equal(stock.sequences, paged.sequences), f"{family.name} bf16 {mode}: paged tokens differ from stock"
    for step, (stock_logits, paged_logits) in enumerate(zip(stock.logits, paged.logits, strict=True)):
        assert torch.equal(stock_logits, paged_logits), f"{family.name} bf16 {mode}: logits differ at step {step}"


@pytest.mark.parametrize("family", REFUSED, ids=lambda family: family.name)
def test_refused_and_untouched(family):
    model = _model(family)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attention = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=REFUSAL_REASONS[family.refused_because]) as error:
        enable_paged_cache(model)
    assert isinstance(error.value, ValueError)
    assert "README" in str(error.value)  # points at the support matrix and says to run without the plugin
    assert not is_paged_cache_enabled(model)
    assert model.config._attn_implementation == attention
    assert not {"generate", "_prefill", "_prepare_cache_for_generation"} & set(vars(model))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_refused_when_transformers_does_not_switch_the_attention(monkeypatch):
    """A model whose attention transformers will not switch (it only warns) is refused, not silently left on SDPA
    reading the pools as if they were K/V."""
    model = BY_NAME["Llama"].build()
    monkeypatch.setattr(model, "set_attn_implementation", lambda *args, **kwargs: None)
    with pytest.raises(UnsupportedModelError, match="did not switch its attention"):
        enable_paged_cache(model)
    assert not is_paged_cache_enabled(model) and model.config._attn_implementation == "sdpa"
    assert not {"generate", "_prefill", "_prepare_cache_for_generation"} & set(vars(model))


def test_eager_model_without_a_family_eager_function_is_refused(monkeypatch):
    import transformers.models.llama.modeling_llama as modeling_llama

    model = _eager(BY_NAME["Llama"].build())
    monkeypatch.delattr(modeling_llama, "eager_attention_forward")
    with pytest.raises(UnsupportedModelError, match="eager_attention_forward"):
        enable_paged_cache(model)
    assert not is_paged_cache_enabled(model) and model.config._attn_implementation == "eager"


def test_the_table_covers_the_brief():
    assert len(SUPPORTED) == 21 and len(REFUSED) == 9
    assert len({family.name for family in FAMILIES}) == len(FAMILIES)


def _variant(name, **config_changes):
    family = BY_NAME[name]
    _skip_if_missing(family)
    return dataclasses.replace(family, config_kwargs={**family.config_kwargs, **config_changes})


def _eager(model):
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize(
    "name, build, without",
    [
        # The window is shorter than prompt + new tokens: a paged path that ignored it would differ.
        ("Mistral", lambda family: family.build(), dict(sliding_window=None)),
        # Eager Gemma 2 applies the attention softcap (transformers >= 5.18 makes eager its default).
        ("Gemma 2", lambda family: _eager(family.build()), dict(attn_logit_softcapping=None)),
    ],
)
def test_distinguishing_features_change_the_tokens_and_stay_identical(name, build, without):
    """The parity tests only mean something if the feature the paged path must reproduce changes the tokens."""
    kwargs = dict(**_inputs(), num_beams=3)
    model = build(_variant(name))
    stock, paged, _ = generate_both(model, **kwargs)
    assert torch.equal(stock, paged)
    reduced = build(_variant(name, **without))
    assert not torch.equal(reduced.generate(**kwargs), stock), f"{name}: {without} does not change the tokens"


def test_eager_models_keep_eager_attention_under_the_plugin():
    """A model loaded with eager attention is served by its own eager function, as stock would (not by SDPA)."""
    from paged_generate import disable_paged_cache
    from paged_generate.patches.attention_impl import ATTENTION_NAME_EAGER

    model = _eager(BY_NAME["Llama"].build())
    enable_paged_cache(model)
    try:
        assert model.config._attn_implementation == ATTENTION_NAME_EAGER
    finally:
        disable_paged_cache(model)
    assert model.config._attn_implementation == "eager"
    for mode in ("greedy", "beam"):
        stock, paged, _ = generate_both(model, **_inputs(), **MODES[mode])
        assert torch.equal(stock, paged)
