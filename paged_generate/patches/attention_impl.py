"""The attention implementation a model runs: read from `config._attn_implementation` (a private attribute) and
switched with `set_attn_implementation`, which transformers may decline for some models."""

from __future__ import annotations

__all__ = ["ATTENTION_NAME", "ATTENTION_NAME_EAGER", "PAGED_NAMES", "implementation_of", "paged_name_for",
           "runs_paged_attention", "switch_attention"]

# No "sdpa" / "flash" in the names: transformers treats names containing those specially.
ATTENTION_NAME = "paged_generate"  # stands in for SDPA (and anything but eager)
ATTENTION_NAME_EAGER = "paged_generate_eager"  # stands in for the family's eager attention
PAGED_NAMES = (ATTENTION_NAME, ATTENTION_NAME_EAGER)


def implementation_of(config):
    """The attention implementation `config` selects ("sdpa", "eager", a registered name, ...)."""
    return config._attn_implementation


def runs_paged_attention(config) -> bool:
    return implementation_of(config) in PAGED_NAMES


def paged_name_for(implementation) -> str:
    """The registered name that stands in for `implementation` while the plugin is on."""
    return ATTENTION_NAME_EAGER if implementation == "eager" else ATTENTION_NAME


def switch_attention(model, name: str) -> bool:
    """Set the model's attention to `name`; False (model unchanged) where transformers would not switch it."""
    original = implementation_of(model.config)
    model.set_attn_implementation(name)
    if implementation_of(model.config) == name:
        return True
    model.set_attn_implementation(original)
    return False
