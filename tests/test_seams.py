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


# --- one guard per module of paged_generate/patches/ -------------------------------------------------------------
def _moved(what: str) -> str:
    import transformers

    return f"transformers {transformers.__version__} (torch {torch.__version__}): {what}"


def test_crop_convention_of_compat():
    # length_after_crop mirrors Cache.crop: a negative argument drops that many tokens, a positive one is the length.
    from transformers import DynamicCache

    from paged_generate.patches.compat import length_after_crop

    from paged_generate.patches.compat import TRANSFORMERS_VERSION

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4), 0)
    cache.crop(-2)
    assert cache.get_seq_length() == 3 == length_after_crop(-2, 5), _moved("Cache.crop(-n) no longer drops n tokens")
    if TRANSFORMERS_VERSION.release < (5, 18):  # the older convention, which 5.17's assisted decoding still uses
        cache.crop(2)
        assert cache.get_seq_length() == 2 == length_after_crop(2, 3), _moved("Cache.crop(n) no longer keeps n")
    assert length_after_crop(torch.tensor(2), 3) == 2


def test_attention_implementation_attribute_and_switch():
    from paged_generate.attention import register_attention
    from paged_generate.patches.attention_impl import ATTENTION_NAME, implementation_of, switch_attention

    model = tiny_model("llama")
    assert hasattr(model.config, "_attn_implementation"), _moved("config._attn_implementation is gone")
    original = implementation_of(model.config)
    register_attention()
    assert switch_attention(model, ATTENTION_NAME), _moved("set_attn_implementation no longer takes a registered name")
    assert implementation_of(model.config) == ATTENTION_NAME
    assert all(layer.self_attn.config._attn_implementation == ATTENTION_NAME for layer in model.model.layers), _moved(
        "the attention modules no longer read the model config's implementation")
    assert switch_attention(model, original) and implementation_of(model.config) == original


def test_model_check_flags_and_sources():
    import transformers

    from paged_generate.patches.model_checks import family_eager, keeps_recurrent_state, uses_attention_registry

    assert hasattr(GenerationMixin, "_supports_default_dynamic_cache"), _moved(
        "GenerationMixin._supports_default_dynamic_cache is gone: recurrent models would not be refused")
    assert not keeps_recurrent_state(tiny_model("llama"))
    assert getattr(LlamaForCausalLM, "_supports_attention_backend", False), _moved(
        "_supports_attention_backend is no longer set on Llama")
    assert uses_attention_registry(transformers.StableLmForCausalLM), _moved(
        "StableLM's modeling source no longer calls ALL_ATTENTION_FUNCTIONS.get_interface(")
    assert family_eager(LlamaForCausalLM) is not None, _moved("modeling_llama has no eager_attention_forward")


def test_stock_cache_windows_from_layer_types():
    from transformers import MistralConfig

    from paged_generate.patches.layer_windows import stock_cache_windows

    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=24)
    assert stock_cache_windows(config) == [24, 24], _moved("get_layer_types_and_kwargs changed its return value")
    llama = tiny_model("llama").config
    assert stock_cache_windows(llama) == [None] * llama.num_hidden_layers


def test_cpu_flash_attention_op_returns_lse():
    from paged_generate.patches.torch_ops import cpu_flash_attention_with_lse

    query, key, value = (torch.randn(2, 3, n, 8) for n in (1, 5, 5))
    out, lse = cpu_flash_attention_with_lse(query, key, value, None, 8**-0.5)
    scores = (query @ key.transpose(-1, -2)) * 8**-0.5
    assert lse.shape == (2, 3, 1), _moved("the fused CPU flash op's log-sum-exp changed shape")
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ value)


def test_tensor_parallel_size_plan_and_styles():
    # tests/test_tensor_parallel.py runs the real thing under torchrun; this says which of its assumptions moved.
    from torch.distributed.tensor import Replicate, Shard
    from transformers.distributed import mixin
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    from paged_generate.patches.tensor_parallel import HEAD_SPLITTING_STYLES, KV_PROJECTIONS, tensor_parallel_of

    model = tiny_model("llama")
    assert getattr(model, "_tp_size", "gone") is None, _moved("an unsharded model no longer has `_tp_size = None`")
    assert "model._tp_size = " in inspect.getsource(mixin.DistributedMixin.maybe_distribute_model), _moved(
        "sharding a model no longer sets `model._tp_size`")
    assert tensor_parallel_of(model) is None
    kv_styles = {name: style for name, style in model.tp_plan.items() if name.rsplit(".", 1)[-1] in KV_PROJECTIONS}
    assert sorted(name.rsplit(".", 1)[-1] for name in kv_styles) == ["k_proj", "v_proj"], _moved(
        f"Llama's tp_plan no longer names its key/value projections: {model.tp_plan}")
    assert set(kv_styles.values()) <= HEAD_SPLITTING_STYLES, _moved(f"Llama's KV projections use {kv_styles}")
    colwise = ALL_PARALLEL_STYLES["colwise"]
    assert colwise.output_layouts == Shard(-1) and colwise.use_local_output, _moved(
        "'colwise' no longer leaves each rank its own slice of the output features")
    assert ALL_PARALLEL_STYLES["packed_colwise"].use_local_output, _moved("'packed_colwise' now gathers its output")
    assert ALL_PARALLEL_STYLES["colwise_gather_output"].output_layouts == Replicate(), _moved(
        "'colwise_gather_output' no longer gathers every head on every rank")


def test_expanded_inputs_reach_the_prompt_forward_as_the_expansion_returned_them():
    # prefill_once.py takes each expanded input from before the expansion only if the prompt forward receives the
    # very object the expansion returned; a copy in between would make every call fall back to stock's prefill.
    from paged_generate import disable_paged_cache, enable_paged_cache
    from paged_generate.patches.generate import _bound_class_method

    model = tiny_model("llama")
    expand = _bound_class_method(model, "_expand_inputs_for_generation")
    assert {"expand_size", "is_encoder_decoder", "input_ids"} <= set(inspect.signature(expand).parameters), _moved(
        "_expand_inputs_for_generation's parameters changed")
    enable_paged_cache(model)
    seen = {}
    try:
        state = model._paged_generate_state
        prefill = model._prefill

        def spy(input_ids, generation_config, model_kwargs, *args, **kwargs):
            seen["prompt_inputs"] = state.current_call.get().prompt_inputs
            seen["mask"] = model_kwargs.get("attention_mask")
            return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

        model._prefill = spy
        input_ids = torch.tensor([[4, 5, 6, 7], [0, 8, 9, 10]])
        model.generate(input_ids, attention_mask=(input_ids > 0).long(), max_new_tokens=2, num_beams=2,
                       pad_token_id=0)
    finally:
        disable_paged_cache(model)
    prompt_inputs = seen["prompt_inputs"]
    assert prompt_inputs is not None and prompt_inputs.expand == 2 and prompt_inputs.num_prompts == 2, _moved(
        "generate() no longer expands its inputs through _expand_inputs_for_generation")
    assert seen["mask"] is prompt_inputs.expanded["attention_mask"], _moved(
        "the attention mask reaching _prefill is no longer the object _expand_inputs_for_generation returned")


def test_model_outputs_copy_apart():
    # prefill_once._snapshot copies model outputs, which transformers >= 5.24 edits in place when it expands the
    # vision tower's outputs (`_expand_multimodal_outputs`).
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from paged_generate.patches.prefill_once import _snapshot

    before = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3), pooler_output=torch.ones(2, 3))
    kept = _snapshot({"image": before})
    before.pooler_output = [torch.zeros(3)] * 4
    assert isinstance(kept["image"], BaseModelOutputWithPooling) and torch.equal(kept["image"].pooler_output,
                                                                                  torch.ones(2, 3)), _moved(
        "a copied ModelOutput follows edits of the original")


def test_wrapped_models_unwrap():
    import peft

    from paged_generate.patches.wrapped_models import peft_adapter_types, transformers_model_of

    model = tiny_model("llama")
    compiled = torch.compile(model, backend="eager")
    assert compiled._orig_mod is model and transformers_model_of(compiled) is model, _moved(
        "torch.compile's OptimizedModule no longer keeps the model as _orig_mod")
    held = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert transformers_model_of(held) is model and transformers_model_of(torch.compile(held)) is model, _moved(
        f"peft {peft.__version__}: get_base_model / peft_config moved")
    assert peft_adapter_types(held) == {"default": "LORA"}
    assert peft.PeftType.PREFIX_TUNING.value == "PREFIX_TUNING"


def test_decoder_only_attention_switch_of_a_multimodal_model():
    import transformers

    from family_models import BY_NAME
    from paged_generate.attention import register_attention
    from paged_generate.patches.attention_impl import (
        ATTENTION_NAME,
        decoder_implementation,
        switch_attention,
    )

    family = BY_NAME["Llava"]
    if not hasattr(transformers, family.model_class):
        return
    model = family.build()
    register_attention()
    assert switch_attention(model, ATTENTION_NAME) and decoder_implementation(model) == ATTENTION_NAME, _moved(
        "set_attn_implementation({'text_config': name}) no longer switches the text model")
    assert model.config.vision_config._attn_implementation == "sdpa", _moved(
        "set_attn_implementation({'text_config': name}) also switched the vision tower")
    assert all(module.config._attn_implementation == ATTENTION_NAME
               for module in model.model.language_model.modules() if hasattr(module, "is_causal"))
    assert switch_attention(model, "sdpa") and decoder_implementation(model) == "sdpa"


def test_attention_modules_are_found_by_their_conventions():
    from family_models import BY_NAME
    from paged_generate.patches.compile_boundary import attention_modules

    assert callable(torch.compiler.disable) and callable(torch.compiler.is_compiling)
    for name in ("Llama", "GPT-2", "GPT-NeoX", "Gemma 3", "Gemma 3 vision"):
        model = BY_NAME[name].build()
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        found = attention_modules(model)
        assert len(found) == layers and sorted(module.layer_idx for module in found) == list(range(layers)), _moved(
            f"{name}'s attention modules no longer carry an int `layer_idx` and `is_causal`")


def test_mask_function_structure_read_by_mask_functions():
    # patches/mask_functions.py reads `and_masks`' parts and `sliding_window_overlay`'s window from their closures.
    import transformers
    from transformers import masking_utils as mu

    from paged_generate.patches.mask_functions import causal_window

    version = transformers.__version__
    padding = mu.padding_mask_function(torch.ones(1, 4, dtype=torch.bool))
    assert causal_window(mu.causal_mask_function) == (True, None), version
    assert causal_window(mu.sliding_window_causal_mask_function(7)) == (True, 7), (
        f"transformers {version}: sliding_window_causal_mask_function is no longer and_masks(sliding_window_overlay, "
        f"causal_mask_function); update patches/mask_functions.py")
    assert causal_window(mu.and_masks(mu.sliding_window_causal_mask_function(7), mu.sliding_window_overlay(3))) == (
        True, 3)
    for other in (mu.or_masks(mu.causal_mask_function, padding), mu.and_masks(mu.causal_mask_function, padding),
                  mu.bidirectional_mask_function, mu.sliding_window_overlay(3),
                  mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), lambda b, h, q, kv: kv <= q):
        assert causal_window(other) == (False, None), (version, other)


def test_prompt_forward_tensors_of_a_text_prompt_are_row_inputs():
    # prefill_once.equal_prompts compares the rows of the inputs it knows to be one per row and merges nothing when
    # another tensor reaches the prompt forward: a new per-row input from generate() would silently end the merging.
    from family_models import BY_NAME
    from paged_generate.patches.prefill_once import _CACHE_KEYS, _ROW_INPUTS, _batch_dim, _holds_tensors

    for name in ("Llama", "Qwen2-VL"):  # Qwen2-VL: multimodal position ids, rows along dimension 1
        model = BY_NAME[name].build()
        seen = {}
        prefill = model._prefill

        def spy(input_ids, generation_config, model_kwargs, *args, **kwargs):
            seen.update(model_kwargs)
            return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

        model._prefill = spy
        input_ids = torch.tensor([[0, 8, 9, 10], [4, 5, 6, 7], [0, 8, 9, 10]])
        model.generate(input_ids, attention_mask=(input_ids > 0).long(), max_new_tokens=1, pad_token_id=0)
        tensors = {key: value for key, value in seen.items() if key not in _CACHE_KEYS and _holds_tensors(value)}
        assert set(tensors) <= _ROW_INPUTS, _moved(f"{name}'s prompt forward takes {sorted(set(tensors) - _ROW_INPUTS)}")
        assert all(value.shape[_batch_dim(key, value)] == 3 for key, value in tensors.items()), _moved(
            f"{name}'s prompt forward inputs hold rows along another dimension")


def test_a_cache_swapped_in_at_the_prompt_forward_serves_the_whole_call():
    """The call rule hands a call to stock's cache inside `_prefill` by replacing model_kwargs[CACHE_KWARG]: stock's
    `_prepare_cache_for_generation` must have put its cache there, and the decoding loops must take the cache from
    the prompt forward's outputs (and the same model_kwargs) from then on."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    original = type(model)._prefill
    swapped = DynamicCache(config=model.config)
    seen = {}

    def prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        seen["prepared"] = type(model_kwargs.get(CACHE_KWARG)).__name__
        model_kwargs[CACHE_KWARG] = swapped
        return original(self, input_ids, generation_config, model_kwargs, *args, **kwargs)

    model._prefill = prefill.__get__(model)
    try:
        for kwargs in (dict(num_beams=2), dict(do_sample=False)):
            out = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3, min_new_tokens=3, pad_token_id=0,
                                 return_dict_in_generate=True, **kwargs)
            assert seen.pop("prepared") == "DynamicCache", "stock's _prepare_cache_for_generation left no DynamicCache"
            assert out.past_key_values is swapped, f"the decoding loop ({kwargs}) did not continue the prompt " \
                                                   "forward's cache"
            assert swapped.get_seq_length() == 5
            swapped = DynamicCache(config=model.config)
    finally:
        del model._prefill
