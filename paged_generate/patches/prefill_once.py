"""Prefill once: the prompt forward runs on each distinct prompt once, not once per beam / sample / repeated row.

generate() repeats every prompt's inputs `expand = max(num_beams, num_return_sequences)` times before the prompt
forward (`_expand_inputs_for_generation`, which families override: Qwen2-VL repeats its images per prompt,
transformers >= 5.24 repeats the vision tower's outputs). Rather than invert each family's expansion, the inputs are
kept as they were just before it (`PromptInputs`), and the prompt forward runs on those. Callers also repeat prompts
themselves (TRL's GRPO trainer passes every prompt `num_generations` times as rows): prompts whose inputs are equal in
every row input (`equal_prompts`) are computed once, wherever they sit in the batch. The forward's outputs are then
spread to every row generate() expects (`PrefillRows`: which rows are computed, and the computed row each row takes),
and the cache forks the computed rows' blocks the same way, so the rest of generate() sees what it expects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from transformers.utils import ModelOutput

from ..cache import PagedCache
from .compat import CACHE_KWARG

__all__ = ["PrefillRows", "PromptInputs", "capture_prompt_inputs", "equal_prompts", "prefill_once"]

_CACHE_KEYS = ("cache", "past_key_values")
# Inputs of the prompt forward holding one entry per row (along dimension 0, or 1 for the [3 or 4, rows, len]
# multimodal position ids): equal prompts agree in all of them. Any other tensor input (images, their grids, encoder
# outputs) is not one per row in general, so which rows it belongs to is unknown: rows are then not merged.
_ROW_INPUTS = frozenset({"attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids", "inputs_embeds"})
_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
             torch.nn.FeatureAlphaDropout)
_DROPOUT_RATES = ("attention_dropout", "attn_dropout", "dropout")  # float attributes of attention modules
# Compared bit for bit: floats as the integers of the same size, so that 0.0 and -0.0 differ and NaN equals itself.
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    prompts computed once) picks those prompts from them, which row inputs allow (`_ROW_INPUTS`) and inputs not one
    per prompt (images) do not.
    """

    computed: np.ndarray
    source: np.ndarray

    @classmethod
    def one_per_prompt(cls, num_rows: int, expand: int) -> "PrefillRows":
        """Rows [p0, p0, p0, p1, p1, p1] (generate() repeats each prompt in place): compute p0 and p1."""
        return cls(computed=np.arange(0, num_rows, expand), source=np.arange(num_rows) // expand)

    @classmethod
    def of_prompts(cls, distinct_of: np.ndarray, expand: int) -> "PrefillRows":
        """Prompts [a, b, a] each repeated `expand` times in place (rows [a, a, b, b, a, a] for expand 2), where
        `distinct_of` [num_prompts] numbers each prompt's distinct prompt by first occurrence ([0, 1, 0]): compute
        the first row of each distinct prompt (rows 0 and 2); every row takes its distinct prompt's."""
        first_prompts = np.unique(distinct_of, return_index=True)[1]
        return cls(computed=first_prompts * expand, source=np.repeat(distinct_of, expand))

    @property
    def num_computed(self) -> int:
        return len(self.computed)


def prefill_once(original, prompt_inputs_of, stock_cache_unless_paging_pays):
    """`_prefill` computing each distinct prompt once; `prompt_inputs_of()` gives the call's `PromptInputs` (or None,
    where generate() repeated nothing). `stock_cache_unless_paging_pays(model, shared_tokens, new_tokens)` gives
    stock's cache for a call that should run on it (the prompt tokens its rows share pay too little), else None."""

    def prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True, *args, **kwargs):
        cache = model_kwargs.get(CACHE_KWARG)
        plan = _plan(self, cache, input_ids, generation_config, model_kwargs, prompt_inputs_of())
        if isinstance(cache, PagedCache) and cache.get_seq_length() == 0:
            num_rows, prompt_len = input_ids.shape[0], input_ids.shape[-1]
            shared_tokens = (num_rows - (plan[0].num_computed if plan else num_rows)) * prompt_len
            stock_cache = stock_cache_unless_paging_pays(self, shared_tokens, generation_config.max_length - prompt_len)
            if stock_cache is not None:
                model_kwargs[CACHE_KWARG] = stock_cache
                return original(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        if plan is None:
            if isinstance(cache, PagedCache) and cache.prefill_rows is None:
                cache.prefill_rows = input_ids.shape[0]
            return original(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        rows, inputs = plan
        cache.prefill_rows = rows.num_computed
        # Rows forked from one computed row share its blocks: they are not laid out in runs of their own.
        cache.expected_seq_len = None
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
    """(rows, the forward's inputs) when the prompt forward can run on fewer rows than generate() expects (the beams /
    samples of a prompt, rows repeating a prompt), else None (stock's prefill)."""
    expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    num_rows = input_ids.shape[0]
    if (
        not isinstance(cache, PagedCache)
        or cache.get_seq_length() > 0
        or model.config.is_encoder_decoder
        or _drops_out(model)
    ):
        return None
    if expand == 1:
        inputs = model_kwargs  # one prompt per row, as the caller passed them
    else:
        if (
            prompt_inputs is None
            or prompt_inputs.expand != expand
            or prompt_inputs.num_prompts * expand != num_rows
        ):
            return None
        inputs = _prompt_inputs(model_kwargs, prompt_inputs)
        if inputs is None or _rows_of_a_prompt_differ(prompt_inputs):
            return None
    distinct_of = equal_prompts(input_ids[::expand], inputs)
    if distinct_of is None:
        return (PrefillRows.one_per_prompt(num_rows, expand), inputs) if expand > 1 else None
    rows = PrefillRows.of_prompts(distinct_of, expand)
    return rows, _select_prompts(inputs, rows.computed // expand)


def equal_prompts(prompt_ids: torch.Tensor, inputs: dict) -> np.ndarray | None:
    """int64 [num_prompts]: for each prompt the number of its distinct prompt (0, 1, ... by first occurrence), when
    some prompts are equal in their tokens and in every row input (`_ROW_INPUTS`: mask, so the same left padding;
    position ids; token types); None when no two are, or when an input not one per row (images) is present.

    prompt_ids: [num_prompts, prompt_len]. One pass on the device and one transfer of [num_prompts] labels to the
    host, the only synchronisation, in the prompt forward which synchronises anyway.
    """
    num_prompts = prompt_ids.shape[0]
    if num_prompts < 2:
        return None
    columns = [prompt_ids.reshape(num_prompts, -1)]
    for key, value in inputs.items():
        if key in _CACHE_KEYS or not _holds_tensors(value):
            continue
        if key not in _ROW_INPUTS or not isinstance(value, torch.Tensor):
            return None
        batch_dim = _batch_dim(key, value)
        if value.shape[batch_dim] != num_prompts:
            return None
        columns.append(value.movedim(batch_dim, 0).reshape(num_prompts, -1))
    columns = [column for column in columns if column.shape[1]]  # ids are [rows, 0] when inputs_embeds stand in
    if not columns:
        return None
    labels = _row_labels(columns, prompt_ids.device)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    if len(first) == num_prompts:
        return None
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _row_labels(columns: list, device: torch.device) -> np.ndarray:
    """int64 [rows]: equal labels for rows equal bit for bit in every column ([rows, width] tensors of any dtype).
    Columns of one bit width are compared in one `unique`; each further width adds one."""
    by_bits: dict = {}
    for column in columns:
        bits = _BITS_OF_SIZE.get(column.element_size(), torch.uint8)
        by_bits.setdefault(bits, []).append(column.to(device).contiguous().view(bits))
    labels = [torch.unique(torch.cat(group, dim=1), dim=0, return_inverse=True)[1] for group in by_bits.values()]
    if len(labels) > 1:
        labels = [torch.unique(torch.stack(labels, dim=1), dim=0, return_inverse=True)[1]]
    return labels[0].cpu().numpy()


def _select_prompts(inputs: dict, prompts: np.ndarray) -> dict:
    """The forward's inputs for `prompts` only: row inputs indexed along their batch dimension, the rest as is."""
    selected = {}
    for key, value in inputs.items():
        if key in _ROW_INPUTS and isinstance(value, torch.Tensor):
            value = value.index_select(_batch_dim(key, value), torch.from_numpy(prompts).to(value.device))
        selected[key] = value
    return selected


def _drops_out(model) -> bool:
    """Whether `model`'s forwards drop activations at random (training mode, some dropout probability above 0): stock's
    prompt forward then draws a mask for every row, so rows computed once would not hold what stock's rows hold."""
    if not model.training:
        return False
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, _DROPOUTS) and module.p > 0:
            return True
        if any(isinstance(getattr(module, name, None), float) and getattr(module, name) > 0 for name in _DROPOUT_RATES):
            return True  # attention modules hand their rate to the attention function while training
    return False


def _batch_dim(key: str, value: torch.Tensor) -> int:
    # generate() expands multimodal position ids [3 or 4, rows, len] along dimension 1 (`_expand_inputs_for_generation`).
    return 1 if key == "position_ids" and value.ndim == 3 else 0


def _holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):  # model outputs are dicts
        return any(_holds_tensors(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(item) for item in value)
    return False


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
