"""Watching what generate() does with the paged cache: the caches of the calls, and their state step by step."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .cache import PagedCache
from .enable import plugin_state
from .patches.compat import CACHE_KWARG
from .patches.wrapped_models import transformers_model_of

__all__ = ["CapturedCalls", "StepRecord", "capture_caches"]


@dataclass(frozen=True)
class StepRecord:
    """A paged cache right after one forward of a generate() call.

    block_tables: int64 [num_rows, num_blocks_per_row], the block ids each row holds (rows are beams / samples)
    ref_counts: int64, same shape: how many table entries point at each of those blocks (> 1: shared)
    copied: int64 [num_copies], the blocks this forward's copy-on-write copies wrote
    """

    cache: PagedCache
    seq_len: int
    block_tables: np.ndarray
    ref_counts: np.ndarray
    copied: np.ndarray
    blocks_in_use: int
    kv_bytes: int


@dataclass
class CapturedCalls:
    """What `capture_caches` collected: every `PagedCache` the calls created (released at the end of their call, as
    usual, unless the call returned it: `cache.stats()` and the allocator's figures stay readable), and with
    `record_steps` a `StepRecord` after every forward."""

    caches: list[PagedCache] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)


@contextmanager
def capture_caches(model, *, record_steps: bool = False) -> Iterator[CapturedCalls]:
    """Collect the paged caches of the generate() calls made on the enabled `model` inside the block.

    Calls from other threads on the same model are collected too. `model` may be a wrapper (a PEFT model, a compiled
    module): the forwards watched are those of the transformers model inside.

    Example
    -------
    >>> with capture_caches(model, record_steps=True) as captured:
    ...     model.generate(ids, num_beams=4, max_new_tokens=8)
    >>> captured.caches[0].stats().peak_blocks
    >>> [step.block_tables.shape for step in captured.steps]
    """
    state = plugin_state(model, "capture_caches")
    captured = CapturedCalls()
    state.watchers.append(captured.caches)
    inner = transformers_model_of(model)
    handle = inner.register_forward_hook(_step_recorder(captured), with_kwargs=True) if record_steps else None
    try:
        yield captured
    finally:
        state.watchers.remove(captured.caches)
        if handle is not None:
            handle.remove()


def _step_recorder(captured: CapturedCalls):
    def record(module, args, kwargs, output) -> None:
        cache = kwargs.get(CACHE_KWARG)
        if not any(cache is mine for mine in captured.caches):
            return
        step = cache.current_step
        tables = cache.tables.tables.copy()
        bytes_per_block = cache.block_size * sum(layer.bytes_per_token for layer in cache.layers)
        captured.steps.append(StepRecord(
            cache=cache,
            seq_len=cache.get_seq_length(),
            block_tables=tables,
            ref_counts=cache.allocator.ref_counts[tables],
            copied=step.copy_dst.copy() if step is not None else np.zeros(0, dtype=np.int64),
            blocks_in_use=cache.allocator.num_used,
            kv_bytes=cache.allocator.num_used * bytes_per_block,
        ))

    return record
