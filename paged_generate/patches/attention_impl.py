"""The attention implementation a model runs: read from `config._attn_implementation` (a private attribute) and
switched with `set_attn_implementation`, which transformers may decline for some models.

Only the decoder's attention reads the paged cache: in a vision-language model the plugin switches the text model's
sub-config and leaves the vision tower's attention as the user chose it.
"""

from __future__ import annotations

import types

__all__ = ["ATTENTION_NAME", "ATTENTION_NAME_EAGER", "PAGED_NAMES", "decoder_implementation", "follow_switches",
           "implementation_of", "paged_name_for", "runs_paged_attention", "stop_following_switches",
           "switch_attention"]

# No "sdpa" / "flash" in the names: transformers treats names containing those specially.
ATTENTION_NAME = "paged_generate"  # stands in for SDPA (and anything but eager)
ATTENTION_NAME_EAGER = "paged_generate_eager"  # stands in for the family's eager attention
PAGED_NAMES = (ATTENTION_NAME, ATTENTION_NAME_EAGER)
_SWITCH = "set_attn_implementation"


def implementation_of(config):
    """The attention implementation `config` selects ("sdpa", "eager", a registered name, ...)."""
    return config._attn_implementation


def decoder_implementation(model):
    """The attention implementation the model's decoder layers run (its text config's, in a multimodal model)."""
    return implementation_of(model.config.get_text_config(decoder=True))


def runs_paged_attention(config) -> bool:
    return implementation_of(config) in PAGED_NAMES


def paged_name_for(implementation, softcap: bool = False) -> str:
    """The registered name that stands in for `implementation` while the plugin is on: the family's eager function
    for "eager", the SDPA stand-in for "sdpa" and for the others (flash_attention_*, flex_attention, hub kernels),
    except in a model with an attention softcap (`softcap`), which those apply and SDPA cannot: eager's there."""
    if implementation in PAGED_NAMES:
        return implementation
    if implementation == "eager" or (softcap and implementation != "sdpa"):
        return ATTENTION_NAME_EAGER
    return ATTENTION_NAME


def switch_attention(model, name: str) -> bool:
    """Set the decoder's attention to `name`; False (model unchanged) where transformers would not switch it."""
    original = decoder_implementation(model)
    model.set_attn_implementation(_decoder_request(model, name))
    if decoder_implementation(model) == name:
        return True
    model.set_attn_implementation(_decoder_request(model, original))
    return False


def _decoder_request(model, name: str):
    """`set_attn_implementation`'s argument setting the decoder's attention only: the name itself for a text model,
    {sub-config key: name} for a multimodal one (the whole model where the decoder's config is nested deeper)."""
    config = model.config
    text_config = config.get_text_config(decoder=True)
    if text_config is config:
        return name
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is text_config:
            return {key: name}
    return name


def follow_switches(model, on_switch) -> None:
    """While the plugin is on, `model.set_attn_implementation(...)` applies the user's choice as transformers would
    (checking it, raising what it raises), then `on_switch(model, implementation)` gets what the decoder now runs,
    so the plugin can record it and switch the decoder to its paged stand-in."""
    cls_switch = getattr(type(model), _SWITCH)
    inside = []  # `on_switch` switches the model itself: those calls are applied as they are

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        result = cls_switch(self, attn_implementation, *args, **kwargs)
        chosen = decoder_implementation(self)
        if chosen not in PAGED_NAMES and not inside:  # the decoder's attention changed (not only the vision tower's)
            inside.append(True)
            try:
                on_switch(self, chosen)
            finally:
                inside.clear()
        return result

    set_attn_implementation.__doc__ = cls_switch.__doc__
    setattr(model, _SWITCH, types.MethodType(set_attn_implementation, model))


def stop_following_switches(model) -> None:
    model.__dict__.pop(_SWITCH, None)
