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

_SAVED = "_paged_generate_saved_forward"  # the instance `forward` a module had before (None: the class's), to restore
_OWN = "_paged_generate_own_forward"  # the forward to run: that instance one, or the class's bound to the module


def attention_modules(model) -> list[torch.nn.Module]:
    """The modules of `model` that compute attention for a decoder layer (one per layer)."""
    return [module for module in model.modules()
            if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "is_causal")]


def compile_attention_eagerly(model) -> None:
    """Under `torch.compile`, run each attention module's forward eagerly (a graph break around it) when it is given a
    paged cache; otherwise call the forward as before (one extra Python call, no dynamo machinery)."""
    for module in attention_modules(model):
        if _SAVED in module.__dict__:
            continue
        previous = module.__dict__.get("forward")
        module.__dict__[_SAVED] = previous
        # Bound methods, not closures: a deep copy of the model rebinds them to the copied module.
        module.__dict__[_OWN] = previous if previous is not None else types.MethodType(type(module).forward, module)
        module.forward = types.MethodType(_forward_outside_compiled_graph, module)


def restore_attention_forwards(model) -> None:
    for module in model.modules():
        if _SAVED in module.__dict__:
            previous = module.__dict__.pop(_SAVED)
            del module.__dict__[_OWN]
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def _forward_outside_compiled_graph(self, *args, **kwargs):
    if torch.compiler.is_compiling() and _given_a_paged_cache(args, kwargs):
        return _eagerly(self, *args, **kwargs)
    return self.__dict__[_OWN](*args, **kwargs)


def _given_a_paged_cache(args, kwargs) -> bool:
    # Other caches (a static one, none) compile as stock's do.
    return any(isinstance(value, PagedCache) for value in (*args, *kwargs.values()))


@torch.compiler.disable
def _eagerly(module, *args, **kwargs):
    return module.__dict__[_OWN](*args, **kwargs)
