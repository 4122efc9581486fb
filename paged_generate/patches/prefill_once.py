"""Prefill once: the prompt forward runs on each prompt once, not once per beam / sample.

generate() repeats every prompt's inputs `expand = max(num_beams, num_return_sequences)` times before the prompt
forward (`_expand_inputs_for_generation`, which families override: Qwen2-VL repeats its images per prompt,
transformers >= 5.24 repeats the vision tower's outputs). Rather than invert each family's expansion, the inputs are
kept as they were just before it (`PromptInputs`), and the prompt forward runs on those. Its outputs are then spread
to every row generate() expects (`PrefillRows`: which rows are computed, and the computed row each row takes), and
the cache forks the computed rows' blocks the same way, so the rest of generate() sees what it expects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from transformers.utils import ModelOutput

from ..cache import PagedCache
from .compat import CACHE_KWARG

__all__ = ["PrefillRows", "PromptInputs", "capture_prompt_inputs", "prefill_once"]

_CACHE_KEYS = ("cache", "past_key_values")


@dataclass(frozen=True)
class PromptInputs:
    """generate()'s model inputs just before it repeated them `expand` times for the beams / samples of each prompt.

    kwargs: the inputs as they were (nested dicts and model outputs copied, as some expansions edit them in place;
        tensors shared, as expansions make new ones)
    expanded: what the expansion returned, to tell the inputs that reach the prompt forward unchanged
    """

    expand: int
    num_prompts: int
    kwargs: dict
    expanded: dict


def capture_prompt_inputs(expand: int, input_ids, model_kwargs: dict, expand_inputs) -> tuple:
    """Run `expand_inputs(expand, input_ids, model_kwargs)` (the model's expansion); returns its result and the
    `PromptInputs` it started from."""
    before = {key: _snapshot(value) for key, value in model_kwargs.items()}
    input_ids, expanded = expand_inputs()
    num_prompts = input_ids.shape[0] // expand if input_ids is not None and expand else 0
    return (input_ids, expanded), PromptInputs(expand, num_prompts, before, dict(expanded))


@dataclass(frozen=True)
class PrefillRows:
    """Which rows of the batch generate() expects the prompt forward computes, and how its outputs reach every row.

    computed: int64 [num_computed], rows of that batch the forward runs on
    source: int64 [num_rows], for each row of the batch the index (into `computed`) of the row it takes outputs and
        blocks from

    The forward's inputs come one copy per prompt (`_prompt_inputs`): a plan computing only some prompts (equal
    prompts computed once) must pick those prompts from them, which row inputs allow (their first dimension) and
    inputs not one per prompt (images) do not.
    """

    computed: np.ndarray
    source: np.ndarray

    @classmethod
    def one_per_prompt(cls, num_rows: int, expand: int) -> "PrefillRows":
        """Rows [p0, p0, p0, p1, p1, p1] (generate() repeats each prompt in place): compute p0 and p1."""
        return cls(computed=np.arange(0, num_rows, expand), source=np.arange(num_rows) // expand)

    @property
    def num_computed(self) -> int:
        return len(self.computed)


def prefill_once(original, prompt_inputs_of):
    """`_prefill` computing each prompt once; `prompt_inputs_of()` gives the call's `PromptInputs` (or None)."""

    def prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True, *args, **kwargs):
        cache = model_kwargs.get(CACHE_KWARG)
        plan = _plan(self, cache, input_ids, generation_config, model_kwargs, prompt_inputs_of())
        if plan is None:
            if isinstance(cache, PagedCache) and cache.prefill_rows is None:
                cache.prefill_rows = input_ids.shape[0]
            return original(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        rows, inputs = plan
        cache.prefill_rows = rows.num_computed
        outputs = original(self, input_ids[rows.computed], generation_config, inputs, is_first_iteration, *args,
                           **kwargs)
        if cache.get_seq_length() == 0:
            raise ValueError(
                "paged-generate: the prompt forward stored its keys and values in a cache other than the paged one "
                "generate() prepared (PEFT's prefix tuning hands the model a cache of its own), so the rows of each "
                "prompt cannot share it. Run this model without the plugin: `disable_paged_cache(model)`."
            )
        cache.fork_rows(rows.source)
        return _spread(outputs, rows)

    return prefill


def _plan(model, cache, input_ids, generation_config, model_kwargs, prompt_inputs: PromptInputs | None):
    """(rows, the forward's inputs) when the prompt forward can run once per prompt, else None (stock's prefill)."""
    expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    num_rows = input_ids.shape[0]
    if (
        not isinstance(cache, PagedCache)
        or expand == 1
        or cache.get_seq_length() > 0
        or model.config.is_encoder_decoder
        or prompt_inputs is None
        or prompt_inputs.expand != expand
        or prompt_inputs.num_prompts * expand != num_rows
    ):
        return None
    inputs = _prompt_inputs(model_kwargs, prompt_inputs)
    if inputs is None or _rows_of_a_prompt_differ(prompt_inputs):
        return None
    return PrefillRows.one_per_prompt(num_rows, expand), inputs


def _prompt_inputs(model_kwargs: dict, prompt_inputs: PromptInputs) -> dict | None:
    """The forward's inputs, one copy per prompt: each input generate() expanded is taken from before the expansion;
    what generate() adds after it (the cache, the cache position, flags) is not per row. None when an expanded input
    was replaced after the expansion (it cannot be split by prompt): the prompt forward then runs as stock's."""
    inputs = {}
    for key, value in model_kwargs.items():
        if key in prompt_inputs.expanded and key not in _CACHE_KEYS:
            if value is not prompt_inputs.expanded[key]:
                return None
            value = prompt_inputs.kwargs[key]
        inputs[key] = value
    return inputs


def _rows_of_a_prompt_differ(prompt_inputs: PromptInputs) -> bool:
    """Whether generate() may have given the rows of one prompt different inputs: it repeated, one by one, items that
    are not one per prompt (a prompt's several images, before transformers 5.24 grouped them), so that a row holds
    another row's images. Computing each prompt once would then not give stock's rows. Items that are all alike
    (image grids of one size) are harmless, however repeated."""
    for key, expanded in prompt_inputs.expanded.items():
        before = prompt_inputs.kwargs.get(key)
        if (
            isinstance(before, torch.Tensor)
            and isinstance(expanded, torch.Tensor)
            and before.ndim >= 1
            and before.shape[0] != prompt_inputs.num_prompts
            and expanded.shape[0] == before.shape[0] * prompt_inputs.expand
            and not torch.equal(before[1:], before[:-1])
            and torch.equal(expanded, before.repeat_interleave(prompt_inputs.expand, dim=0))
        ):
            return True
    return False


def _snapshot(value):
    """A copy of the containers in `value` (dicts, lists, model outputs), sharing the tensors."""
    if isinstance(value, ModelOutput):
        snapshot = copy.copy(value)
        for key in list(snapshot.keys()):
            snapshot[key] = _snapshot(snapshot[key])
        return snapshot
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_snapshot(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_snapshot(item) for item in value)
    return value


def _spread(outputs: ModelOutput, rows: PrefillRows) -> ModelOutput:
    """Row i of every per-row output becomes the computed row `rows.source[i]`."""
    index_by_device: dict = {}

    def spread(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows.num_computed:
            index = index_by_device.get(value.device)
            if index is None:
                index = index_by_device[value.device] = torch.tensor(rows.source, device=value.device)
            return value.index_select(0, index)
        if isinstance(value, tuple):
            return tuple(spread(item) for item in value)
        return value

    for key in list(outputs.keys()):
        if key not in _CACHE_KEYS:
            outputs[key] = spread(outputs[key])
    return outputs
