"""Models as users hold them: PEFT adapters, torch.compile, data-parallel containers, attention switches.

Every public function (`enable_paged_cache`, `disable_paged_cache`, `is_paged_cache_enabled`, `cache_stats`,
`capture_caches`) acts on the transformers model inside the wrapper and agrees whichever object it is given; every
generate() is token-identical to stock, or refused with the reason.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from family_models import BY_NAME
from paged_generate import (
    UnsupportedModelError,
    cache_stats,
    capture_caches,
    disable_paged_cache,
    enable_paged_cache,
    is_paged_cache_enabled,
)
from paged_generate.patches.attention_impl import ATTENTION_NAME, ATTENTION_NAME_EAGER
from tiny_models import left_padded_prompts, tiny_model

peft = pytest.importorskip("peft", reason="the `dev` extra installs peft; CI runs these tests")

MODES = {
    "greedy": {},
    "beam": dict(num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, num_return_sequences=2),
}
PLUGIN_ATTRIBUTES = {"generate", "_prefill", "_prepare_cache_for_generation", "_expand_inputs_for_generation",
                     "set_attn_implementation", "_paged_generate_state"}


def _inputs(max_new_tokens=6):
    input_ids, attention_mask = left_padded_prompts((13, 7))
    return dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=max_new_tokens)


def _both(held, seed=0, **kwargs):
    """(stock, paged) outputs of `held.generate(**kwargs)`, enabling and disabling through `held` itself."""
    assert not is_paged_cache_enabled(held)
    torch.manual_seed(seed)
    stock = held.generate(**kwargs)
    assert enable_paged_cache(held) is held
    try:
        torch.manual_seed(seed)
        paged = held.generate(**kwargs)
    finally:
        disable_paged_cache(held)
    return stock, paged


def _lora(model, seed=1, **config):
    torch.manual_seed(seed)
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           **config)


def _assert_untouched(model, attention="sdpa"):
    assert not PLUGIN_ATTRIBUTES & set(vars(model)), PLUGIN_ATTRIBUTES & set(vars(model))
    assert model.config._attn_implementation == attention


# --- PEFT ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
def test_lora_model_every_function_agrees(mode):
    model = tiny_model("llama")
    held = peft.get_peft_model(model, _lora(model))
    stock, paged = _both(held, seed=3, **_inputs(), **MODES[mode])
    assert torch.equal(stock, paged)

    enable_paged_cache(held)
    try:
        for view in (held, held.base_model, held.get_base_model(), model):
            assert is_paged_cache_enabled(view)
        assert model.config._attn_implementation == ATTENTION_NAME
        with capture_caches(held, record_steps=True) as captured:
            held.generate(**_inputs(), **MODES[mode])
        assert len(captured.caches) == 1 and cache_stats(held) is cache_stats(model)
        assert len(captured.steps) == 6  # the prompt forward and 5 decode steps, watched through the wrapper
        assert cache_stats(held).prefill_rows == 2
    finally:
        disable_paged_cache(held)
    assert not any(is_paged_cache_enabled(view) for view in (held, held.base_model, model))
    _assert_untouched(model)
    torch.manual_seed(3)
    assert torch.equal(held.generate(**_inputs(), **MODES[mode]), stock)  # stock again


def test_lora_adapter_changes_the_tokens():
    model = tiny_model("llama")
    base = model.generate(**_inputs(), num_beams=3)
    held = peft.get_peft_model(model, _lora(model))
    assert not torch.equal(held.generate(**_inputs(), num_beams=3), base)


def test_enabling_the_inner_model_shows_through_the_wrapper():
    model = tiny_model("llama")
    held = peft.get_peft_model(model, _lora(model))
    enable_paged_cache(held.get_base_model())
    assert is_paged_cache_enabled(held)
    held.generate(**_inputs(), num_beams=2)
    assert cache_stats(held).rows == 4
    disable_paged_cache(held)  # through the wrapper: the inner model is fully disabled
    _assert_untouched(model)
    assert held.generate(**_inputs()).shape == (2, 19)


def test_adapters_switched_disabled_and_merged():
    model = tiny_model("llama")
    held = peft.get_peft_model(model, _lora(model, seed=1), adapter_name="first")
    held.add_adapter("second", _lora(model, seed=2))
    torch.manual_seed(2)
    for module in held.modules():  # the second adapter's weights: random, like the first's
        if hasattr(module, "lora_B") and "second" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["second"].weight, std=0.5)
    kwargs = dict(**_inputs(), num_beams=3, num_return_sequences=2)

    def both(action):
        stock = action()
        enable_paged_cache(held)
        try:
            paged = action()
        finally:
            disable_paged_cache(held)
        assert torch.equal(stock, paged)
        return stock

    first = both(lambda: held.generate(**kwargs))
    held.set_adapter("second")
    second = both(lambda: held.generate(**kwargs))

    def without_adapter():
        with held.disable_adapter():
            return held.generate(**kwargs)

    base = both(without_adapter)
    assert len({tuple(tokens.flatten().tolist()) for tokens in (first, second, base)}) == 3

    # Merged while enabled: the same transformers model, still enabled, now without adapters.
    enable_paged_cache(held)
    merged = held.merge_and_unload()
    assert merged is model and is_paged_cache_enabled(merged)
    paged = merged.generate(**kwargs)
    disable_paged_cache(merged)
    assert torch.equal(paged, second) and torch.equal(merged.generate(**kwargs), second)


def _adaption_prompt(model):
    config = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=1)
    held = peft.get_peft_model(model, config)
    with torch.no_grad():  # zero-initialised gates would make the adapter a no-op
        for name, parameter in held.named_parameters():
            if "adaption_gate" in name:
                parameter.fill_(1.0)
    return held


ADAPTERS = {
    "ia3": lambda model: peft.get_peft_model(model, peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
        init_ia3_weights=False)),
    "prompt tuning": lambda model: peft.get_peft_model(model, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5)),
    "p-tuning": lambda model: peft.get_peft_model(model, peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16)),
    "adaption prompt": _adaption_prompt,
}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapters_leaving_attention_to_the_model(adapter):
    """Weight adapters, virtual-token embeddings and adaption prompts leave the cache to generate()."""
    model = tiny_model("llama")
    kwargs = dict(**_inputs(), num_beams=3, num_return_sequences=2)
    base = model.generate(**kwargs)
    torch.manual_seed(4)
    held = ADAPTERS[adapter](model)
    stock, paged = _both(held, **kwargs)
    assert torch.equal(stock, paged) and not torch.equal(stock, base)


def test_prefix_tuning_is_refused_with_the_reason():
    model = tiny_model("llama")
    held = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with pytest.raises(UnsupportedModelError, match=r"PREFIX_TUNING.*cache PEFT builds"):
        enable_paged_cache(held)
    assert not is_paged_cache_enabled(held)
    _assert_untouched(model)


def test_peft_model_without_a_task_type():
    model = tiny_model("llama")
    held = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert type(held) is peft.PeftModel
    stock, paged = _both(held, **_inputs(), num_beams=2)
    assert torch.equal(stock, paged)


# --- torch.compile and containers -----------------------------------------------------------------------------------
def test_compiled_module_is_enabled_through():
    model = tiny_model("llama")
    held = torch.compile(model, backend="eager")
    assert held is not model and held._orig_mod is model
    stock, paged = _both(held, **_inputs(), num_beams=2)
    assert torch.equal(stock, paged)
    enable_paged_cache(held)
    assert is_paged_cache_enabled(model) and is_paged_cache_enabled(held)
    held.generate(**_inputs())
    assert cache_stats(held) is cache_stats(model)
    disable_paged_cache(model)
    assert not is_paged_cache_enabled(held)
    _assert_untouched(model)


def test_compiled_peft_model_and_peft_model_of_a_compiled_model():
    model = tiny_model("llama")
    held = torch.compile(peft.get_peft_model(model, _lora(model)), backend="eager")
    enable_paged_cache(held)
    assert is_paged_cache_enabled(model)
    disable_paged_cache(held)
    _assert_untouched(model)


def _compiled_generate(layers: int, max_new_tokens: int, paged: bool, **mode):
    """(tokens, graphs dynamo compiled, graph breaks) of generate() on a tiny Llama whose forward is compiled
    (`model.compile`, the "eager" backend: dynamo's tracing and guards without code generation), failing on dynamo's
    recompile limit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    config = dict(tiny_model("llama").config.to_dict(), num_hidden_layers=layers)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    if paged:
        enable_paged_cache(model)
    model.compile(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    fail = {"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") else {}
    with torch._dynamo.config.patch(**fail):
        torch.manual_seed(0)
        tokens = model.generate(**_inputs(max_new_tokens), **mode)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return tokens, graphs, breaks


def test_compiled_forward_compiles_a_bounded_number_of_graphs():
    """The paged cache's per-step bookkeeping stays out of the compiled graph: the graphs dynamo compiles do not grow
    with the steps (a recompile per step would also hit dynamo's recompile limit, which fails here)."""
    stock, stock_graphs, _ = _compiled_generate(layers=2, max_new_tokens=3, paged=False)
    short, short_graphs, _ = _compiled_generate(layers=2, max_new_tokens=3, paged=True)
    long, long_graphs, _ = _compiled_generate(layers=2, max_new_tokens=7, paged=True)
    assert torch.equal(short, stock) and torch.equal(long[:, : short.shape[1]], short)
    assert long_graphs == short_graphs
    assert stock_graphs <= short_graphs <= 16  # the graph breaks around each layer's attention cost a few more


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["beam", "sample"])
def test_compiled_forward_graphs_do_not_grow_with_layers(mode):
    stock, _, _ = _compiled_generate(layers=2, max_new_tokens=6, paged=False, **MODES[mode])
    paged, two_layers, _ = _compiled_generate(layers=2, max_new_tokens=6, paged=True, **MODES[mode])
    _, six_layers, _ = _compiled_generate(layers=6, max_new_tokens=6, paged=True, **MODES[mode])
    assert torch.equal(stock, paged) and two_layers == six_layers


def test_static_cache_compiles_as_stock_on_an_enabled_model():
    """The plugin steps aside for `cache_implementation="static"`, and so does the compile boundary: the same graphs,
    no breaks."""
    stock = _compiled_generate(layers=2, max_new_tokens=3, paged=False, cache_implementation="static")
    enabled = _compiled_generate(layers=2, max_new_tokens=3, paged=True, cache_implementation="static")
    assert torch.equal(stock[0], enabled[0]) and stock[1:] == enabled[1:] and enabled[2] == 0


def test_data_parallel_container():
    model = tiny_model("llama")
    held = torch.nn.DataParallel(model)
    enable_paged_cache(held)
    try:
        assert is_paged_cache_enabled(model)
        paged = held.module.generate(**_inputs(), num_beams=2)
    finally:
        disable_paged_cache(held)
    _assert_untouched(model)
    assert torch.equal(paged, model.generate(**_inputs(), num_beams=2))


def test_accelerate_prepared_and_unwrapped_model():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_model("llama")
    prepared = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(prepared)
    stock, paged = _both(unwrapped, **_inputs(), num_beams=2)
    assert torch.equal(stock, paged)
    enable_paged_cache(prepared)
    assert is_paged_cache_enabled(unwrapped) and is_paged_cache_enabled(model)
    disable_paged_cache(unwrapped)
    assert not is_paged_cache_enabled(prepared)


def test_something_that_is_not_a_generation_model_is_refused_naming_it():
    with pytest.raises(UnsupportedModelError, match=r"Linear \(inside DataParallel\) is not a transformers"):
        enable_paged_cache(torch.nn.DataParallel(torch.nn.Linear(2, 2)))


# --- attention switches -------------------------------------------------------------------------------------------
def test_switches_while_enabled_run_their_paged_stand_in_and_disable_restores_the_latest():
    model = tiny_model("llama")
    kwargs = dict(**_inputs(), num_beams=3)
    enable_paged_cache(model)
    try:
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == ATTENTION_NAME_EAGER
        paged_eager = model.generate(**kwargs)
        assert cache_stats(model).rows == 6  # still paged
    finally:
        disable_paged_cache(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model.generate(**kwargs), paged_eager)

    enable_paged_cache(model)
    assert model.config._attn_implementation == ATTENTION_NAME_EAGER
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == ATTENTION_NAME
    disable_paged_cache(model)
    _assert_untouched(model, "sdpa")


def test_a_switch_transformers_refuses_raises_its_error_and_keeps_the_plugin():
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed: transformers would accept the switch")
    except ImportError:
        pass
    model = tiny_model("llama")
    kwargs = dict(**_inputs(), num_beams=2)
    stock = model.generate(**kwargs)
    enable_paged_cache(model)
    try:
        with pytest.raises(ImportError, match="FlashAttention2"):
            model.set_attn_implementation("flash_attention_2")
        assert model.config._attn_implementation == ATTENTION_NAME
        assert torch.equal(model.generate(**kwargs), stock)
    finally:
        disable_paged_cache(model)
    _assert_untouched(model, "sdpa")


def test_a_switch_to_eager_without_a_family_eager_function_is_refused_at_the_switch(monkeypatch):
    import transformers.models.llama.modeling_llama as modeling_llama

    model = tiny_model("llama")
    kwargs = dict(**_inputs(), num_beams=2)
    stock = model.generate(**kwargs)
    enable_paged_cache(model)
    try:
        monkeypatch.delattr(modeling_llama, "eager_attention_forward")
        with pytest.raises(UnsupportedModelError, match="eager_attention_forward"):
            model.set_attn_implementation("eager")
        monkeypatch.undo()
        assert model.config._attn_implementation == ATTENTION_NAME
        assert torch.equal(model.generate(**kwargs), stock)
    finally:
        disable_paged_cache(model)
    _assert_untouched(model, "sdpa")


def test_flex_attention_runs_as_sdpa_while_enabled():
    """flex_attention (like flash_attention_*) computes SDPA's attention; while enabled the decoder runs the SDPA
    stand-in (the Triton kernels on CUDA), so the tokens are stock SDPA's. Flex itself needs a compiler this test
    machine may lack, so stock SDPA is the reference."""
    model = tiny_model("llama")
    kwargs = dict(**_inputs(), num_beams=3)
    stock_sdpa = model.generate(**kwargs)
    model.set_attn_implementation("flex_attention")
    enable_paged_cache(model)
    try:
        assert model.config._attn_implementation == ATTENTION_NAME
        assert torch.equal(model.generate(**kwargs), stock_sdpa)
        model.set_attn_implementation("sdpa")
        model.set_attn_implementation("flex_attention")  # switched while enabled: the same stand-in
        assert model.config._attn_implementation == ATTENTION_NAME
    finally:
        disable_paged_cache(model)
    assert model.config._attn_implementation == "flex_attention"


def test_flex_attention_with_a_softcap_runs_the_eager_stand_in():
    """SDPA has no attention softcap; flex applies it, as eager does: a softcapped model on flex runs eager's
    stand-in while enabled."""
    family = BY_NAME["Gemma 2"]
    model = family.build()
    model.set_attn_implementation("eager")
    kwargs = dict(**_inputs(), num_beams=3)
    stock_eager = model.generate(**kwargs)
    model.set_attn_implementation("flex_attention")
    enable_paged_cache(model)
    try:
        assert model.config._attn_implementation == ATTENTION_NAME_EAGER
        assert torch.equal(model.generate(**kwargs), stock_eager)
    finally:
        disable_paged_cache(model)
    assert model.config._attn_implementation == "flex_attention"


def test_a_vision_language_model_keeps_its_vision_towers_attention():
    family = BY_NAME["Llava"]
    if not hasattr(transformers, family.model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {family.model_class}")
    model = family.build()
    model.set_attn_implementation({"vision_config": "eager"})
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision._attn_implementation, text._attn_implementation) == ("eager", "sdpa")
    enable_paged_cache(model)
    try:
        assert (vision._attn_implementation, text._attn_implementation) == ("eager", ATTENTION_NAME)
        model.set_attn_implementation("eager")  # the user's switch reaches both; the decoder runs its stand-in
        assert (vision._attn_implementation, text._attn_implementation) == ("eager", ATTENTION_NAME_EAGER)
    finally:
        disable_paged_cache(model)
    assert (vision._attn_implementation, text._attn_implementation) == ("eager", "eager")
