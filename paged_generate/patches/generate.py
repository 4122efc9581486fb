"""Per-model overrides of four `GenerationMixin` methods, installed as instance attributes by `enable_paged_cache`.

- `generate`: opens a call record; at the end of the call the caches it created are released (blocks freed, figures
  kept) even when generation raises, except a cache the call returns (`return_dict_in_generate=True`), which keeps
  its K/V for the next call, as stock's does, until the caller drops it.
- `_prepare_cache_for_generation`: builds a `PagedCache` where generate() would build its default `DynamicCache`.
- `_expand_inputs_for_generation`: notes the inputs as they were before generate() repeated them per beam / sample.
- `_prefill`: runs the prompt forward once per distinct prompt (see prefill_once.py), or hands the call to stock's
  own cache where paging would not pay (see call_rule.py).

Deleting the instance attributes (`uninstall`) restores the class methods exactly.
"""

from __future__ import annotations

import inspect
import types
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from transformers.generation.configuration_utils import GenerationMode
from transformers.utils import ModelOutput

from ..attention.stock import weights_wanted
from ..backend import uses_triton
from ..blocks.sizes import AUTO, AUTO_LONG_BLOCK_SIZE, auto_block_size
from ..budget import CacheBudget
from ..cache import PagedCache, forget_handed_over
from ..call_rule import REFERENCE_HIDDEN_SIZE, paging_pays
from ..kernels import MIN_BLOCK_SIZE
from ..stats import CacheStats, stock_cache_stats
from .compat import CACHE_KWARG
from .prefill_once import PromptInputs, capture_prompt_inputs, prefill_once

__all__ = ["PATCHED_METHODS", "PluginState", "install", "uninstall"]

PATCHED_METHODS = ("generate", "_prepare_cache_for_generation", "_expand_inputs_for_generation", "_prefill")

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
# Those whose prompt forward may start from a pool's cached blocks and leave its prompt blocks cached: not the target's
# cache in assisted decoding, whose verification forwards are cropped back (the assistant's own calls are greedy or
# sampling: their first prompt forward may use the pool's blocks, and later rounds continue that cache).
PREFIX_CACHING_MODES = PAGED_MODES - {GenerationMode.ASSISTED_GENERATION}


@dataclass
class CallRecord:
    """One generate() call: the paged caches it created (assisted decoding may create more than one) and those it was
    given (a cache an earlier call returned, or one the caller built)."""

    caches: list = field(default_factory=list)
    given: list = field(default_factory=list)
    paged: bool = True  # False: a call whose decoding loop the plugin does not vouch for (stock cache)
    prompt_inputs: PromptInputs | None = None  # the inputs before generate() repeated them per beam / sample
    weights_token: Any = None  # set while the call asks for attention weights (see attention/stock.py)
    stock_cache: Any = None  # stock's own cache for this call, built beside the paged one while paging may not pay
    on_stock_cache: bool = False  # the call handed over to `stock_cache` (see `_stock_cache_unless_paging_pays`)
    block_size: int = 16  # the call's block size (`block_size="auto"` resolved)


@dataclass
class PluginState:
    """Settings and last figures of one enabled model. Per-call state lives in a ContextVar, so threads don't mix.

    attn_implementation: what the user chose for the model (at load time, or with `set_attn_implementation` since),
    which `disable_paged_cache` restores; the model runs its paged stand-in while enabled.
    """

    block_size: int | str  # or "auto": resolved per call (`block_size_for`)
    max_blocks: int | None
    attn_implementation: Any
    backend: str = "auto"
    kv_cache_dtype: str = "auto"
    budget: CacheBudget | None = None  # max_cache_bytes, a byte cap on each call's blocks
    min_shared_tokens: int | None = None  # see call_rule.py; None: the measured rule
    # A KVPool the model's calls take their blocks from (None: each call sizes and frees its own), whether they keep
    # and reuse prompts' blocks in it, and `block_bytes(model)`, the bytes of one block as the pool counts them.
    pool: Any = None
    prefix_caching: bool = False
    block_bytes: Any = None
    forward_gate: tuple = ()  # the pool's forward hooks on the model (see pool.install_forward_gate)
    last_stats: CacheStats | None = None
    current_call: ContextVar = field(default_factory=lambda: ContextVar("paged_generate_call", default=None))
    # Lists that every cache this model's calls create is appended to (see capture.py).
    watchers: list = field(default_factory=list)

    def block_size_for(self, device, max_length: int, shares_rows: bool) -> int:
        """The block size of a call on `device` whose rows hold at most `max_length` tokens and share blocks (beams or
        samples) or not: the one given to `enable_paged_cache`, or what "auto" picks (`blocks/sizes.py`). A pool's
        calls keep one size, so that one call's cached prompt blocks line up with the next call's."""
        if self.block_size != AUTO:
            return self.block_size
        if self.pool is not None:
            return AUTO_LONG_BLOCK_SIZE
        kernels = uses_triton(self.backend, device, MIN_BLOCK_SIZE)
        return auto_block_size(max_length, shares_rows=shares_rows, min_block_size=MIN_BLOCK_SIZE if kernels else 1)

    def new_cache(self, model, block_size: int, prefix_caching: bool = True) -> PagedCache:
        """A cache for a call in blocks of `block_size` tokens: from the pool if the model has one, else its own,
        capped at `max_cache_bytes` if given."""
        if self.pool is not None:
            cache = self.pool.new_cache(model, block_size=block_size, kv_cache_dtype=self.kv_cache_dtype,
                                        backend=self.backend, block_bytes=self.block_bytes,
                                        prefix_caching=self.prefix_caching and prefix_caching)
        else:
            cache = PagedCache.from_model(model, block_size=block_size, max_blocks=self.max_blocks,
                                          backend=self.backend, kv_cache_dtype=self.kv_cache_dtype)
            if self.budget is not None:
                cache.allocator.byte_cap = self.budget.cap(block_size)
        for watcher in self.watchers:
            watcher.append(cache)
        return cache

    @property
    def always_paged(self) -> bool:
        """Whether every call needs the paged cache: what the user asked for (a memory cap, compressed blocks, a pool
        keeping blocks across calls) only it does."""
        return (self.min_shared_tokens == 0 or self.max_blocks is not None or self.budget is not None
                or self.kv_cache_dtype != "auto" or self.pool is not None)


def install(model, state: PluginState) -> None:
    cls = type(model)
    model.generate = types.MethodType(_generate(cls.generate, state), model)
    model._prepare_cache_for_generation = types.MethodType(
        _prepare_cache(cls._prepare_cache_for_generation, state), model
    )
    model._expand_inputs_for_generation = types.MethodType(
        _expand_inputs(_bound_class_method(model, "_expand_inputs_for_generation"), state), model
    )
    model._prefill = types.MethodType(
        prefill_once(cls._prefill, lambda: _prompt_inputs_of(state),
                     lambda model, shared, new: _stock_cache_unless_paging_pays(state, model, shared, new)),
        model)


def _bound_class_method(model, name: str):
    """The class's `name` for `model`, whether a method or a static method (`_expand_inputs_for_generation` is static
    in `GenerationMixin` up to transformers 5.23, a method in families overriding it and from 5.24 on)."""
    return inspect.getattr_static(type(model), name).__get__(model, type(model))


def uninstall(model) -> None:
    for name in PATCHED_METHODS:
        model.__dict__.pop(name, None)


def _generate(original, state: PluginState):
    def generate(self, *args, **kwargs):
        record = CallRecord(paged=kwargs.get("custom_generate") is None)
        token = state.current_call.set(record)
        result = None
        try:
            result = original(self, *args, **kwargs)
            return result
        finally:
            state.current_call.reset(token)
            forget_handed_over()  # a cache the caller keeps must be freed when they drop it, not held here
            if record.weights_token is not None:
                weights_wanted.reset(record.weights_token)
            returned = _caches_in(result)
            if record.on_stock_cache:
                state.last_stats = stock_cache_stats(record.stock_cache, record.block_size)
            for cache in record.caches:
                state.last_stats = cache.stats() if any(cache is kept for kept in returned) else cache.release()
            for cache in record.given:
                state.last_stats = cache.stats()

    generate.__doc__ = original.__doc__
    return generate


def _caches_in(result) -> list:
    """The caches a generate() result hands back (`return_dict_in_generate=True`): the next call may continue them."""
    if not isinstance(result, ModelOutput):
        return []
    return [value for value in result.values() if isinstance(value, PagedCache)]


def _prompt_inputs_of(state: PluginState) -> PromptInputs | None:
    record = state.current_call.get()
    return record.prompt_inputs if record is not None and record.paged else None


def _stock_cache_unless_paging_pays(state: PluginState, model, shared_tokens: int, new_tokens: int):
    """Stock's cache for the call in progress if paging it would not pay (call_rule.py), its paged cache then freed
    unused; else None."""
    record = state.current_call.get()
    if record is None or record.stock_cache is None:
        return None
    hidden_size = getattr(model.config.get_text_config(decoder=True), "hidden_size", None) or REFERENCE_HIDDEN_SIZE
    if paging_pays(shared_tokens, new_tokens, hidden_size, state.min_shared_tokens):
        return None
    for cache in record.caches:
        cache.release()
        for watcher in state.watchers:
            watcher[:] = [watched for watched in watcher if watched is not cache]
    record.caches.clear()
    record.on_stock_cache = True
    return record.stock_cache


def _expand_inputs(original, state: PluginState):
    def expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        record = state.current_call.get()
        if record is None or expand_size == 1:
            return original(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
                            **model_kwargs)
        result, record.prompt_inputs = capture_prompt_inputs(
            expand_size, input_ids, model_kwargs,
            lambda: original(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
                             **model_kwargs),
        )
        return result

    return expand_inputs_for_generation


def _prepare_cache(original, state: PluginState):
    def prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        record = state.current_call.get()
        given = model_kwargs.get(CACHE_KWARG)
        if record is not None and isinstance(given, PagedCache) and not any(given is seen for seen in record.given):
            given.start_call()
            record.given.append(given)
        generation_mode = args[0] if args else kwargs.get("generation_mode")
        wants_default_cache = (
            record is not None
            and record.paged
            and generation_mode in PAGED_MODES
            and given is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        )
        if not wants_default_cache:
            return original(self, generation_config, model_kwargs, *args, **kwargs)
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        shares_nothing = expand == 1
        batch_size, max_cache_length = _call_sizes(args, kwargs)
        # Tokens per row: prompt + max_new_tokens (the cache holds one fewer; inputs_embeds prompts counted).
        max_length = generation_config.max_length if max_cache_length is None else max_cache_length + 1
        # Rows may share blocks with beams or samples, or when several rows may repeat a prompt (computed once).
        block_size = record.block_size = state.block_size_for(self.device, max_length,
                                                              not shares_nothing or (batch_size or 1) > 1)
        if not state.always_paged and not generation_config.is_assistant:
            # Whether paging pays is known at the prompt forward (`_prefill`), which may hand the call to this cache.
            original(self, generation_config, model_kwargs, *args, **kwargs)
            record.stock_cache = model_kwargs.get(CACHE_KWARG)
        cache = state.new_cache(self, block_size, prefix_caching=generation_mode in PREFIX_CACHING_MODES)
        if shares_nothing and state.pool is None and not uses_triton(state.backend, self.device, block_size):
            # The PyTorch path reads rows in place when each keeps a run of blocks: the cache places the rows
            # max_length apart (the kernels read through the tables, so GPU memory is not set aside for that; nor
            # does a pool's storage, which the calls of its models share).
            cache.expected_seq_len = generation_config.max_length
        record.caches.append(cache)
        model_kwargs[CACHE_KWARG] = cache
        if generation_config.output_attentions and record.weights_token is None:
            record.weights_token = weights_wanted.set(True)
        if generation_config.is_assistant:
            # Assisted decoding crops the rejected tokens of the assistant's cache, which the assistant's calls return
            # and pass on from one round to the next.
            cache.activate_past_recording()

    return prepare_cache_for_generation


def _call_sizes(args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    """(batch_size, max_cache_length) of `_prepare_cache_for_generation(generation_config, model_kwargs,
    generation_mode, batch_size, max_cache_length)`, given after its first two arguments; None where not given."""
    named = ("generation_mode", "batch_size", "max_cache_length")
    values = dict(zip(named, args), **{key: kwargs[key] for key in named if key in kwargs})
    return values.get("batch_size"), values.get("max_cache_length")
