"""generate() with the Triton kernels forced on (under TRITON_INTERPRET=1 on CPU) gives stock's tokens."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import sequences  # noqa: E402
from tiny_models import left_padded_prompts, tiny_model  # noqa: E402

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request, device):
    return tiny_model(request.param).to(device)


def _both(model, device, seed=0, **kwargs):
    input_ids, attention_mask = left_padded_prompts((21, 12))
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), pad_token_id=0, **kwargs)
    disable_paged_cache(model)
    torch.manual_seed(seed)
    stock = model.generate(**kwargs)
    enable_paged_cache(model, backend="triton")
    try:
        calls = _count_kernel_calls(model, seed, kwargs)
        torch.manual_seed(seed)
        paged = model.generate(**kwargs)
        assert cache_stats(model).prefill_rows == 2
    finally:
        disable_paged_cache(model)
    return stock, paged, calls


def _count_kernel_calls(model, seed, kwargs):
    from paged_generate import kernels

    names = ("launch_paged_attention", "launch_shared_prefix_paged_attention")
    calls = dict.fromkeys(names, 0)
    originals = {name: getattr(kernels, name) for name in names}

    def counting(name):
        def call(*args, **kw):
            calls[name] += 1
            return originals[name](*args, **kw)

        return call

    for name in names:
        setattr(kernels, name, counting(name))
    try:
        torch.manual_seed(seed)
        model.generate(**{**kwargs, "max_new_tokens": 2})
    finally:
        for name, original in originals.items():
            setattr(kernels, name, original)
    return calls


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
def test_beam_search_with_kernels(model, device, split, monkeypatch):
    from paged_generate.attention import split_rule

    # The 21-token prompts leave one full block shared by each prompt's beams: far below the threshold where the split
    # pays, so it is forced for one case.
    if split:
        monkeypatch.setitem(split_rule.SPLIT_MIN_REDUNDANT_TOKENS, "triton", 1)
    stock, paged, calls = _both(model, device, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert torch.equal(sequences(stock), sequences(paged))
    # Every layer runs a kernel: the plain one for the prompt, then for the decode step the shared-prefix one when the
    # split pays, else the plain one again.
    layers = model.config.num_hidden_layers
    expected = {"launch_paged_attention": layers, "launch_shared_prefix_paged_attention": layers} if split else {
        "launch_paged_attention": 2 * layers, "launch_shared_prefix_paged_attention": 0}
    assert calls == expected


def test_sampling_with_kernels(model, device):
    stock, paged, _ = _both(model, device, seed=3, max_new_tokens=8, do_sample=True, num_return_sequences=3)
    assert torch.equal(stock, paged)




@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
def test_compressed_cache_with_kernels_matches_the_pytorch_path(model, device, split, monkeypatch):
    # Both read the same stored blocks, dequantized in registers or once per step; only rounding differs, and on
    # this peaked model the tokens agree. Llama stores int8, Mistral (sliding window) fp8. In bf16: the kernels leave
    # compressed fp32 caches to the PyTorch path (those variants would spill on a GPU).
    from paged_generate.attention import split_rule

    if split:
        monkeypatch.setitem(split_rule.SPLIT_MIN_REDUNDANT_TOKENS, "triton", 1)
    model = copy.deepcopy(model).to(torch.bfloat16)
    kv_cache_dtype = "int8" if model.config.model_type == "llama" else "fp8"
    input_ids, attention_mask = left_padded_prompts((37, 12))
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), pad_token_id=0,
                  max_new_tokens=6, num_beams=3, num_return_sequences=2)
    outputs = {}
    for backend in ("torch", "triton"):
        enable_paged_cache(model, backend=backend, kv_cache_dtype=kv_cache_dtype)
        try:
            outputs[backend] = model.generate(**kwargs)
            assert cache_stats(model).kv_cache_dtype == kv_cache_dtype
        finally:
            disable_paged_cache(model)
    assert torch.equal(outputs["torch"], outputs["triton"])
    enable_paged_cache(model, backend="triton", kv_cache_dtype=kv_cache_dtype)
    try:
        calls = _count_kernel_calls(model, 0, kwargs)
    finally:
        disable_paged_cache(model)
    layers = model.config.num_hidden_layers
    expected = {"launch_paged_attention": layers, "launch_shared_prefix_paged_attention": layers} if split else {
        "launch_paged_attention": 2 * layers, "launch_shared_prefix_paged_attention": 0}
    assert calls == expected
