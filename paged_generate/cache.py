"""`PagedCache`: a `transformers.Cache` whose layers keep K/V in block pools addressed through shared block tables."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .backend import uses_triton
from .blocks import BlockAllocator, BlockTables, PartialBlocks, cdiv
from .compressed import CompressedPools
from .kernels import kernels_load, kernels_serve
from .kv_ops import copy_blocks, grown, tokens_major, write_kv
from .layout import gather_kv_rows, gather_rows
from .patches.attention_impl import implementation_of, runs_paged_attention
from .patches.compat import length_after_crop
from .patches.layer_windows import stock_cache_windows
from .quantize import kv_cache_dtype_problem
from .read import CompressedRead, PagedRead, forget_handed_over, handed_over, paged_read_of
from .stats import CacheStats
from .step import PagedStep

__all__ = ["CompressedLayer", "PagedCache", "PagedLayer", "PagedRead", "forget_handed_over", "paged_read_of"]


@dataclass(frozen=True)
class _RowsViews:
    """Every row's K and V as views of one layer's pools, reaching `reach` >= seq_len tokens."""

    layout: tuple[int, int]
    num_rows: int
    key_pool: torch.Tensor
    keys: torch.Tensor  # [num_rows, num_kv_heads, reach, head_dim]
    values: torch.Tensor
    reach: int


class PagedLayer(CacheLayerMixin):
    """One attention layer's K/V pools `[num_blocks, block_size, num_kv_heads, head_dim]` on its own device and dtype.

    The block tables live in the owning `PagedCache` and are the same for every layer: a step is planned once, by
    whichever layer sees it first, and the other layers reuse that plan.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, cache: "PagedCache"):
        super().__init__()
        # Weak: a cache a generate() call returns is freed, pools included, as soon as the caller drops it (a layer
        # referring back to it would leave that to the cycle collector, which may not run for a long while).
        self._cache = weakref.ref(cache)
        self.num_written = 0  # tokens per row this layer has stored; lags the cache's length mid-forward
        self.bytes_per_token = 0
        self.use_triton = False
        # The sliding window stock's cache keeps for this layer (None: the whole history), once `from_model` has read
        # it from the config. Unknown, every step takes the path that cuts rows per attention module.
        self.stock_window: int | None = None
        self.stock_window_known = False
        self._pool_blocks = -1  # blocks in this layer's pools; -1 before they exist
        self.kv: torch.Tensor | None = None  # K and V in one pool, when `keys` and `values` are its halves
        self._views: _RowsViews | None = None

    @property
    def cache(self) -> "PagedCache":
        return self._cache()

    def set_stock_window(self, window: int | None) -> None:
        self.stock_window, self.stock_window_known = window, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # key_states: [num_rows, num_kv_heads, query_len, head_dim]
        _, num_kv_heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        block_size = self.cache.block_size
        # Pools the kernels cannot serve (dtype, head_dim, a value head_dim of its own) take the PyTorch path: checked
        # here once, so the kernels launch without per-call checks.
        self.use_triton = uses_triton(self.cache.backend, self.device, block_size) and kernels_serve(
            dtype=self.dtype, head_dim=head_dim, value_head_dim=value_states.shape[-1], block_size=block_size)
        self.bytes_per_token = num_kv_heads * (head_dim + value_states.shape[-1]) * key_states.element_size()
        # Zeros, not empty: see `kv_ops.grown`. On the PyTorch path K and V of a token lie side by side in one pool, so
        # a write, a copy and a gather are one indexed operation each (keys and values are its two halves); the
        # kernels treat K and V in one launch already and keep a pool each.
        capacity = self.cache.allocator.capacity
        if not self.use_triton and value_states.shape[-1] == head_dim and value_states.dtype == self.dtype:
            self._set_pools(fused=torch.zeros((capacity, block_size, 2, num_kv_heads, head_dim), dtype=self.dtype,
                                              device=self.device))
        else:  # keys and values of different widths (no supported family) or dtypes (autocast): a pool each
            self._set_pools(
                keys=torch.zeros((capacity, block_size, num_kv_heads, head_dim), dtype=self.dtype, device=self.device),
                values=torch.zeros((capacity, block_size, num_kv_heads, value_states.shape[-1]),
                                   dtype=value_states.dtype, device=self.device))
        # Where attention has no paged work, rows are handed to it as views of the pools: not for the Triton kernels
        # (they read the pools themselves), nor where stock's cache would have cut a sliding window that is unknown.
        self._hands_rows_as_views = not self.use_triton and self.stock_window_known
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `[num_rows, num_kv_heads, query_len, head_dim]` new K/V in the pools; return what attention reads.

        Where attention has no paged work to do, that is every row's K/V `[num_rows, num_kv_heads, seq_len, head_dim]`
        as views of the pools, and the model's attention function runs stock's attention on them with no per-layer
        glue: the rows' blocks are laid out regularly (`PagedStep.row_layout`), no shared prefix is to be split off,
        the PyTorch backend serves the layer and no sliding-window cut applies. Otherwise it is the pools themselves,
        with a `PagedRead` handed over for the attention function.
        """
        step = self.cache.step_for(self, key_states.shape[0], key_states.shape[-2])
        if self._pool_blocks < step.pool_blocks:
            self._provide_pools(key_states, value_states, step.pool_blocks)
        if step.num_copies:
            device_step = step.on(self.device)
            copy_blocks(self.keys, self.values, device_step.copy_src, device_step.copy_dst, use_triton=self.use_triton,
                        fused=self.kv)
        self.num_written = seq_len = step.seq_len
        past_len = step.past_len
        if step.reads_rows_in_place and self._hands_rows_as_views and (
            self.stock_window is None or past_len < self.stock_window
        ):
            views = self._rows_views(step)
            keys, values = views.keys, views.values
            keys[:, :, past_len:seq_len].copy_(key_states)
            values[:, :, past_len:seq_len].copy_(value_states)
            return keys[:, :, :seq_len], values[:, :, :seq_len]
        device_step = step.on(self.device)
        write_kv(tokens_major(key_states), tokens_major(value_states), self.keys, self.values,
                 device_step.slot_mapping, use_triton=self.use_triton, fused=self.kv)
        handed_over.set(PagedRead(self, step, device_step))
        return self.keys, self.values

    def rows(self, step: PagedStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's K and V [num_rows, num_kv_heads, seq_len, head_dim]: views of the pools when the rows' blocks
        are laid out regularly, else gathered through the block tables."""
        seq_len = step.seq_len
        if step.shares_prefix or step.row_layout is None:  # rows sharing a prefix are never laid out regularly
            tables = step.on(self.device).block_tables
            if self.kv is not None:
                return gather_kv_rows(self.kv, tables, seq_len)
            return gather_rows(self.keys, tables, seq_len), gather_rows(self.values, tables, seq_len)
        views = self._rows_views(step)
        return views.keys[:, :, :seq_len], views.values[:, :, :seq_len]

    def _rows_views(self, step: PagedStep) -> _RowsViews:
        # Views reaching every block the rows can hold are kept: a decode step then only slices them.
        views = self._views
        if (views is None or views.key_pool is not self.keys or views.layout != step.row_layout
                or views.num_rows != step.num_rows or views.reach < step.seq_len):
            keys, values = step.rows_view(self.keys), step.rows_view(self.values)
            views = self._views = _RowsViews(step.row_layout, step.num_rows, self.keys, keys, values, keys.shape[2])
        return views

    def _provide_pools(self, key_states: torch.Tensor, value_states: torch.Tensor, num_blocks: int) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._grow_pools(num_blocks)

    def _grow_pools(self, capacity: int) -> None:
        """Grow this layer's pools to the allocator's capacity; one layer at a time, so the peak stays low."""
        if self.kv is not None:
            self._set_pools(fused=grown(self.kv, capacity))
        else:
            self._set_pools(keys=grown(self.keys, capacity), values=grown(self.values, capacity))

    def _set_pools(self, *, fused: torch.Tensor | None = None, keys=None, values=None) -> None:
        """keys / values [num_blocks, block_size, num_kv_heads, head_dim]: the halves of `fused`, or pools of their
        own; every write, copy and read goes through them."""
        self.kv = fused
        if fused is not None:
            keys, values = fused[:, :, 0], fused[:, :, 1]
        self.keys, self.values = keys, values
        self._pool_blocks = keys.shape[0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def release(self) -> None:
        self.keys = self.values = self.kv = None
        self._pool_blocks = -1
        self._views = None
        self.is_initialized = False
        self.num_written = 0

    # The container handles these once for all layers (the tables are shared); a layer alone has nothing to do.
    def reset(self) -> None:
        self.num_written = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("call PagedCache.reorder_cache: block tables are shared by all layers")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("call PagedCache.crop: block tables are shared by all layers")


class CompressedLayer(PagedLayer):
    """A `PagedLayer` of a cache storing full blocks compressed (`kv_cache_dtype` "int8" / "fp8"): `storage` holds
    them quantized, and the rows' partial blocks in the model's dtype (see `compressed.py`). Attention always gets the
    compressed pools and a `CompressedRead`: rows are never views of the pools."""

    def __init__(self, cache: "PagedCache"):
        super().__init__(cache)
        self.storage: CompressedPools | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, num_kv_heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.storage = CompressedPools(self.cache.kv_cache_dtype, key_states, value_states, self.cache.block_size)
        self.use_triton = uses_triton(self.cache.backend, self.device, self.cache.block_size) and kernels_serve(
            dtype=self.dtype, head_dim=head_dim, value_head_dim=value_states.shape[-1],
            block_size=self.cache.block_size) and kernels_load(self.storage.keys.dtype, self.device, self.dtype)
        # Stock's figure, in the model's dtype: what `dense_kv_bytes` counts.
        self.bytes_per_token = num_kv_heads * (head_dim + value_states.shape[-1]) * key_states.element_size()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `[num_rows, num_kv_heads, query_len, head_dim]` new K/V; return the compressed pools (attention reads
        them through the `CompressedRead` handed over)."""
        step = self.cache.step_for(self, key_states.shape[0], key_states.shape[-2])
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        storage = self.storage
        storage.provide(step.pool_blocks, step.slots.capacity)
        self.keys, self.values = storage.keys, storage.values
        device_step = step.on(self.device)
        storage.store(step, device_step, key_states, value_states, use_triton=self.use_triton)
        self.num_written = step.seq_len
        handed_over.set(CompressedRead(self, step, device_step))
        return self.keys, self.values

    def rows(self, step: PagedStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's K and V [num_rows, num_kv_heads, seq_len, head_dim] in the model's dtype (dequantized)."""
        return CompressedRead(self, step, step.on(self.device)).rows()

    def reopen(self, blocks: np.ndarray, slots: np.ndarray) -> None:
        """After a crop: full blocks partial again take back their (dequantized) tokens in their slots."""
        if self.storage is not None and len(blocks):
            self.storage.provide(0, self.cache.partial.capacity)
            to = dict(dtype=torch.int64, device=self.device)
            self.storage.reopen(torch.as_tensor(blocks, **to), torch.as_tensor(slots, **to))

    def release(self) -> None:
        super().release()
        self.storage = None


class PagedCache(Cache):
    """KV cache with block tables, reference counts and copy-on-write, for `model.generate()`.

    Rows share blocks by reference: `batch_repeat_interleave` (samples and beams of one prompt) and `reorder_cache`
    (beam search) move block ids and counts, never K/V. A row writing into a block another row still references
    copies that block first. Pools start empty and grow on demand, up to `max_blocks` (rows told to keep runs of
    blocks, `expected_seq_len`, take their runs' span at once).

    Example
    -------
    >>> cache = PagedCache.from_model(model)
    >>> out = model.generate(ids, past_key_values=cache, num_beams=4)  # `cache=cache` on transformers >= 5.24
    >>> cache.stats().saving
    0.71
    """

    @classmethod
    def from_model(cls, model, **kwargs) -> "PagedCache":
        """A cache with one layer per decoder layer of `model`; kwargs as for the constructor.

        The cache remembers the model's config, so that its first update can refuse a model whose attention would
        not read the block pools (one not enabled with `enable_paged_cache`).
        """
        text_config = model.config.get_text_config(decoder=True)
        cache = cls(num_layers=text_config.num_hidden_layers, **kwargs)
        cache.model_config = text_config
        for layer, window in zip(cache.layers, stock_cache_windows(text_config)):
            layer.set_stock_window(window)
        return cache

    def __init__(self, *, num_layers: int, block_size: int = 16, max_blocks: int | None = None, backend: str = "auto",
                 kv_cache_dtype: str = "auto"):
        """kv_cache_dtype: "auto" keeps K/V in the model's dtype; "int8" / "fp8" (float8 e4m3) store every full block
        quantized, with a scale per block and KV head, and dequantize where attention reads it (not token-identical
        to stock: see the README's compression section)."""
        problem = kv_cache_dtype_problem(kv_cache_dtype)
        if problem:
            raise ValueError(f"PagedCache: {problem}.")
        self.block_size = block_size
        self.backend = backend
        self.kv_cache_dtype = kv_cache_dtype
        # The slots of partial blocks, for a compressing cache (see blocks/partial.py).
        self.partial = PartialBlocks(block_size) if kv_cache_dtype != "auto" else None
        self.model_config = None  # set by `from_model`
        # Tokens per row a call expects at most, set by generate() where rows share nothing (no beams or samples) on
        # the PyTorch path: rows are then placed that far apart in the pool, each keeping a run of blocks that
        # attention reads in place (see BlockTables). The pool then holds max_length tokens per row from the start,
        # as stock's cache does once generation reaches max_length.
        self.expected_seq_len: int | None = None
        self.allocator = BlockAllocator(block_size=block_size, max_blocks=max_blocks)
        self.tables = BlockTables(self.allocator, partial=self.partial)
        self._step: PagedStep | None = None
        self._tables_memo: dict = {}  # what steps derive from the tables array: uploads, layout (see PagedStep.memo)
        self._max_rows = 0
        self._max_seq_len = 0
        self._peak_capacity = 0
        self.prefill_rows: int | None = None
        self._peak_slots = 0
        layer_class = PagedLayer if self.partial is None else CompressedLayer
        super().__init__(layers=[layer_class(self) for _ in range(num_layers)])

    @property
    def current_step(self) -> PagedStep | None:
        """The metadata of the latest forward (its block tables, copy-on-write copies, groups), or None."""
        return self._step

    def step_for(self, layer: PagedLayer, num_rows: int, query_len: int) -> PagedStep:
        """The current forward's step; planned (blocks allocated, copies decided) by its first layer to ask."""
        if layer.num_written == self.tables.seq_len:
            return self._plan(num_rows, query_len)
        if self._step is None or layer.num_written + query_len != self._step.seq_len:
            raise RuntimeError(
                f"PagedCache: a layer holding {layer.num_written} tokens was given {query_len} new ones while the "
                f"cache holds {self.tables.seq_len}; layers of one model must see the same tokens."
            )
        return self._step

    def _plan(self, num_rows: int, query_len: int) -> PagedStep:
        # Every forward, not only a call's first: a cache an earlier call returned may be continued on a model that
        # has been disabled since.
        if self.model_config is not None and not runs_paged_attention(self.model_config):
            raise ValueError(
                f"PagedCache: the model runs {implementation_of(self.model_config)!r} attention, which cannot read "
                f"the cache's block pools. Call `enable_paged_cache(model)` before generating with a PagedCache."
            )
        if self.tables.seq_len == 0:  # a call's first forward
            if self.tables.num_rows != num_rows:
                self._note_peaks()
                self.tables.free()
                self.tables = BlockTables(self.allocator, num_rows=num_rows, partial=self.partial)
            if self.expected_seq_len and self.partial is None:  # compressed rows are never read in place
                self.tables.row_stride = cdiv(self.expected_seq_len, self.block_size)
        if num_rows != self.tables.num_rows:
            raise ValueError(
                f"PagedCache holds {self.tables.num_rows} rows but the forward has {num_rows}; reorder or select rows "
                f"with `reorder_cache` / `batch_select_indices` before changing the batch."
            )
        past_len = self.tables.seq_len
        copies = self.tables.append(query_len)
        self._step = PagedStep(past_len=past_len, query_len=query_len, block_size=self.block_size,
                               tables=self.tables.tables, copies=copies, pool_blocks=self.allocator.capacity,
                               shared=self.tables.shared, memo=self._tables_memo, slots=self.tables.slot_plan)
        return self._step

    def _note_peaks(self) -> None:
        # Rows and length only grow between a call's first step and a select, crop or reset, which note them first.
        self._max_rows = max(self._max_rows, self.tables.num_rows)
        self._max_seq_len = max(self._max_seq_len, self.tables.seq_len)
        self._peak_capacity = max(self._peak_capacity, self.allocator.capacity)
        if self.partial is not None:
            self._peak_slots = max(self._peak_slots, self.partial.capacity)

    # --- what generate() and users call on a Cache -------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tables.seq_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.tables.seq_len + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: new row j continues old row `beam_idx[j]`. Moves block ids, copies no K/V."""
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def select_rows(self, indices: torch.Tensor | np.ndarray) -> None:
        if self.tables.seq_len == 0:  # nothing stored yet: the next forward sets the rows (as stock caches do)
            return
        indices = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        self._note_peaks()
        self.tables.select(indices.astype(np.int64, copy=False))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` rows sharing its blocks (prompt forked to beams / samples)."""
        if self.tables.seq_len == 0:
            return
        self.tables.fork(repeats)

    def fork_rows(self, source_rows: np.ndarray) -> None:
        """New row j shares every block of row `source_rows[j]` (prompts forked to their beams / samples)."""
        if self.tables.seq_len:
            self.tables.fork_rows(np.asarray(source_rows, dtype=np.int64))

    def crop(self, tokens_to_remove: int) -> None:
        """`crop(-n)` forgets the last n tokens of every row; blocks left empty are freed."""
        self._note_peaks()
        reopened = self.tables.crop(length_after_crop(tokens_to_remove, self.tables.seq_len))
        for layer in self.layers:
            layer.num_written = min(layer.num_written, self.tables.seq_len)
            if reopened is not None:
                layer.reopen(*reopened)

    def reset(self) -> None:
        """Forget every row; the pools are kept for reuse."""
        self._note_peaks()
        self.tables.free()
        self._step = None
        for layer in self.layers:
            layer.reset()

    def start_call(self) -> None:
        """A generate() call continues this cache (multi-turn): its figures start from what the cache holds now."""
        self._max_rows, self._max_seq_len = self.tables.num_rows, self.tables.seq_len
        self._peak_capacity = self.allocator.capacity
        self.allocator.peak_used = self.allocator.num_used
        self.prefill_rows = None

    def release(self) -> CacheStats:
        """Free every block and drop the pools (end of a generate() call); returns the call's figures."""
        stats = self.stats()
        self.reset()
        for layer in self.layers:
            layer.release()
        return stats

    def stats(self) -> CacheStats:
        self._note_peaks()
        bytes_per_token = sum(layer.bytes_per_token for layer in self.layers)
        peak_kv_bytes = self.allocator.peak_used * self.block_size * bytes_per_token
        pool_bytes = self._peak_capacity * self.block_size * bytes_per_token
        if self.partial is not None:  # compressed full blocks, scales and partial blocks in the model's dtype
            full, partial = self._block_bytes()
            peak_kv_bytes = self.partial.peak_bytes(full, partial)
            pool_bytes = self._peak_capacity * full + self._peak_slots * partial
        return CacheStats(
            block_size=self.block_size,
            peak_blocks=self.allocator.peak_used,
            peak_kv_bytes=peak_kv_bytes,
            pool_bytes=pool_bytes,
            dense_kv_bytes=self._max_rows * self._max_seq_len * bytes_per_token,
            rows=self._max_rows,
            max_seq_len=self._max_seq_len,
            prefill_rows=self.prefill_rows,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def kv_bytes(self) -> int:
        """Bytes of K/V the blocks in use hold now, summed over layers (what `stats().peak_kv_bytes` peaks at)."""
        in_use = int(self.allocator.num_used)
        if self.partial is None:
            return in_use * self.block_size * sum(layer.bytes_per_token for layer in self.layers)
        full, partial = self._block_bytes()
        return (in_use - self.partial.num_used) * full + self.partial.num_used * partial

    def _block_bytes(self) -> tuple[int, int]:
        """(a full block, a partial block) in bytes over all layers of a compressing cache."""
        storages = [layer.storage for layer in self.layers if layer.storage is not None]
        return sum(s.full_block_bytes for s in storages), sum(s.partial_block_bytes for s in storages)

    @property
    def num_rows(self) -> int:
        return self.tables.num_rows


