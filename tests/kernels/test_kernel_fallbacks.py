"""With the Triton kernels forced on (under TRITON_INTERPRET=1 on CPU), what they cannot serve takes the exact PyTorch
path instead of failing mid-generate(): head_dim > 256 and a value head_dim of its own (decided once, when a layer's
pools are created) and a query of another dtype than the pools' (decided per call: autocast hands attention fp32
queries and keys but bf16 values)."""

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import COMMON, left_padded_prompts, tiny_model  # noqa: E402

from paged_generate import disable_paged_cache, enable_paged_cache, kernels  # noqa: E402
from paged_generate.attention.dispatch import paged_attention  # noqa: E402
from paged_generate.cache import PagedCache, paged_read_of  # noqa: E402


def _generate_both(model, device, **kwargs):
    ids, mask = left_padded_prompts((21, 12))
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=0, max_new_tokens=6, **kwargs)
    disable_paged_cache(model)
    stock = model.generate(**kwargs)
    enable_paged_cache(model, backend="triton")
    try:
        paged = model.generate(**kwargs)
    finally:
        disable_paged_cache(model)
    return stock, paged


def _count_attention_kernels(monkeypatch) -> list:
    calls = []
    for name in ("launch_paged_attention", "launch_shared_prefix_paged_attention"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    return calls


def test_head_dim_above_256(device, monkeypatch):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, head_dim=320)).eval().to(device)
    calls = _count_attention_kernels(monkeypatch)
    stock, paged = _generate_both(model, device, num_beams=2)
    assert torch.equal(stock, paged) and not calls


def test_query_of_another_dtype_under_autocast(device, monkeypatch):
    # Under bf16 autocast the projections give bf16, rotary embeddings turn queries and keys back to fp32: the pools
    # then hold fp32 keys and bf16 values, which no kernel reads. Stock's SDPA runs under autocast all the same.
    model = tiny_model("llama").to(device)
    calls = _count_attention_kernels(monkeypatch)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        stock, paged = _generate_both(model, device)
    assert torch.equal(stock, paged) and not calls


def test_value_head_dim_of_its_own(device):
    # A layer whose values are wider than its keys (as MLA models have): the pools take the PyTorch path.
    class Module(torch.nn.Module):
        is_causal = True
        scaling = 16**-0.5
        num_key_value_groups = 2

    cache = PagedCache(num_layers=1, backend="triton")
    torch.manual_seed(0)
    key, value = torch.randn(2, 2, 5, 16).to(device), torch.randn(2, 2, 5, 32).to(device)
    query = torch.randn(2, 4, 5, 16).to(device)
    keys, _ = cache.layers[0].update(key, value)
    assert not cache.layers[0].use_triton
    read = paged_read_of(keys)
    out, _ = paged_attention("sdpa", read, Module(), query, None)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
