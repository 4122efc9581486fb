"""`enable_paged_cache` / `disable_paged_cache` / `cache_stats`: the user-facing switch."""

from __future__ import annotations

import functools

import torch

from .attention import register_attention
from .backend import backend_problem
from .blocks import block_size_problem
from .blocks.sizes import AUTO, AUTO_LONG_BLOCK_SIZE
from .budget import CacheBudget
from .errors import UnsupportedModelError
from .kernels import MIN_BLOCK_SIZE
from .patches import generate as generate_patch
from .patches.attention_impl import (
    ATTENTION_NAME_EAGER,
    decoder_implementation,
    follow_switches,
    paged_name_for,
    stop_following_switches,
    switch_attention,
)
from .patches.compile_boundary import attention_modules, compile_attention_eagerly, restore_attention_forwards
from .patches.model_checks import family_eager, keeps_recurrent_state, uses_attention_registry
from .patches.tensor_parallel import tensor_parallel_of
from .patches.wrapped_models import peft_adapter_types, transformers_model_of
from .pool import KVPool, install_forward_gate
from .quantize import kv_cache_dtype_problem
from .stats import CacheStats

__all__ = ["cache_stats", "disable_paged_cache", "enable_paged_cache", "is_paged_cache_enabled"]

_STATE_ATTR = "_paged_generate_state"
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
# PEFT adapters that hand the model a cache of PEFT's own, holding their virtual tokens' keys and values, in place of
# the one generate() prepares (LoRA and the other weight adapters, prompt tuning, P-tuning and adaption prompts leave
# the cache to generate()).
_CACHE_REPLACING_ADAPTERS = {"PREFIX_TUNING", "CARTRIDGE"}
SUPPORTED_MODELS_HINT = (
    "paged-generate serves decoder-only models whose attention goes through transformers' attention registry and "
    "whose layers are all full or sliding-window attention (Llama, Mistral, Qwen2, ...); see the support matrix in "
    "the README. Run this model without the plugin (`disable_paged_cache(model)` or simply don't enable it)."
)


def enable_paged_cache(
    model: torch.nn.Module,
    *,
    block_size: int | str = "auto",
    max_blocks: int | None = None,
    max_cache_bytes: int | None = None,
    backend: str = "auto",
    kv_cache_dtype: str = "auto",
    pool: KVPool | None = None,
    prefix_caching: bool | None = None,
    min_shared_tokens: int | None = None,
) -> torch.nn.Module:
    """Make every later `model.generate(...)` keep its KV cache in shared, copy-on-write blocks.

    Parameters
    ----------
    model : a transformers causal LM (decoder-only, attention through the attention registry), or a wrapper of one: a
        PEFT model, a `torch.compile` module, a data-parallel container. The plugin acts on the transformers model
        inside, so every public function agrees whichever of these objects it is given.
    block_size : tokens per KV block, a power of two in [1, 256], or "auto": per call, smaller blocks for calls with
        beams or samples whose rows are short (they share more), 16 otherwise; see `blocks/sizes.py` and the README's
        block-size table. Any block size gives the same tokens.
    max_blocks : cap on the blocks one generate() call may hold; exceeding it raises `OutOfBlocksError`.
    max_cache_bytes : the same cap in bytes of K/V over all layers, as `cache_stats().peak_kv_bytes` counts them: with
        int8 / fp8 blocks, compressed full blocks with their scales and each row's partial block in the model's dtype.
        Checked before every allocation of a call, at its block size; with `max_blocks` too, both caps apply.
    backend : "auto" (Triton kernels for CUDA layers, PyTorch elsewhere), "triton" or "torch" to force one. The
        environment variable PAGED_GENERATE_BACKEND overrides "auto".
    kv_cache_dtype : "auto" (K/V in the model's dtype: token-identical to stock), "int8" or "fp8" (float8 e4m3): full
        blocks stored compressed with a scale per block and KV head, partial blocks in the model's dtype; lossy, see
        the README's compression section.
    pool : a `KVPool` whose blocks this model's calls use and keep: one memory budget for every model given the same
        pool, and (with the pool's `prefix_caching`) prompts' full blocks kept for later calls, which then compute only
        the rest of their prompts. The budget is the pool's: `max_blocks` / `max_cache_bytes` are refused with it.
        Pooled calls keep one block size (16 for "auto"), so that cached blocks line up from call to call.
    prefix_caching : True without a pool gives the model a private `KVPool(max_cache_bytes=...)` with prefix caching
        (`max_cache_bytes` / `max_blocks` becoming its budget); False with a pool shares only its budget. None (the
        default): the pool's setting, or no pool at all.
    min_shared_tokens : None (default): a call whose rows share too few prompt tokens for paging to pay (greedy or
        sampling of distinct prompts, beams of a short prompt on a small model; the rule measured in call_rule.py)
        runs on stock's own cache: the same tokens, stock's time, `cache_stats(model).paged` False. An int: calls
        sharing at least this many prompt tokens are paged, the others run on stock's cache; 0 pages every call.
        Calls with a memory cap (`max_blocks`, `max_cache_bytes`), compressed blocks or a `pool` are always paged.

    Returns `model` (the object given), enabled. Enabling an enabled model updates its settings. A cache passed
    explicitly to `generate` is used as is (one an earlier call returned continues a conversation); `use_cache=False`
    and `cache_implementation="static"` etc. keep stock behaviour.

    Example
    -------
    >>> model = enable_paged_cache(AutoModelForCausalLM.from_pretrained(path))
    >>> out = model.generate(ids, num_beams=8, max_new_tokens=64)
    >>> cache_stats(model).saving
    0.78
    """
    _check_settings(block_size, max_blocks, max_cache_bytes, min_shared_tokens)
    problem = backend_problem(backend, MIN_BLOCK_SIZE if block_size == AUTO else block_size) or \
        kv_cache_dtype_problem(kv_cache_dtype)
    if problem:
        raise ValueError(f"enable_paged_cache: {problem}.")
    _check_pool(pool, prefix_caching, max_blocks, max_cache_bytes)
    wrapper, model = model, transformers_model_of(model)
    _check_supported(model, wrapper)
    pool_block_size = AUTO_LONG_BLOCK_SIZE if block_size == AUTO else block_size  # a pool's calls keep one size
    if pool is None and prefix_caching:
        if max_blocks is not None:
            blocks_bytes = max_blocks * _pool_block_bytes(model, pool_block_size, "auto")
            max_cache_bytes = min(max_cache_bytes or blocks_bytes, blocks_bytes)
        pool, max_blocks, max_cache_bytes = KVPool(max_cache_bytes, prefix_caching=True), None, None
    budget = None
    if max_cache_bytes is not None:
        budget = _budget(model, max_cache_bytes, kv_cache_dtype)
        smallest = 1 if block_size == AUTO else block_size
        per_block = budget.block_bytes(smallest)[1]
        if max_cache_bytes < per_block:
            raise ValueError(f"enable_paged_cache: max_cache_bytes={max_cache_bytes} is less than one block of this "
                             f"model ({per_block} bytes for block_size={smallest}); raise it.")
    previous = getattr(model, _STATE_ATTR, None)
    register_attention()
    state = generate_patch.PluginState(
        block_size=block_size,
        max_blocks=max_blocks,
        backend=backend,
        kv_cache_dtype=kv_cache_dtype,
        budget=budget,
        min_shared_tokens=min_shared_tokens,
        attn_implementation=previous.attn_implementation if previous else decoder_implementation(model),
        pool=pool,
        prefix_caching=pool is not None and (pool.prefix_caching if prefix_caching is None else prefix_caching),
        block_bytes=functools.partial(_pool_block_bytes, block_size=pool_block_size, kv_cache_dtype=kv_cache_dtype),
    )
    if previous is None:
        _switch_attention(model, _stand_in(model, state.attn_implementation))
    else:
        _remove_forward_gate(previous)
        if previous.pool is not None and previous.pool is not pool:
            previous.pool.forget_model(model)
    if pool is not None:
        state.forward_gate = install_forward_gate(model)
    setattr(model, _STATE_ATTR, state)
    generate_patch.install(model, state)
    follow_switches(model, _on_attention_switch)
    compile_attention_eagerly(model)
    return wrapper


def disable_paged_cache(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_paged_cache`: stock `generate()` and the attention implementation the user chose last (at load
    time, or with `set_attn_implementation` while enabled). Returns `model` (the object given)."""
    inner = transformers_model_of(model)
    state = getattr(inner, _STATE_ATTR, None)
    if state is None:
        return model
    stop_following_switches(inner)
    restore_attention_forwards(inner)
    _remove_forward_gate(state)
    if state.pool is not None:
        state.pool.forget_model(inner)
    generate_patch.uninstall(inner)
    switch_attention(inner, state.attn_implementation)
    delattr(inner, _STATE_ATTR)
    return model


def is_paged_cache_enabled(model: torch.nn.Module) -> bool:
    return getattr(transformers_model_of(model), _STATE_ATTR, None) is not None


def cache_stats(model: torch.nn.Module) -> CacheStats:
    """Figures of the most recent `generate()` on an enabled model (see `CacheStats`): of the cache that call created,
    or of the one it was given (a call continuing a cache an earlier call returned reports that call's figures)."""
    state = plugin_state(model, "cache_stats")
    if state.last_stats is None:
        raise ValueError("cache_stats: no generate() call has finished on this model since it was enabled.")
    return state.last_stats


def plugin_state(model: torch.nn.Module, caller: str) -> generate_patch.PluginState:
    """The enabled model's plugin state; `caller` names the public function refusing a model that is not enabled."""
    state = getattr(transformers_model_of(model), _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{caller}: this model is not enabled; call `enable_paged_cache(model)` first.")
    return state


def _on_attention_switch(model, implementation) -> None:
    """`model.set_attn_implementation(implementation)` on an enabled model: remember the user's choice (disable
    restores it) and run its paged stand-in; or refuse, back on the previous stand-in."""
    state = getattr(model, _STATE_ATTR)
    stand_in = _stand_in(model, implementation)
    if stand_in == ATTENTION_NAME_EAGER and not _has_family_eager(model):
        switch_attention(model, _stand_in(model, state.attn_implementation))
        raise UnsupportedModelError(_no_family_eager(type(model).__name__, implementation))
    state.attn_implementation = implementation
    _switch_attention(model, stand_in)


def _stand_in(model, implementation) -> str:
    """The paged name the decoder runs while enabled, for the implementation the user chose."""
    softcap = getattr(model.config.get_text_config(decoder=True), "attn_logit_softcapping", None) is not None
    return paged_name_for(implementation, softcap=softcap)


def _check_settings(block_size, max_blocks, max_cache_bytes, min_shared_tokens) -> None:
    if block_size == AUTO:
        block_size = None
    elif isinstance(block_size, str):
        raise ValueError(f"enable_paged_cache: block_size={block_size!r}; give an int or 'auto'.")
    for name, value in (("block_size", block_size), ("max_blocks", max_blocks), ("max_cache_bytes", max_cache_bytes),
                        ("min_shared_tokens", min_shared_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"enable_paged_cache: `{name}` must be an int, got {type(value).__name__} ({value!r}).")
    problem = block_size_problem(block_size) if block_size is not None else None
    if problem:
        raise ValueError(f"enable_paged_cache: {problem}.")
    for name, value in (("max_blocks", max_blocks), ("max_cache_bytes", max_cache_bytes)):
        if value is not None and value <= 0:
            raise ValueError(f"enable_paged_cache: `{name}` must be positive, or None for no cap; got {value}.")
    if min_shared_tokens is not None and min_shared_tokens < 0:
        raise ValueError(f"enable_paged_cache: `min_shared_tokens` must be >= 0 (0 pages every call), or None for the "
                         f"measured rule; got {min_shared_tokens}.")


def _check_pool(pool, prefix_caching, max_blocks, max_cache_bytes) -> None:
    if pool is not None and not isinstance(pool, KVPool):
        raise TypeError(f"enable_paged_cache: `pool` must be a KVPool, got {type(pool).__name__}.")
    if prefix_caching is not None and not isinstance(prefix_caching, bool):
        raise TypeError(f"enable_paged_cache: `prefix_caching` must be True, False or None; got {prefix_caching!r}.")
    if pool is not None and (max_blocks is not None or max_cache_bytes is not None):
        raise ValueError("enable_paged_cache: a model given a `pool` takes its memory budget from it; set it with "
                         "`KVPool(max_cache_bytes=...)` instead of `max_blocks` / `max_cache_bytes`.")


def _remove_forward_gate(state) -> None:
    for handle in state.forward_gate:
        handle.remove()
    state.forward_gate = ()


def _pool_block_bytes(model, block_size: int, kv_cache_dtype: str) -> int:
    """Bytes of one full block over all layers as a pool counts it: K/V in the model's dtype, or compressed with a
    scale per block and KV head for each of K and V."""
    return _budget(model, 0, kv_cache_dtype).block_bytes(block_size)[0]  # no cap here: only the block's cost


def _check_supported(model, wrapper) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        held = f" (inside {type(wrapper).__name__})" if wrapper is not model else ""
        raise UnsupportedModelError(
            f"{type(model).__name__}{held} is not a transformers generation model. {SUPPORTED_MODELS_HINT}")
    name = type(model).__name__
    replacing = {adapter: kind for adapter, kind in peft_adapter_types(wrapper).items()
                 if kind in _CACHE_REPLACING_ADAPTERS}
    if replacing:
        raise UnsupportedModelError(
            f"{name} carries PEFT adapter(s) {replacing} that keep their virtual tokens' keys and values in a cache "
            f"PEFT builds and hands the model in place of the one generate() prepares; the paged cache cannot take "
            f"its place. Run this model without the plugin, or enable it on a model with other adapters (LoRA and "
            f"other weight adapters, prompt tuning, P-tuning and adaption prompts work). "
            f"{SUPPORTED_MODELS_HINT}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model: its decoder also attends to the encoder's output through a cache "
            f"of its own. {SUPPORTED_MODELS_HINT}"
        )
    if keeps_recurrent_state(model):
        raise UnsupportedModelError(f"{name} keeps a cache of its own (recurrent state). {SUPPORTED_MODELS_HINT}")
    text_config = config.get_text_config(decoder=True)
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    if not layer_types <= _ATTENTION_LAYER_TYPES:
        raise UnsupportedModelError(
            f"{name} has layers of type {sorted(layer_types - _ATTENTION_LAYER_TYPES)}: recurrent (state-space / "
            f"linear attention) state or attention patterns other than full and sliding-window, which a KV block "
            f"cache cannot hold. {SUPPORTED_MODELS_HINT}"
        )
    if not uses_attention_registry(type(model)):
        raise UnsupportedModelError(
            f"{name}'s attention does not go through transformers' attention registry (it computes attention itself, "
            f"e.g. with ALiBi biases), so it would never read the paged cache's blocks. {SUPPORTED_MODELS_HINT}"
        )
    implementation = decoder_implementation(model)
    if _stand_in(model, implementation) == ATTENTION_NAME_EAGER and not _has_family_eager(model):
        raise UnsupportedModelError(_no_family_eager(name, implementation))
    _check_tensor_parallel(model)


def _check_tensor_parallel(model) -> None:
    tensor_parallel = tensor_parallel_of(model)
    if tensor_parallel is None or _kv_heads_per_rank(model) is not None:
        return
    num_kv_heads, size = _num_kv_heads(model), tensor_parallel.size
    fits = [str(ranks) for ranks in range(2, num_kv_heads + 1) if num_kv_heads % ranks == 0]
    remedy = f"on {' or '.join(fits)} ranks (torchrun --nproc_per_node)" if fits else "without tensor parallelism"
    raise UnsupportedModelError(
        f"{type(model).__name__} is sharded over {size} ranks by a tensor-parallel plan that splits its key/value "
        f"projections by columns ({', '.join(sorted(tensor_parallel.kv_splits))}), and its KV heads ({num_kv_heads}) "
        f"do not divide by {size}: each rank would hold part of a head (a slice of head_dim), which the block pools "
        f"cannot hold and the model's attention cannot reshape either. Run it {remedy}, or spread its layers over "
        f"devices with device_map instead of tp_plan."
    )


def _has_family_eager(model) -> bool:
    """Whether every attention module's modeling file has the eager function the eager stand-in runs."""
    return all(family_eager(type(module)) is not None for module in attention_modules(model))


def _no_family_eager(name: str, implementation) -> str:
    return (f"{name} runs {implementation!r} attention, which the plugin reproduces with the `eager_attention_forward` "
            f"of its attention's modeling file, and that file has none. Load the model with "
            f"attn_implementation='sdpa'. {SUPPORTED_MODELS_HINT}")


def _switch_attention(model, name: str) -> None:
    """Set the model's attention to `name`, or refuse (model unchanged) where transformers would not switch it."""
    if not switch_attention(model, name):
        raise UnsupportedModelError(
            f"{type(model).__name__} did not switch its attention to {name!r} (it kept "
            f"{decoder_implementation(model)!r}): transformers cannot set its attention dynamically. "
            f"{SUPPORTED_MODELS_HINT}"
        )


def _budget(model, max_cache_bytes: int, kv_cache_dtype: str) -> CacheBudget:
    """What K/V costs in this process (under tensor parallelism, its own heads only), for `max_cache_bytes`."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = _kv_heads_per_rank(model) * config.num_hidden_layers
    return CacheBudget(max_cache_bytes=max_cache_bytes, elements_per_token=2 * kv_heads * head_dim,
                       element_bytes=model.dtype.itemsize, kv_heads=kv_heads, kv_cache_dtype=kv_cache_dtype)


def _num_kv_heads(model) -> int:
    config = model.config.get_text_config(decoder=True)  # the global count, also on a tensor-parallel rank
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _kv_heads_per_rank(model) -> int | None:
    """The KV heads this process's attention layers receive (None: a tensor-parallel plan cuts heads apart)."""
    tensor_parallel = tensor_parallel_of(model)
    num_kv_heads = _num_kv_heads(model)
    return num_kv_heads if tensor_parallel is None else tensor_parallel.kv_heads_per_rank(num_kv_heads)
