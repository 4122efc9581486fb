"""A prompt forward starting from a pool's cached blocks (see pool.py): its rows' first full blocks are taken from the
pool, and the forward computes the rest of the prompt only.

The cache holds the cached tokens before generate()'s `_prefill` runs, and `_prefill` gets the remaining input ids
with the attention mask of the whole prompt (cached tokens and new ones) and the position ids of the new tokens:
exactly what it gets when continuing a cache an earlier call returned (multi-turn), where it neither cuts the input
ids again (they are shorter than the mask) nor recomputes positions (tests/test_seams.py guards both).

A block's K/V depend on its tokens, their mask bits and positions, and the blocks before it (`blocks/prefix.py`), so
those are its key. Only prompts given as token ids with a mask and position ids are keyed: inputs_embeds, images and
any other input reaching the forward would change the K/V without changing the key.
"""

from __future__ import annotations

import numpy as np
import torch

from ..blocks.prefix import block_keys
from ..pooled_cache import PooledCache

__all__ = ["PromptKeys", "holds_tensors", "prompt_keys", "remainder"]

_CACHE_KEYS = ("cache", "past_key_values")
_KEYED_INPUTS = frozenset({"attention_mask", "position_ids"})


class PromptKeys:
    """The block keys of the rows a prompt forward runs on: `reusable[r]`, the blocks row r may take from the pool
    (never the one holding the prompt's last token: its logits must be computed); `full[r]`, every full block it
    leaves cached."""

    def __init__(self, fields: np.ndarray, block_size: int):
        # fields: int64 [num_rows, prompt_len, 3], token id, mask bit, position
        prompt_len = fields.shape[1]
        self.full = [block_keys(row, prompt_len // block_size, block_size) for row in fields]
        self.reusable = [keys[: (prompt_len - 1) // block_size] for keys in self.full]


def prompt_keys(model, cache, input_ids: torch.Tensor, inputs: dict, generation_config) -> PromptKeys | None:
    """The keys of the prompt forward about to run on `input_ids` [num_rows, prompt_len] with `inputs` (generate()'s
    model inputs for those rows), or None where the pool's prefixes do not apply (see the module docstring)."""
    if not (isinstance(cache, PooledCache) and cache.prefix_caching and cache.get_seq_length() == 0):
        return None
    if (model.config.is_encoder_decoder or generation_config.output_hidden_states
            or generation_config.output_attentions or getattr(generation_config, "prefill_chunk_size", None)):
        return None  # outputs of every prompt token wanted, or a prompt forward in chunks
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] <= cache.block_size:
        return None
    num_rows, prompt_len = input_ids.shape
    mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
    for key, value in inputs.items():
        if key not in _CACHE_KEYS and key not in _KEYED_INPUTS and holds_tensors(value):
            return None
    for value in (mask, positions):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != (num_rows, prompt_len)):
            return None
    columns = [input_ids,
               mask if mask is not None else torch.ones_like(input_ids),
               positions if positions is not None else torch.arange(prompt_len, device=input_ids.device).expand(
                   num_rows, prompt_len)]
    fields = torch.stack([column.to(input_ids.device, torch.int64) for column in columns], dim=-1)
    return PromptKeys(fields.cpu().numpy(), cache.block_size)


def remainder(input_ids: torch.Tensor, inputs: dict, cached: int) -> tuple[torch.Tensor, dict]:
    """The input ids and inputs of the prompt forward once each row's first `cached` tokens are cached: the ids and
    position ids of the rest; the mask still covers the whole prompt."""
    inputs = dict(inputs)
    if isinstance(inputs.get("position_ids"), torch.Tensor):
        inputs["position_ids"] = inputs["position_ids"][:, cached:]
    return input_ids[:, cached:], inputs


def holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):  # model outputs are dicts
        return any(holds_tensors(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_tensors(item) for item in value)
    return False
