"""With the Triton kernels forced on (under TRITON_INTERPRET=1 on CPU), every mask gives stock's logits: what the
kernels cannot apply (image tokens attending both ways, a prefix-LM, a user's 4D mask) takes the exact path, and a
sliding window that only the mask carries (Qwen2-MoE passes no `sliding_window` to attention) reaches the kernels."""

import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from family_models import INIT, LLAMA_LIKE, TOKENS, VOCAB  # noqa: E402
from helpers import sequences  # noqa: E402
from tiny_models import left_padded_prompts, tiny_model  # noqa: E402

from paged_generate import disable_paged_cache, enable_paged_cache, kernels  # noqa: E402
from paged_generate.cache import PagedCache  # noqa: E402
from paged_generate.patches.compat import CACHE_KWARG  # noqa: E402

IMAGE_TOKEN = VOCAB - 1
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=INIT, **TOKENS)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def gemma3_vlm():
    text = transformers.Gemma3TextConfig(**TEXT, sliding_window=24, query_pre_attn_scalar=16,
                                         layer_types=["sliding_attention", "full_attention"])
    config = transformers.Gemma3Config(text_config=text, vision_config=transformers.SiglipVisionConfig(**VISION),
                                       mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=3,
                                       eoi_token_index=4, **TOKENS)
    return _seeded(lambda: transformers.Gemma3ForConditionalGeneration(config))


def paligemma():
    text = transformers.GemmaConfig(**TEXT)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=transformers.SiglipVisionConfig(**VISION),
                                          image_token_index=IMAGE_TOKEN, projection_dim=64, **TOKENS)
    return _seeded(lambda: transformers.PaliGemmaForConditionalGeneration(config))


def qwen2_moe_sliding():
    kwargs = {k: v for k, v in LLAMA_LIKE.items() if k != "tie_word_embeddings"}
    config = transformers.Qwen2MoeConfig(**kwargs, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=64, use_sliding_window=True,
                                         sliding_window=12, max_window_layers=2)
    assert "sliding_attention" in config.layer_types
    return _seeded(lambda: transformers.Qwen2MoeForCausalLM(config))


def _forward(model, backend, steps, **inputs):
    """Logits of the prompt forward and of `steps` decode forwards (the argmax token fed back), each [rows, ..., vocab],
    stock (backend None) or paged with the given backend."""
    if backend is None:
        disable_paged_cache(model)
        cache = DynamicCache(config=model.config)
    else:
        enable_paged_cache(model, backend=backend)
        cache = PagedCache.from_model(model, backend=backend)
    try:
        logits = []
        with torch.no_grad():
            out = model(**inputs, **{CACHE_KWARG: cache}, use_cache=True)
            logits.append(out.logits)
            mask = inputs.get("attention_mask")
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                if mask is not None and mask.dim() == 2:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=token, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
                logits.append(out.logits)
        return logits
    finally:
        disable_paged_cache(model)


def _assert_stock_logits(model, steps=2, **inputs):
    stock = _forward(model, None, steps, **inputs)
    paged = _forward(model, "triton", steps, **inputs)
    for step, (s, p) in enumerate(zip(stock, paged)):
        torch.testing.assert_close(p, s, rtol=1e-4, atol=1e-4, msg=lambda m: f"forward {step}: {m}")


def _image_prompt(text_len=9, image_tokens=4):
    """Two left-padded prompts, each with an image (`image_tokens` placeholders) after its first three tokens."""
    ids, mask = left_padded_prompts((text_len + image_tokens + 2, text_len + image_tokens), vocab=VOCAB - 1)
    for row in range(ids.shape[0]):
        first = ids.shape[1] - int(mask[row].sum()) + 3
        ids[row, first : first + image_tokens] = IMAGE_TOKEN
    return ids, mask, (ids == IMAGE_TOKEN).long()


def test_gemma3_image_tokens_attend_both_ways(device):
    model = gemma3_vlm().to(device)
    ids, mask, token_type_ids = _image_prompt()
    pixel_values = torch.randn(2, 3, 32, 32)
    _assert_stock_logits(model, input_ids=ids.to(device), attention_mask=mask.to(device),
                         token_type_ids=token_type_ids.to(device), pixel_values=pixel_values.to(device))


def test_gemma3_image_greedy_generate(device):
    model = gemma3_vlm().to(device)
    ids, mask, token_type_ids = _image_prompt()
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=token_type_ids.to(device),
                  pixel_values=torch.randn(2, 3, 32, 32).to(device), max_new_tokens=5, do_sample=False, pad_token_id=0)
    disable_paged_cache(model)
    stock = model.generate(**kwargs)
    enable_paged_cache(model, backend="triton")
    try:
        paged = model.generate(**kwargs)
    finally:
        disable_paged_cache(model)
    assert torch.equal(sequences(stock), sequences(paged))


def test_prefix_lm_mask(device):
    # PaliGemma's prompt (token type 0) attends both ways, the rest causally.
    model = paligemma().to(device)
    ids, mask = left_padded_prompts((21, 14), vocab=VOCAB - 1)
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, -4:] = 1
    _assert_stock_logits(model, input_ids=ids.to(device), attention_mask=mask.to(device),
                         token_type_ids=token_type_ids.to(device))


def test_user_4d_mask(device):
    # Causal, but every query also skips keys 3..6: no left padding describes that.
    model = tiny_model("llama").to(device)
    ids, _ = left_padded_prompts((20, 20))
    seq = ids.shape[1]
    mask = torch.ones(seq, seq).tril().bool()
    mask[7:, 3:7] = False
    _assert_stock_logits(model, steps=0, input_ids=ids.to(device), attention_mask=mask[None, None].expand(2, 1, -1, -1)
                         .to(device))


def test_qwen2_moe_window_only_in_the_mask(device):
    model = qwen2_moe_sliding().to(device)
    ids, mask = left_padded_prompts((30, 19), vocab=VOCAB)
    _assert_stock_logits(model, steps=3, input_ids=ids.to(device), attention_mask=mask.to(device))


def test_masks_the_kernels_apply_still_reach_them(device, monkeypatch):
    # The routing must not send everything to the exact path: Qwen2-MoE's sliding and full masks run the kernels.
    model = qwen2_moe_sliding().to(device)
    ids, mask = left_padded_prompts((30, 19), vocab=VOCAB)
    calls = []
    original = kernels.launch_paged_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("sliding_window"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "launch_paged_attention", counting)
    _forward(model, "triton", 1, input_ids=ids.to(device), attention_mask=mask.to(device))
    assert sorted(calls, key=str) == sorted([12, None] * 2, key=str), calls


@pytest.mark.parametrize("build", [gemma3_vlm, paligemma], ids=["gemma3", "paligemma"])
def test_vlm_text_only_uses_the_kernels(build, device, monkeypatch):
    # No image / no token types: plain causal masks, which the kernels serve.
    model = build().to(device)
    ids, mask = left_padded_prompts((21, 14), vocab=VOCAB - 1)
    calls = []
    original = kernels.launch_paged_attention
    monkeypatch.setattr(kernels, "launch_paged_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    _assert_stock_logits(model, steps=1, input_ids=ids.to(device), attention_mask=mask.to(device))
    assert calls
