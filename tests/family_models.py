"""The decoder families the plugin is tested against: a tiny config factory per family and the expected status.

`SUPPORTED` families must generate token-identical output with the plugin on and off; `REFUSED` families must be
refused by `enable_paged_cache` with `UnsupportedModelError`. tests/test_support_matrix.py checks that the README's
support matrix lists exactly these families with these statuses.

Every model is fp32, 2 layers, hidden size 64 and vocabulary `VOCAB`, built from a config with a fixed seed (no
downloads). Output embeddings are untied and scaled up so next-token distributions are peaked: beams and samples are
then decided by clear margins, not float noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers

import tiny_models

VOCAB = 96
HIDDEN = 64
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Five times the usual 0.02: attention scores then spread enough that masks, windows and softcaps change the tokens
# (at 0.02 attention is nearly uniform and several families generate the same tokens whatever the prompt).
INIT = 0.1
# The keyword arguments of the Llama-like configs.
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    initializer_range=INIT,
    **TOKENS,
)
# Shorter than the test sequences (prompts of 37 tokens plus up to 30 new ones), so sliding masks matter.
WINDOW = 24


@dataclass(frozen=True)
class Vision:
    """How a vision-language family takes images: each image is `tokens_per_image` IMAGE_TOKEN placeholders between
    VISION_START and VISION_END in the prompt, and `pixels(num_images, generator)` gives what its processor returns
    for that many images besides the text."""

    tokens_per_image: int
    pixels: Callable[[int, torch.Generator], dict]
    token_types: str | None = None  # the per-token type input its processor returns (1 on image tokens)
    # Weights a random init leaves at zero (so that images would not reach the text), given random values.
    init: Callable[[torch.nn.Module], None] | None = None


@dataclass(frozen=True)
class Family:
    name: str  # as the README's support matrix spells it
    model_class: str  # attribute of `transformers`
    config_class: str
    config_kwargs: dict
    # None for supported families (the parity tests run); for refused ones a key of `REFUSAL_REASONS`, which the
    # README's matrix repeats in the family's row.
    refused_because: str | None = None
    vision: Vision | None = None  # vision-language families (tests/test_multimodal.py)

    @property
    def supported(self) -> bool:
        return self.refused_because is None

    def available(self) -> bool:
        return hasattr(transformers, self.model_class) and hasattr(transformers, self.config_class)

    def config(self):
        return getattr(transformers, self.config_class)(**self.config_kwargs)

    def build(self, seed: int = 0, logit_scale: float = 4.0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(self.config()).eval()
        if self.vision is not None and self.vision.init is not None:
            with torch.no_grad():
                self.vision.init(model)
        if self.supported:
            head = model.get_output_embeddings()
            assert head.weight is not model.get_input_embeddings().weight, f"{self.name}: output embedding still tied"
            with torch.no_grad():
                head.weight.mul_(logit_scale)
        return model


def _family(name, model_class, config_class, refused_because=None, **config_kwargs) -> Family:
    return Family(name, model_class, config_class, config_kwargs, refused_because)


def _vision_language(name, model_class, config_class, vision: Vision, **config_kwargs) -> Family:
    return Family(name, model_class, config_class, config_kwargs, vision=vision)


# Vision-language families: the text model takes the usual prompts (ids below VOCAB) and four more ids.
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3
VISION_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                     vision_end_token_id=VISION_END)
VLM_TEXT = {**LLAMA_LIKE, "vocab_size": VOCAB + 4}
VISION_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _images(shape):
    return lambda num_images, generator: dict(pixel_values=torch.randn(num_images, *shape, generator=generator))


def _qwen_images(num_images, generator):
    # Each image a 1 x 4 x 4 grid of 2 x 2 patches over 2 frames, 3 channels; merged 2 x 2: 4 tokens.
    return dict(pixel_values=torch.randn(num_images * 16, 3 * 2 * 2 * 2, generator=generator),
                image_grid_thw=torch.tensor([[1, 4, 4]] * num_images))


QWEN_VISION = Vision(tokens_per_image=4, pixels=_qwen_images, token_types="mm_token_type_ids")
QWEN_TEXT = {**VLM_TEXT, "rope_parameters": dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0)}
QWEN_TOWER = dict(depth=1, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


def _gemma3_projection(model):
    # Gemma 3 initialises its image projection to zeros: images would change nothing.
    model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 1.0)


ATTENTION_OUTSIDE_REGISTRY = "attention outside the registry"
ENCODER_DECODER = "encoder-decoder"
RECURRENT = "recurrent"
# Reason in the README's matrix -> what `UnsupportedModelError`'s message must say.
REFUSAL_REASONS = {
    ATTENTION_OUTSIDE_REGISTRY: "does not go through transformers' attention registry",
    ENCODER_DECODER: "encoder-decoder model",
    RECURRENT: "recurrent",
}

FAMILIES: list[Family] = [
    _family("Llama", "LlamaForCausalLM", "LlamaConfig", **LLAMA_LIKE),
    _family("Mistral", "MistralForCausalLM", "MistralConfig", **LLAMA_LIKE, sliding_window=WINDOW),
    _family(
        "Mixtral", "MixtralForCausalLM", "MixtralConfig", **LLAMA_LIKE,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
    ),
    _family("Qwen2", "Qwen2ForCausalLM", "Qwen2Config", **LLAMA_LIKE),
    _family("Qwen3", "Qwen3ForCausalLM", "Qwen3Config", **LLAMA_LIKE, head_dim=16),
    _family(
        "Qwen3-MoE", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", **LLAMA_LIKE,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
    ),
    _family(
        "Gemma 2", "Gemma2ForCausalLM", "Gemma2Config", **LLAMA_LIKE,
        # A softcap low enough to change the tokens (tests/test_families.py checks that it does).
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention"],
    ),
    _family(
        "Gemma 3", "Gemma3ForCausalLM", "Gemma3TextConfig", **LLAMA_LIKE,
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    _family("Phi-3", "Phi3ForCausalLM", "Phi3Config", **LLAMA_LIKE),
    _family(
        "GPT-2", "GPT2LMHeadModel", "GPT2Config",
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512, tie_word_embeddings=False,
        initializer_range=INIT, **TOKENS,
    ),
    _family(
        "GPT-NeoX", "GPTNeoXForCausalLM", "GPTNeoXConfig",
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False, initializer_range=INIT, **TOKENS,
    ),
    _family(
        "OPT", "OPTForCausalLM", "OPTConfig",
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=512, tie_word_embeddings=False, init_std=INIT, **TOKENS,
    ),
    _family(
        "Granite", "GraniteForCausalLM", "GraniteConfig", **LLAMA_LIKE, attention_multiplier=0.2, logits_scaling=2.0
    ),
    _family("OLMo 2", "Olmo2ForCausalLM", "Olmo2Config", **LLAMA_LIKE),
    _family("Cohere", "CohereForCausalLM", "CohereConfig", **LLAMA_LIKE, use_qk_norm=False, logit_scale=1.0),
    _family("StableLM", "StableLmForCausalLM", "StableLmConfig", **LLAMA_LIKE),
    _family("SmolLM3", "SmolLM3ForCausalLM", "SmolLM3Config", **LLAMA_LIKE, no_rope_layer_interval=2),
    # Vision-language: text-only prompts here (tests/test_families.py), prompts with images in tests/test_multimodal.py.
    _vision_language(
        "Llava", "LlavaForConditionalGeneration", "LlavaConfig",
        # 8 x 8 images of 4 x 4 patches: 4 image tokens (the CLS token dropped).
        Vision(tokens_per_image=4, pixels=_images((3, 8, 8))),
        vision_config=dict(model_type="clip_vision_model", **VISION_TOWER, image_size=8, patch_size=4,
                           projection_dim=32),
        text_config=dict(model_type="llama", **VLM_TEXT), image_token_index=IMAGE_TOKEN, image_seq_length=4,
        vision_feature_layer=-1, tie_word_embeddings=False,
    ),
    _vision_language(
        "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", QWEN_VISION,
        text_config=QWEN_TEXT, vision_config=dict(**QWEN_TOWER, embed_dim=32, hidden_size=HIDDEN),
        tie_word_embeddings=False, **VISION_TOKENS,
    ),
    _vision_language(
        "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", QWEN_VISION,
        text_config=QWEN_TEXT,
        vision_config=dict(**QWEN_TOWER, hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN, window_size=8,
                           fullatt_block_indexes=[0]),
        tie_word_embeddings=False, **VISION_TOKENS,
    ),
    _vision_language(
        "Gemma 3 vision", "Gemma3ForConditionalGeneration", "Gemma3Config",
        # 16 x 16 images of 4 x 4 patches: 16 image tokens, which see each other both ways (enough of them for that
        # to change the tokens).
        Vision(tokens_per_image=16, pixels=_images((3, 16, 16)), token_types="token_type_ids",
               init=_gemma3_projection),
        text_config=dict(**VLM_TEXT, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(**VISION_TOWER, image_size=16, patch_size=4), mm_tokens_per_image=16,
        image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START, eoi_token_index=VISION_END,
        tie_word_embeddings=False,
    ),
    # Refused: attention computed by the model itself (ALiBi etc.), not through the attention registry.
    _family(
        "Falcon", "FalconForCausalLM", "FalconConfig", ATTENTION_OUTSIDE_REGISTRY,
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, **TOKENS,
    ),
    _family(
        "Bloom", "BloomForCausalLM", "BloomConfig", ATTENTION_OUTSIDE_REGISTRY,
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4, **TOKENS,
    ),
    _family(
        "MPT", "MptForCausalLM", "MptConfig", ATTENTION_OUTSIDE_REGISTRY,
        vocab_size=VOCAB, d_model=HIDDEN, n_heads=4, n_layers=2, max_seq_len=512, **TOKENS,
    ),
    # Refused: encoder-decoder.
    _family(
        "T5", "T5ForConditionalGeneration", "T5Config", ENCODER_DECODER,
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
        **TOKENS,
    ),
    _family(
        "BART", "BartForConditionalGeneration", "BartConfig", ENCODER_DECODER,
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
        decoder_start_token_id=2, **TOKENS,
    ),
    _family(
        "Whisper", "WhisperForConditionalGeneration", "WhisperConfig", ENCODER_DECODER,
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=32, max_target_positions=64, decoder_start_token_id=1, **TOKENS,
    ),
    # Refused: recurrent state (all layers or some of them).
    _family(
        "Mamba", "MambaForCausalLM", "MambaConfig", RECURRENT,
        vocab_size=VOCAB, hidden_size=HIDDEN, state_size=8, num_hidden_layers=2, **TOKENS,
    ),
    _family(
        "Jamba", "JambaForCausalLM", "JambaConfig", RECURRENT,
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, use_mamba_kernels=False, **TOKENS,
    ),
    _family(
        "Qwen3-Next", "Qwen3NextForCausalLM", "Qwen3NextConfig", RECURRENT,
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, layer_types=["linear_attention", "full_attention"], **TOKENS,
    ),
]

BY_NAME: dict[str, Family] = {family.name: family for family in FAMILIES}
SUPPORTED = [family for family in FAMILIES if family.supported]
REFUSED = [family for family in FAMILIES if not family.supported]


VISION_LANGUAGE = [family for family in FAMILIES if family.vision is not None]


def left_padded_prompts(lengths=(37, 21), seed: int = 0, vocab: int = VOCAB):
    """Prompts spanning more than one 16-token block (see tiny_models.left_padded_prompts)."""
    return tiny_models.left_padded_prompts(lengths, seed=seed, vocab=vocab)


def prompts_with_images(family: Family, images_per_prompt=(2, 1), text=(9, 5), seed: int = 0) -> dict:
    """generate() inputs of a left-padded batch: prompt i is `text[i]` random tokens, its images, 6 more tokens;
    with the pixels and token types the family's processor would give."""
    vision = family.vision
    generator = torch.Generator().manual_seed(seed)
    image = [VISION_START] + [IMAGE_TOKEN] * vision.tokens_per_image + [VISION_END]
    rows = [
        torch.cat([torch.randint(3, VOCAB, (length,), generator=generator),
                   torch.tensor(image * num_images, dtype=torch.long),
                   torch.randint(3, VOCAB, (6,), generator=generator)])
        for length, num_images in zip(text, images_per_prompt, strict=True)
    ]
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):] = row
        attention_mask[index, width - len(row):] = 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  **vision.pixels(sum(images_per_prompt), generator))
    if vision.token_types is not None:
        inputs[vision.token_types] = (input_ids == IMAGE_TOKEN).long()
    return inputs
