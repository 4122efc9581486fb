"""Where `torch.compile` stops: an enabled model's attention modules, given a paged cache, run outside the compiled
graph.

Each attention module stores K/V through the paged cache, whose per-step block bookkeeping (numpy tables, a plan per
forward) dynamo cannot trace. Left in the graph, every layer breaks it at the cache update and the attention call, and
the pieces recompile per layer (dynamo guards on each module's `layer_idx`) until the recompile limit. Run eagerly as a
whole, the attention modules break the graph at the same place in every layer: the compiled pieces (embeddings, norms,
MLPs, the LM head) are traced once for the prompt forward and once for decode steps, whatever the number of layers or
steps.

Attention modules are found by transformers' conventions: a module with an integer `layer_idx` and an `is_causal`
attribute (decoder layers, which may carry `layer_idx` too, have no `is_causal`).
"""

from __future__ import annotations

import types

import torch

from ..cache import PagedCache

__all__ = ["attention_modules", "compile_attention_eagerly", "restore_attention_forwards"]

_SAVED = "_paged_generate_forward"  # the instance `forward` a module had before (None: the class's)


def attention_modules(model) -> list[torch.nn.Module]:
    """The modules of `model` that compute attention for a decoder layer (one per layer)."""
    return [module for module in model.modules()
            if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "is_causal")]


def compile_attention_eagerly(model) -> None:
    """Under `torch.compile`, run each attention module's forward eagerly (a graph break around it); outside it, call
    the forward as before (one extra Python call, no dynamo machinery)."""
    for module in attention_modules(model):
        if _SAVED in module.__dict__:
            continue
        module.__dict__[_SAVED] = module.__dict__.get("forward")
        module.forward = types.MethodType(_forward_outside_compiled_graph, module)


def restore_attention_forwards(model) -> None:
    for module in model.modules():
        if _SAVED in module.__dict__:
            previous = module.__dict__.pop(_SAVED)
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def _forward_outside_compiled_graph(self, *args, **kwargs):
    if torch.compiler.is_compiling() and _given_a_paged_cache(args, kwargs):
        return _eagerly(self, *args, **kwargs)
    return _own_forward(self)(*args, **kwargs)


def _given_a_paged_cache(args, kwargs) -> bool:
    # Other caches (a static one, none) compile as stock's do.
    return any(isinstance(value, PagedCache) for value in (*args, *kwargs.values()))


@torch.compiler.disable
def _eagerly(module, *args, **kwargs):
    return _own_forward(module)(*args, **kwargs)


def _own_forward(module):
    """The forward the module had before (an instance one, e.g. accelerate's offloading hook, or its class's)."""
    previous = module.__dict__.get(_SAVED)
    return previous if previous is not None else type(module).forward.__get__(module)
