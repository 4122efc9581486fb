"""The transformers model inside the objects users hold: a PEFT model, a `torch.compile` `OptimizedModule` (its private
`_orig_mod`), or a data-parallel container (accelerate's `prepare` on several processes)."""

from __future__ import annotations

import sys

import torch

__all__ = ["peft_adapter_types", "transformers_model_of"]

_PARALLEL_CONTAINERS = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def transformers_model_of(model):
    """The innermost model of `model`'s wrappers (`model` itself when it wraps nothing); wrappers may nest in any
    order (a compiled PEFT model, a PEFT model of a compiled model, ...)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = _wrapped_by(model)
        if inner is None:
            return model
        model = inner
    return model


def _wrapped_by(model):
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported yet: nothing was compiled
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):  # torch.compile(model)
        return model._orig_mod
    if isinstance(model, _PARALLEL_CONTAINERS):
        return model.module
    if _is_peft_model(model):
        return model.get_base_model()
    return None


def _is_peft_model(model) -> bool:
    return callable(getattr(type(model), "get_base_model", None)) and isinstance(getattr(model, "peft_config", None),
                                                                               dict)


def peft_adapter_types(model) -> dict[str, str]:
    """{adapter name: PEFT type ("LORA", "PREFIX_TUNING", ...)} of every PEFT wrapper around the transformers model."""
    adapters = {}
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if _is_peft_model(model):
            for name, config in model.peft_config.items():
                adapters[name] = str(getattr(config.peft_type, "value", config.peft_type))
        inner = _wrapped_by(model)
        if inner is None:
            break
        model = inner
    return adapters
