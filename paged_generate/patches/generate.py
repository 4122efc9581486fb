"""Per-model overrides of three `GenerationMixin` methods, installed as instance attributes by `enable_paged_cache`.

- `generate`: opens a call record so the cache the call creates is released (blocks freed, figures kept) even when
  generation raises.
- `_prepare_cache_for_generation`: builds a `PagedCache` where generate() would build its default `DynamicCache`.
- `_prefill`: runs the prompt forward on the distinct prompts only, then forks their blocks to every beam / sample
  and repeats the outputs, so the rest of generate() sees the rows it expects.

Deleting the instance attributes (`uninstall`) restores the class methods exactly.
"""

from __future__ import annotations

import types
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.configuration_utils import GenerationMode
from transformers.utils import ModelOutput

from ..attention.stock import weights_wanted
from ..backend import uses_triton
from ..cache import PagedCache
from ..stats import CacheStats
from .compat import CACHE_KWARG

__all__ = ["PATCHED_METHODS", "PluginState", "install", "uninstall"]

PATCHED_METHODS = ("generate", "_prepare_cache_for_generation", "_prefill")

# Decoding methods transformers ships and the tests check token for token. The others (contrastive search, DoLa,
# group and constrained beam search) now load their loops from the Hub, and `custom_generate` brings a loop of its
# own: those calls get stock's cache, so they run exactly as without the plugin.
PAGED_MODES = frozenset({
    GenerationMode.GREEDY_SEARCH,
    GenerationMode.SAMPLE,
    GenerationMode.BEAM_SEARCH,
    GenerationMode.BEAM_SAMPLE,
    GenerationMode.ASSISTED_GENERATION,
})


@dataclass
class CallRecord:
    """The caches one generate() call created (assisted decoding may create more than one)."""

    caches: list = field(default_factory=list)
    paged: bool = True  # False: a call whose decoding loop the plugin does not vouch for (stock cache)
    kept: list = field(default_factory=list)  # caches the caller goes on using: figures taken, blocks kept
    weights_token: Any = None  # set while the call asks for attention weights (see fallback_attention.py)


@dataclass
class PluginState:
    """Settings and last figures of one enabled model. Per-call state lives in a ContextVar, so threads don't mix."""

    block_size: int
    max_blocks: int | None
    original_attn_implementation: Any
    backend: str = "auto"
    kv_cache_dtype: str = "auto"
    last_stats: CacheStats | None = None
    current_call: ContextVar = field(default_factory=lambda: ContextVar("paged_generate_call", default=None))
    # Lists that every cache this model's calls create is appended to (see capture.py).
    watchers: list = field(default_factory=list)

    def new_cache(self, model) -> PagedCache:
        cache = PagedCache.from_model(model, block_size=self.block_size, max_blocks=self.max_blocks,
                                      backend=self.backend, kv_cache_dtype=self.kv_cache_dtype)
        for watcher in self.watchers:
            watcher.append(cache)
        return cache


def install(model, state: PluginState) -> None:
    cls = type(model)
    model.generate = types.MethodType(_generate(cls.generate, state), model)
    model._prepare_cache_for_generation = types.MethodType(
        _prepare_cache(cls._prepare_cache_for_generation, state), model
    )
    model._prefill = types.MethodType(_prefill_once(cls._prefill), model)


def uninstall(model) -> None:
    for name in PATCHED_METHODS:
        model.__dict__.pop(name, None)


def _generate(original, state: PluginState):
    def generate(self, *args, **kwargs):
        record = CallRecord(paged=kwargs.get("custom_generate") is None)
        token = state.current_call.set(record)
        try:
            return original(self, *args, **kwargs)
        finally:
            state.current_call.reset(token)
            if record.weights_token is not None:
                weights_wanted.reset(record.weights_token)
            for cache in record.caches:
                state.last_stats = cache.stats() if any(cache is kept for kept in record.kept) else cache.release()

    generate.__doc__ = original.__doc__
    return generate


def _prepare_cache(original, state: PluginState):
    def prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        record = state.current_call.get()
        generation_mode = args[0] if args else kwargs.get("generation_mode")
        wants_default_cache = (
            record is not None
            and record.paged
            and generation_mode in PAGED_MODES
            and model_kwargs.get(CACHE_KWARG) is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        )
        if not wants_default_cache:
            return original(self, generation_config, model_kwargs, *args, **kwargs)
        cache = state.new_cache(self)
        shares_nothing = (generation_config.num_beams or 1) == 1 and (generation_config.num_return_sequences or 1) == 1
        if shares_nothing and not uses_triton(state.backend, self.device, state.block_size):
            # The PyTorch path reads rows in place when each keeps a run of blocks: the cache places the rows
            # max_length apart (the kernels read through the tables, so GPU memory is not set aside for that).
            cache.expected_seq_len = generation_config.max_length
        record.caches.append(cache)
        model_kwargs[CACHE_KWARG] = cache
        if generation_config.output_attentions and record.weights_token is None:
            record.weights_token = weights_wanted.set(True)
        if generation_config.is_assistant:
            cache.activate_past_recording()
            # Assisted decoding threads the assistant's cache from one round to the next (it crops the rejected
            # tokens): released, the next round would re-read the whole prompt.
            record.kept.append(cache)

    return prepare_cache_for_generation


def _prefill_once(original):
    def prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True, *args, **kwargs):
        cache = model_kwargs.get(CACHE_KWARG)
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        num_rows = input_ids.shape[0]
        if (
            not isinstance(cache, PagedCache)
            or expand == 1
            or cache.get_seq_length() > 0
            or num_rows % expand
            or self.config.is_encoder_decoder
        ):
            if isinstance(cache, PagedCache) and cache.prefill_rows is None:
                cache.prefill_rows = num_rows
            return original(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        # generate() repeated every prompt `expand` times ([p0, p0, p0, p1, p1, p1]): keep one copy of each.
        distinct_kwargs = {key: _first_of_each_group(value, num_rows, expand) for key, value in model_kwargs.items()}
        distinct_ids = input_ids[::expand]
        cache.prefill_rows = distinct_ids.shape[0]
        outputs = original(self, distinct_ids, generation_config, distinct_kwargs, is_first_iteration, *args, **kwargs)
        cache.batch_repeat_interleave(expand)
        return _repeat_rows(outputs, num_rows // expand, expand)

    return prefill


def _first_of_each_group(value, num_rows: int, expand: int):
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        if value.shape[0] == num_rows:
            return value[::expand]
        if value.ndim == 3 and value.shape[1] == num_rows:  # multimodal position_ids: [3, batch, seq]
            return value[:, ::expand]
    return value


def _repeat_rows(outputs: ModelOutput, num_distinct: int, expand: int) -> ModelOutput:
    def repeat(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == num_distinct:
            return value.repeat_interleave(expand, dim=0)
        if isinstance(value, tuple):
            return tuple(repeat(item) for item in value)
        return value

    for key in list(outputs.keys()):
        if key not in ("cache", "past_key_values"):
            outputs[key] = repeat(outputs[key])
    return outputs
