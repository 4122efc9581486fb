"""The plugin inside the rest of the Hugging Face stack: pipelines, save/load, device maps, dtypes, generation options.

Every case runs stock and paged with the same seed and asserts identical tokens (and scores, text, weights where
the option returns them), or that the plugin steps aside / refuses exactly as documented.

One tiny Llama-like model is used throughout: a word-level tokenizer trained here on a few sentences, the model built
with that vocabulary, both saved with `save_pretrained` (safetensors) and loaded back with `from_pretrained`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from contextlib import redirect_stdout

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
    pipeline,
)

from family_models import BY_NAME, left_padded_prompts
from helpers import generate_both, sequences
from paged_generate import PagedCache, cache_stats, disable_paged_cache, enable_paged_cache
from paged_generate.cache import PagedLayer, paged_read_of
from paged_generate.patches.compat import CACHE_KWARG

SENTENCES = [
    "the cat sat on the mat and looked at the door",
    "a dog ran across the green field after the red ball",
    "we walk to the old market every morning before work",
    "she reads a long book about ships and the cold sea",
    "the small bird sings in the tall tree near our house",
    "my brother cooks rice and beans for the whole family",
    "rain fell on the quiet town all night long",
    "they built a wooden boat and sailed to the island",
]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0 1 2 3, as the family configs expect


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Directory with the tokenizer and the model saved by `save_pretrained` (safetensors)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _train_tokenizer()
    assert tokenizer.convert_tokens_to_ids(SPECIAL) == [0, 1, 2, 3]
    llama = BY_NAME["Llama"]
    family = dataclasses.replace(llama, config_kwargs={**llama.config_kwargs, "vocab_size": len(tokenizer)})
    model = family.build()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def tokenizer(saved):
    return AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def model(saved):
    return AutoModelForCausalLM.from_pretrained(saved).eval()


@pytest.fixture(scope="module")
def vocab(model):
    return model.config.vocab_size


def _batch(vocab, lengths=(37, 21), seed=0):
    input_ids, attention_mask = left_padded_prompts(lengths, seed=seed, vocab=vocab)
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def _same(stock, paged):
    assert torch.equal(sequences(stock), sequences(paged))


# --- pipeline, save / load, device_map -----------------------------------------------------------------------------
def test_pipeline_beams_and_return_sequences(model, tokenizer):
    prompts = [
        "the cat sat on the mat and looked at the door while a dog ran across the green field after the red ball",
        "rain fell on the quiet town",
    ]
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12, do_sample=False, batch_size=2)
    disable_paged_cache(model)
    stock = generator(prompts, **kwargs)
    enable_paged_cache(model)
    try:
        paged = generator(prompts, **kwargs)
        stats = cache_stats(model)
    finally:
        disable_paged_cache(model)
    assert paged == stock
    assert [len(outputs) for outputs in paged] == [2, 2]
    for prompt, outputs in zip(prompts, paged):
        assert all(output["generated_text"].startswith(prompt) for output in outputs)
    assert stats.prefill_rows == 2 and stats.rows == 6


def _pool_placements(monkeypatch):
    """Collects, for each paged call, every layer's (pool device, dtype, blocks) just before its cache is released."""
    seen = []
    release = PagedCache.release

    def spy(cache):
        seen.append([(layer.keys.device, layer.keys.dtype, layer.keys.shape[0]) for layer in cache.layers])
        return release(cache)

    monkeypatch.setattr(PagedCache, "release", spy)
    return seen


def _layer_params(model):
    return [(layer.self_attn.k_proj.weight.device, layer.self_attn.k_proj.weight.dtype) for layer in model.model.layers]


@pytest.mark.parametrize(
    "device_map",
    ["cpu", {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}],
    ids=["cpu", "explicit"],
)
def test_device_map_pools_on_each_layers_device(saved, vocab, device_map, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(saved, device_map=device_map).eval()
    seen = _pool_placements(monkeypatch)
    stock, paged, _ = generate_both(model, **_batch(vocab), max_new_tokens=12, num_beams=3)
    _same(stock, paged)
    (placements,) = seen
    assert [(device, dtype) for device, dtype, _ in placements] == _layer_params(model)
    assert all(num_blocks > 0 for _, _, num_blocks in placements)


def test_layer_pools_follow_their_own_kv_device_and_dtype():
    """What a multi-device `device_map` relies on: each layer's pool takes the device and dtype of the K/V it gets
    (the "meta" device stands in for a second accelerator on a CPU-only machine)."""
    cache = PagedCache(num_layers=3, block_size=4)
    placements = [("cpu", torch.float32), ("meta", torch.bfloat16), ("cpu", torch.float16)]
    for layer, (device, dtype) in zip(cache.layers, placements):
        key = torch.ones(2, 2, 6, 8, device=device, dtype=dtype)
        keys, values = layer.update(key, key.clone(), 0)
        assert isinstance(layer, PagedLayer)
        assert keys.device.type == values.device.type == device and keys.dtype == values.dtype == dtype
        assert keys.shape[1:] == (4, 2, 8)  # [num_blocks, block_size, num_kv_heads, head_dim]
        assert paged_read_of(keys).device_step.slot_mapping.device.type == device  # metadata on the layer's device
    assert cache.get_seq_length() == 6


# --- dtypes ----------------------------------------------------------------------------------------------------------
def _cpu_supports(dtype) -> bool:
    try:
        a = torch.ones(2, 4, 3, 8, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(a, a, a)
        torch.nn.functional.linear(a, torch.ones(8, 8, dtype=dtype))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "mode", [dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=3)],
    ids=["greedy", "beam", "sample"],
)
def test_half_precision(saved, vocab, dtype, mode):
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build of torch has no {dtype} attention")
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype).eval()
    assert model.dtype == dtype
    stock, paged, stats = generate_both(model, seed=3, **_batch(vocab), max_new_tokens=16, **mode)
    _same(stock, paged)
    assert stats.peak_kv_bytes > 0


# --- generation options ----------------------------------------------------------------------------------------------
def test_generation_config_object(model, vocab):
    config = GenerationConfig(num_beams=3, num_return_sequences=2, max_new_tokens=14, pad_token_id=0, eos_token_id=2,
                              length_penalty=0.8)
    stock, paged, stats = generate_both(model, **_batch(vocab), generation_config=config)
    _same(stock, paged)
    assert stats.prefill_rows == 2


def test_models_own_generation_config(model, vocab):
    saved_config = copy.deepcopy(model.generation_config)
    model.generation_config.update(do_sample=True, num_return_sequences=3, max_new_tokens=14, top_k=10, temperature=0.8)
    try:
        stock, paged, stats = generate_both(model, seed=5, **_batch(vocab))
    finally:
        model.generation_config = saved_config
    _same(stock, paged)
    assert stats.rows == 6


def _eos_candidates(model, vocab):
    """Two tokens the model produces a few steps in, so that they end some rows early when used as EOS."""
    probe = model.generate(**_batch(vocab), max_new_tokens=12, num_beams=3)
    width = _batch(vocab)["input_ids"].shape[1]
    return [int(probe[0, width + 4]), int(probe[1, width + 7])]


@pytest.mark.parametrize(
    "lengths",
    [dict(max_length=52), dict(max_new_tokens=20, min_new_tokens=15), dict(max_new_tokens=16, min_length=45)],
    ids=["max_length", "min_new_tokens", "min_length"],
)
def test_length_limits(model, vocab, lengths):
    eos = _eos_candidates(model, vocab)
    for mode in (dict(), dict(num_beams=3, num_return_sequences=2)):
        stock, paged, _ = generate_both(model, **_batch(vocab), eos_token_id=eos, pad_token_id=0, **lengths, **mode)
        _same(stock, paged)


def test_eos_list_and_pad_token(model, vocab):
    eos = _eos_candidates(model, vocab)
    for mode in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=3)):
        stock, paged, _ = generate_both(
            model, seed=2, **_batch(vocab), max_new_tokens=20, eos_token_id=eos, pad_token_id=5, **mode
        )
        _same(stock, paged)
    greedy, _, _ = generate_both(model, **_batch(vocab), max_new_tokens=20, eos_token_id=eos, pad_token_id=5)
    assert (greedy[:, -1] == 5).any() or any(token in greedy[:, 37:] for token in eos), "no EOS reached"


@pytest.mark.parametrize(
    "option",
    [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2), "bad_words_ids"],
    ids=["repetition_penalty", "no_repeat_ngram_size", "bad_words_ids"],
)
def test_logits_options(model, vocab, option):
    if option == "bad_words_ids":
        probe = model.generate(**_batch(vocab), max_new_tokens=10)
        option = dict(bad_words_ids=[[int(probe[0, -9])], [int(probe[1, -6]), int(probe[1, -5])]])
    for mode in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)):
        stock, paged, _ = generate_both(model, seed=4, **_batch(vocab), max_new_tokens=20, **option, **mode)
        _same(stock, paged)


class EvenTokensOnlyAfterOdd(LogitsProcessor):
    """Depends on each row's history: after an odd token only even tokens are allowed."""

    def __call__(self, input_ids, scores):
        odd = (input_ids[:, -1] % 2 == 1)[:, None]
        banned = odd & (torch.arange(scores.shape[-1]) % 2 == 1)[None, :]
        return scores.masked_fill(banned, float("-inf"))


class StopAtToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_custom_logits_processor_and_stopping_criteria(model, vocab):
    stop = _eos_candidates(model, vocab)[0]
    for mode in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)):
        stock, paged, _ = generate_both(
            model, seed=6, **_batch(vocab), max_new_tokens=20,
            logits_processor=LogitsProcessorList([EvenTokensOnlyAfterOdd()]),
            stopping_criteria=StoppingCriteriaList([StopAtToken(stop)]), **mode,
        )
        _same(stock, paged)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sample"])
def test_text_streamer(model, tokenizer, sample):
    ids = tokenizer(["the small bird sings in the tall tree near our house and a dog ran across the green"],
                    return_tensors="pt")
    printed = []
    outputs = []
    for enabled in (False, True):
        (enable_paged_cache if enabled else disable_paged_cache)(model)
        try:
            torch.manual_seed(8)
            stdout = io.StringIO()
            with redirect_stdout(stdout):
                outputs.append(model.generate(**ids, max_new_tokens=14, do_sample=sample,
                                              streamer=TextStreamer(tokenizer, skip_prompt=True)))
            printed.append(stdout.getvalue())
        finally:
            disable_paged_cache(model)
    assert torch.equal(outputs[0], outputs[1])
    assert printed[0] == printed[1] and printed[0].strip()
    new_tokens = outputs[1][0, ids["input_ids"].shape[1] :]
    assert printed[1].strip() == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "mode", [dict(), dict(do_sample=True, num_return_sequences=3), dict(num_beams=3, num_return_sequences=2)],
    ids=["greedy", "sample", "beam"],
)
def test_scores_and_logits(model, vocab, mode):
    stock, paged, _ = generate_both(
        model, seed=9, **_batch(vocab), max_new_tokens=10, return_dict_in_generate=True, output_scores=True,
        output_logits=True, **mode,
    )
    _same(stock, paged)
    for name in ("scores", "logits"):
        assert len(getattr(stock, name)) == len(getattr(paged, name))
        for stock_step, paged_step in zip(getattr(stock, name), getattr(paged, name)):
            torch.testing.assert_close(paged_step, stock_step, atol=1e-4, rtol=0)


def _stock_then_paged(model, seed=0, **kwargs):
    """Like helpers.generate_both, for calls where the plugin builds no cache (so there are no figures to fetch)."""
    outputs = []
    for enabled in (False, True):
        (enable_paged_cache if enabled else disable_paged_cache)(model)
        try:
            torch.manual_seed(seed)
            outputs.append(model.generate(**kwargs))
        finally:
            disable_paged_cache(model)
    return outputs


def test_use_cache_false_runs_stock(model, vocab):
    for mode in (dict(), dict(num_beams=3), dict(do_sample=True, num_return_sequences=2)):
        stock, paged = _stock_then_paged(model, **_batch(vocab), max_new_tokens=10, use_cache=False, **mode)
        _same(stock, paged)


def test_inputs_embeds(model, vocab):
    batch = _batch(vocab)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    for mode in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)):
        stock, paged, stats = generate_both(
            model, seed=1, inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=12, **mode
        )
        _same(stock, paged)
        assert stock.shape[1] <= 12  # with inputs_embeds only the new tokens come back
        assert stats.max_seq_len > 37


def test_beam_sample(model, vocab):
    stock, paged, stats = generate_both(
        model, seed=12, **_batch(vocab), max_new_tokens=14, do_sample=True, num_beams=3, num_return_sequences=2
    )
    _same(stock, paged)
    assert stats.prefill_rows == 2


@pytest.fixture(scope="module")
def assistant(saved, model):
    """A second tiny model with the same vocabulary (other seed, one layer)."""
    llama = BY_NAME["Llama"]
    family = dataclasses.replace(
        llama, config_kwargs={**llama.config_kwargs, "vocab_size": model.config.vocab_size, "num_hidden_layers": 1}
    )
    return family.build(seed=1)


@pytest.mark.parametrize("enable_assistant", [False, True], ids=["main-only", "both"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sample"])
def test_assisted_generation(model, assistant, tokenizer, enable_assistant, sample):
    ids = tokenizer(["a dog ran across the green field after the red ball and the cat sat on the mat"],
                    return_tensors="pt")
    pristine = copy.deepcopy(assistant.generation_config)  # the assistant adapts its draft length call by call
    outputs, forwards = [], []
    hook = assistant.get_input_embeddings().register_forward_hook(
        lambda module, args, out: forwards[-1].append(args[0].shape[1])  # tokens fed to the assistant per forward
    )
    for enabled in (False, True):
        assistant.generation_config = copy.deepcopy(pristine)
        forwards.append([])
        if enabled:
            enable_paged_cache(model)
            if enable_assistant:
                enable_paged_cache(assistant)
        try:
            torch.manual_seed(13)
            outputs.append(model.generate(**ids, assistant_model=assistant, max_new_tokens=20, do_sample=sample))
            if enabled:
                assert cache_stats(model).max_seq_len > ids["input_ids"].shape[1]
                if enable_assistant:
                    assert cache_stats(assistant).prefill_rows == 1
        finally:
            disable_paged_cache(model)
            disable_paged_cache(assistant)
    hook.remove()
    assert torch.equal(outputs[0], outputs[1])
    # The assistant's cache survives from one round to the next as stock's does: same tokens fed, none re-read.
    assert forwards[0] == forwards[1] and forwards[0][0] == ids["input_ids"].shape[1] and max(forwards[0][1:]) < 8


def test_contrastive_search_is_treated_exactly_as_stock(model, vocab):
    """Contrastive search (and DoLa, group / constrained beam search) now load their loop from the Hub: offline, stock
    refuses without trust_remote_code, and so does the plugin, with the same error."""
    kwargs = dict(**_batch(vocab), max_new_tokens=8, penalty_alpha=0.6, top_k=4)
    errors = []
    for enabled in (False, True):
        (enable_paged_cache if enabled else disable_paged_cache)(model)
        try:
            with pytest.raises(ValueError, match="trust_remote_code") as error:
                model.generate(**kwargs)
            errors.append(str(error.value))
        finally:
            disable_paged_cache(model)
    assert errors[0] == errors[1]


def test_loops_the_plugin_does_not_vouch_for_get_the_stock_cache(model, vocab):
    """A `custom_generate` loop (or a Hub one such as contrastive search) may handle the cache its own way: it gets
    stock's DynamicCache, so its tokens are stock's."""
    seen = []

    def custom_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        seen.append(type(model_kwargs[CACHE_KWARG]))
        return model._sample(input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                             generation_config=generation_config, **model_kwargs)

    kwargs = dict(**_batch(vocab), max_new_tokens=8, custom_generate=custom_generate)
    disable_paged_cache(model)
    stock = model.generate(**kwargs)
    enable_paged_cache(model)
    try:
        paged = model.generate(**kwargs)
        plain = model.generate(**_batch(vocab), max_new_tokens=8)
    finally:
        disable_paged_cache(model)
    _same(stock, paged)
    _same(stock, plain)
    assert seen == [DynamicCache, DynamicCache]

    from transformers.generation.configuration_utils import GenerationMode

    from paged_generate.patches.generate import PAGED_MODES

    assert GenerationMode.CONTRASTIVE_SEARCH not in PAGED_MODES and GenerationMode.DOLA_GENERATION not in PAGED_MODES


# --- output_attentions -----------------------------------------------------------------------------------------------
def _attentions(output):
    return [list(step) for step in output.attentions]


@pytest.mark.parametrize(
    "mode", [dict(), dict(do_sample=True, num_return_sequences=2), dict(num_beams=3, num_return_sequences=2)],
    ids=["greedy", "sample", "beam"],
)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_output_attentions(saved, vocab, implementation, mode):
    """Stock SDPA returns no weights (and warns), stock eager returns them: the plugin returns the same either way."""
    model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation=implementation).eval()
    stock, paged, _ = generate_both(
        model, seed=10, **_batch(vocab), max_new_tokens=6, return_dict_in_generate=True, output_attentions=True, **mode
    )
    _same(stock, paged)
    stock_weights, paged_weights = _attentions(stock), _attentions(paged)
    assert len(stock_weights) == len(paged_weights) == 6
    for stock_step, paged_step in zip(stock_weights, paged_weights):
        assert len(stock_step) == len(paged_step)
        for stock_layer, paged_layer in zip(stock_step, paged_step):
            torch.testing.assert_close(paged_layer, stock_layer, atol=1e-5, rtol=0)
    if implementation == "eager":
        assert stock_weights[0] and stock_weights[0][0].shape[-1] == 37  # the prompt step's weights are there
    else:
        assert not any(stock_weights)
