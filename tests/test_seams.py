"""Guards on the transformers internals `paged_generate/patches/` relies on: these fail loudly when they move."""

import inspect

import torch
from transformers import GenerationConfig, GenerationMixin, LlamaForCausalLM

from paged_generate.patches.compat import CACHE_KWARG
from paged_generate.patches.generate import PATCHED_METHODS
from tiny_models import tiny_model


def _params(method):
    return list(inspect.signature(method).parameters)


def test_patched_methods_exist_with_the_expected_signatures():
    for name in PATCHED_METHODS:
        assert hasattr(GenerationMixin, name), f"transformers no longer has GenerationMixin.{name}"
    assert _params(GenerationMixin._prefill)[:5] == [
        "self", "input_ids", "generation_config", "model_kwargs", "is_first_iteration"
    ]
    assert _params(GenerationMixin._prepare_cache_for_generation)[:3] == ["self", "generation_config", "model_kwargs"]


def test_cache_kwarg_name_matches_model_forward():
    assert CACHE_KWARG in inspect.signature(LlamaForCausalLM.forward).parameters


def test_expansion_groups_rows_by_prompt():
    # _prefill keeps rows 0, expand, 2*expand...: that is only right if generate() repeats each prompt in place.
    model = tiny_model("llama")
    input_ids = torch.tensor([[5, 6], [7, 8]])
    expanded, kwargs = model._expand_inputs_for_generation(
        expand_size=3, input_ids=input_ids, attention_mask=torch.ones_like(input_ids)
    )
    assert expanded[:, 0].tolist() == [5, 5, 5, 7, 7, 7]
    assert torch.equal(expanded[::3], input_ids) and kwargs["attention_mask"].shape == (6, 2)


def test_generate_reaches_the_patched_methods():
    model = tiny_model("llama")
    from paged_generate import disable_paged_cache, enable_paged_cache
    from paged_generate.cache import PagedCache

    seen = {}
    enable_paged_cache(model)
    try:
        prefill = model._prefill

        def spy(input_ids, generation_config, model_kwargs, *args, **kwargs):
            seen["cache"] = model_kwargs.get(CACHE_KWARG)
            seen["rows"] = input_ids.shape[0]
            return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

        model._prefill = spy
        model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=2, num_beams=2, pad_token_id=0,
                       generation_config=GenerationConfig())
    finally:
        disable_paged_cache(model)
    assert isinstance(seen["cache"], PagedCache) and seen["rows"] == 2
