"""Tiny random decoder models built from configs (no downloads), with peaked next-token distributions."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    # A window shorter than the test sequences, so the sliding mask matters.
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=24)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
}


def tiny_model(family: str = "llama", seed: int = 0, logit_scale: float = 12.0) -> torch.nn.Module:
    """A model whose logits are scaled up so that beams and samples are decided by clear margins, not float noise."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def left_padded_prompts(lengths=(13, 7), seed: int = 0, vocab: int = VOCAB):
    """input_ids [len(lengths), max(lengths)] left-padded with 0, and the matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask
