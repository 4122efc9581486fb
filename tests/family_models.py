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
class Family:
    name: str  # as the README's support matrix spells it
    model_class: str  # attribute of `transformers`
    config_class: str
    config_kwargs: dict
    # None for supported families (the parity tests run); for refused ones a key of `REFUSAL_REASONS`, which the
    # README's matrix repeats in the family's row.
    refused_because: str | None = None

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
        if self.supported:
            head = model.get_output_embeddings()
            assert head.weight is not model.get_input_embeddings().weight, f"{self.name}: output embedding still tied"
            with torch.no_grad():
                head.weight.mul_(logit_scale)
        return model


def _family(name, model_class, config_class, refused_because=None, **config_kwargs) -> Family:
    return Family(name, model_class, config_class, config_kwargs, refused_because)


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


def left_padded_prompts(lengths=(37, 21), seed: int = 0, vocab: int = VOCAB):
    """Prompts spanning more than one 16-token block (see tiny_models.left_padded_prompts)."""
    return tiny_models.left_padded_prompts(lengths, seed=seed, vocab=vocab)
