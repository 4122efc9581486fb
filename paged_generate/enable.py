"""`enable_paged_cache` / `disable_paged_cache` / `cache_stats`: the user-facing switch."""

from __future__ import annotations

import torch

from .attention import register_attention
from .backend import backend_problem
from .blocks import block_size_problem
from .errors import UnsupportedModelError
from .patches import generate as generate_patch
from .patches.attention_impl import implementation_of, paged_name_for, switch_attention
from .patches.model_checks import family_eager, keeps_recurrent_state, uses_attention_registry
from .quantize import kv_cache_dtype_problem
from .stats import CacheStats

__all__ = ["cache_stats", "disable_paged_cache", "enable_paged_cache", "is_paged_cache_enabled"]

_STATE_ATTR = "_paged_generate_state"
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
SUPPORTED_MODELS_HINT = (
    "paged-generate serves decoder-only models whose attention goes through transformers' attention registry and "
    "whose layers are all full or sliding-window attention (Llama, Mistral, Qwen2, ...); see the support matrix in "
    "the README. Run this model without the plugin (`disable_paged_cache(model)` or simply don't enable it)."
)


def enable_paged_cache(
    model: torch.nn.Module,
    *,
    block_size: int = 16,
    max_blocks: int | None = None,
    max_cache_bytes: int | None = None,
    backend: str = "auto",
    kv_cache_dtype: str = "auto",
) -> torch.nn.Module:
    """Make every later `model.generate(...)` keep its KV cache in shared, copy-on-write blocks.

    Parameters
    ----------
    model : a transformers causal LM (decoder-only, attention through the attention registry).
    block_size : tokens per KV block, a power of two in [1, 256].
    max_blocks : cap on the blocks one generate() call may hold; exceeding it raises `OutOfBlocksError`.
    max_cache_bytes : the same cap in bytes of K/V over all layers (converted with the model's dtype).
    backend : "auto" (Triton kernels for CUDA layers, PyTorch elsewhere), "triton" or "torch" to force one. The
        environment variable PAGED_GENERATE_BACKEND overrides "auto".
    kv_cache_dtype : "auto" (K/V in the model's dtype: token-identical to stock), "int8" or "fp8" (float8 e4m3): full
        blocks stored compressed with a scale per block and KV head, partial blocks in the model's dtype; lossy, see
        the README's compression section. `max_cache_bytes` is still converted with the model's dtype.

    Returns the model, enabled. Enabling an enabled model updates its settings. A cache passed explicitly to
    `generate` is used as is; `use_cache=False` and `cache_implementation="static"` etc. keep stock behaviour.

    Example
    -------
    >>> model = enable_paged_cache(AutoModelForCausalLM.from_pretrained(path))
    >>> out = model.generate(ids, num_beams=8, max_new_tokens=64)
    >>> cache_stats(model).saving
    0.78
    """
    _check_settings(block_size, max_blocks, max_cache_bytes)
    problem = backend_problem(backend, block_size) or kv_cache_dtype_problem(kv_cache_dtype)
    if problem:
        raise ValueError(f"enable_paged_cache: {problem}.")
    _check_supported(model)
    if max_cache_bytes is not None:
        per_block = block_size * _bytes_per_token(model)
        if max_cache_bytes < per_block:
            raise ValueError(f"enable_paged_cache: max_cache_bytes={max_cache_bytes} is less than one block of this "
                             f"model ({per_block} bytes for block_size={block_size}); raise it.")
        max_blocks = min(max_blocks or max_cache_bytes // per_block, max_cache_bytes // per_block)
    previous = getattr(model, _STATE_ATTR, None)
    register_attention()
    state = generate_patch.PluginState(
        block_size=block_size,
        max_blocks=max_blocks,
        backend=backend,
        kv_cache_dtype=kv_cache_dtype,
        original_attn_implementation=(
            previous.original_attn_implementation if previous else implementation_of(model.config)
        ),
    )
    if previous is None:
        _switch_attention(model, paged_name_for(state.original_attn_implementation))
    setattr(model, _STATE_ATTR, state)
    generate_patch.install(model, state)
    return model


def disable_paged_cache(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_paged_cache`: stock `generate()` and the model's original attention implementation."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    generate_patch.uninstall(model)
    model.set_attn_implementation(state.original_attn_implementation)
    delattr(model, _STATE_ATTR)
    return model


def is_paged_cache_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def cache_stats(model: torch.nn.Module) -> CacheStats:
    """Figures of the most recent `generate()` on an enabled model (see `CacheStats`)."""
    state = plugin_state(model, "cache_stats")
    if state.last_stats is None:
        raise ValueError("cache_stats: no generate() call has finished on this model since it was enabled.")
    return state.last_stats


def plugin_state(model: torch.nn.Module, caller: str) -> generate_patch.PluginState:
    """The enabled model's plugin state; `caller` names the public function refusing a model that is not enabled."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{caller}: this model is not enabled; call `enable_paged_cache(model)` first.")
    return state


def _check_settings(block_size, max_blocks, max_cache_bytes) -> None:
    for name, value in (("block_size", block_size), ("max_blocks", max_blocks), ("max_cache_bytes", max_cache_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"enable_paged_cache: `{name}` must be an int, got {type(value).__name__} ({value!r}).")
    problem = block_size_problem(block_size)
    if problem:
        raise ValueError(f"enable_paged_cache: {problem}.")
    for name, value in (("max_blocks", max_blocks), ("max_cache_bytes", max_cache_bytes)):
        if value is not None and value <= 0:
            raise ValueError(f"enable_paged_cache: `{name}` must be positive, or None for no cap; got {value}.")


def _check_supported(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers generation model. {SUPPORTED_MODELS_HINT}")
    name = type(model).__name__
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
    if implementation_of(config) == "eager" and family_eager(type(model)) is None:
        raise UnsupportedModelError(
            f"{name} runs eager attention, which the plugin reproduces with the `eager_attention_forward` of the "
            f"model's modeling file, and that file has none. Load the model with attn_implementation='sdpa'. "
            f"{SUPPORTED_MODELS_HINT}"
        )


def _switch_attention(model, name: str) -> None:
    """Set the model's attention to `name`, or refuse (model unchanged) where transformers would not switch it."""
    if not switch_attention(model, name):
        raise UnsupportedModelError(
            f"{type(model).__name__} did not switch its attention to {name!r} (it kept "
            f"{implementation_of(model.config)!r}): transformers cannot set its attention dynamically. "
            f"{SUPPORTED_MODELS_HINT}"
        )


def _bytes_per_token(model) -> int:
    config = model.config.get_text_config(decoder=True)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    element_size = torch.empty((), dtype=model.dtype).element_size()
    return 2 * num_kv_heads * head_dim * element_size * config.num_hidden_layers
