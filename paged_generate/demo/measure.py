"""Run one `generate()` call stock and paged and measure both: time, KV memory per decoding step, process memory.

The KV figures come from the caches themselves: a forward hook on the model reads the cache object generate() passes
to each forward (stock: the bytes of a `DynamicCache`'s K/V tensors; paged: blocks in use x bytes per block, and the
dense equivalent rows x length x bytes per token).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..cache import PagedCache
from ..enable import cache_stats, disable_paged_cache, enable_paged_cache
from ..patches.compat import CACHE_KWARG
from ..stats import CacheStats, stock_cache_stats

__all__ = [
    "GenerateRun",
    "KVTrace",
    "MemoryProbe",
    "compare",
    "generate_kwargs",
    "kv_snapshot",
    "mode_label",
    "run_generate",
]

MODES = ("beam", "sample")


def mode_label(mode: str, width: int) -> str:
    return {"beam": f"beam search, {width} beams", "sample": f"sampling, {width} samples"}[mode]


def generate_kwargs(mode: str, width: int, new_tokens: int, pad_token_id: int | None) -> dict:
    """`min_new_tokens = max_new_tokens`: EOS cannot end a run early, so both runs do the same work."""
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id)
    if mode == "beam":
        return dict(common, num_beams=width, num_return_sequences=1, do_sample=False)
    if mode == "sample":
        return dict(common, do_sample=True, num_return_sequences=width, temperature=0.8, top_k=50)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# --- KV memory, read off the cache object each forward receives --------------------------------------------------
def kv_snapshot(cache) -> dict | None:
    """KV memory of a cache right now. Paged: blocks in use, the pools' size, and the dense equivalent."""
    if cache is None:
        return None
    if isinstance(cache, PagedCache):
        bytes_per_token = sum(layer.bytes_per_token for layer in cache.layers)
        rows, seq_len = cache.tables.num_rows, cache.tables.seq_len
        return dict(
            kind="paged", rows=rows, seq_len=seq_len, blocks_in_use=int(cache.allocator.num_used),
            kv_bytes=cache.kv_bytes(), pool_bytes=cache.stats().pool_bytes,
            dense_bytes=rows * seq_len * bytes_per_token, kv_cache_dtype=cache.kv_cache_dtype,
        )
    stats = stock_cache_stats(cache, block_size=0)
    if not stats.rows:
        return None
    return dict(kind="stock", rows=stats.rows, seq_len=stats.max_seq_len, kv_bytes=stats.peak_kv_bytes,
                pool_bytes=stats.peak_kv_bytes, dense_bytes=stats.peak_kv_bytes)


def _cache_of(kwargs: dict):
    for name in (CACHE_KWARG, "cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class KVTrace:
    """Forward hook: after every forward of `model`, record `kv_snapshot` of the cache it was given.

    >>> with KVTrace(model) as trace:
    ...     model.generate(ids, num_beams=4, max_new_tokens=16)
    >>> [step["kv_bytes"] for step in trace.steps]
    """

    def __init__(self, model, on_step=None):
        self.model, self.on_step, self.steps, self._handle = model, on_step, [], None

    def __enter__(self) -> "KVTrace":
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        snapshot = kv_snapshot(_cache_of(kwargs))
        if snapshot is not None:
            self.steps.append(snapshot)
        if self.on_step is not None:
            self.on_step()

    @property
    def peak_kv_bytes(self) -> int:
        return max((step["kv_bytes"] for step in self.steps), default=0)


# --- process memory --------------------------------------------------------------------------------------------
def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_trim()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    """Resident bytes of this process now (Linux /proc; psutil elsewhere if installed); None when unknown."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return None


class MemoryProbe:
    """Memory a block of code added to the process at its peak.

    CPU: resident memory sampled every `interval` s on a thread, peak minus the value just before (after a garbage
    collection and glibc's malloc_trim, so memory freed by an earlier run is handed back first). CUDA: the peak of
    `torch.cuda.max_memory_allocated` minus the allocation before. `growth_bytes` is None where neither works.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.001):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.interval, self.before, self.peak = interval, None, None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "MemoryProbe":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        self.before = self.peak = current_rss()
        if self.before is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss() or 0)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss() or 0)

    @property
    def growth_bytes(self) -> int | None:
        return None if self.before is None or self.peak is None else max(0, self.peak - self.before)


# --- one call, stock or paged -----------------------------------------------------------------------------------
@dataclass
class GenerateRun:
    run: str  # "stock" or "paged"
    seconds: float
    sequences: torch.Tensor
    texts: list[str]
    kv_peak_bytes: int
    memory_growth_bytes: int | None
    memory_kind: str
    trace: list[dict] = field(default_factory=list)
    stats: CacheStats | None = None

    def as_dict(self, with_trace: bool = True) -> dict:
        result = dict(
            seconds=self.seconds, kv_peak_bytes=self.kv_peak_bytes, memory_growth_bytes=self.memory_growth_bytes,
            memory_kind=self.memory_kind, texts=self.texts,
        )
        if self.stats is not None:
            result["stats"] = self.stats.as_dict()
        if with_trace:
            result["kv_trace"] = self.trace
        return result


def run_generate(model, tokenizer, inputs: dict, *, paged: bool, seed: int = 0, block_size: int | str = "auto",
                 progress=None, kv_cache_dtype: str = "auto", **kwargs) -> GenerateRun:
    """One `model.generate(**inputs, **kwargs)`, stock or paged (blocks stored as `kv_cache_dtype`), measured; leaves
    the model stock.

    progress: a tqdm-like object whose `update(1)` is called after every forward, or None.
    """
    if paged:
        # The demo shows the blocks: every call paged, also those too short for paging to pay in time.
        enable_paged_cache(model, block_size=block_size, kv_cache_dtype=kv_cache_dtype, min_shared_tokens=0)
    else:
        disable_paged_cache(model)
    device = inputs["input_ids"].device
    trace = KVTrace(model, on_step=(lambda: progress.update(1)) if progress is not None else None)
    try:
        torch.manual_seed(seed)
        with torch.no_grad(), trace, MemoryProbe(device) as memory:
            start = time.perf_counter()
            sequences = model.generate(**inputs, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        stats = cache_stats(model) if paged else None
    finally:
        disable_paged_cache(model)
    prompt_width = inputs["input_ids"].shape[1]
    texts = tokenizer.batch_decode(sequences[:, prompt_width:], skip_special_tokens=True)
    return GenerateRun(
        run="paged" if paged else "stock", seconds=seconds, sequences=sequences.cpu(), texts=texts,
        kv_peak_bytes=stats.peak_kv_bytes if stats is not None else trace.peak_kv_bytes,
        memory_growth_bytes=memory.growth_bytes, memory_kind=memory.kind, trace=trace.steps, stats=stats,
    )


def compare(model, tokenizer, prompts, *, mode: str, width: int, new_tokens: int, seed: int = 0,
            block_size: int | str = "auto", progress: bool | None = False, kv_cache_dtype: str = "auto") -> dict:
    """The same generate() call stock, then paged; both measured. Returns a dict (see `paged-generate demo --json`).

    progress: show a tqdm bar per run (None: only on a terminal, tqdm's rule). kv_cache_dtype: how the paged run
    stores full blocks ("int8" / "fp8" are lossy: `same_token_share` says how many tokens still equal stock's).
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    inputs = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    kwargs = generate_kwargs(mode, width, new_tokens, tokenizer.pad_token_id)
    runs = {}
    for run in ("stock", "paged"):
        with tqdm(total=new_tokens, desc=f"{mode_label(mode, width)} - {run}", unit="step", leave=False,
                  disable=progress if progress is None else not progress) as bar:
            runs[run] = run_generate(model, tokenizer, dict(inputs), paged=run == "paged", seed=seed,
                                     block_size=block_size, progress=bar, kv_cache_dtype=kv_cache_dtype, **kwargs)
    stock, paged = runs["stock"], runs["paged"]
    same_shape = stock.sequences.shape == paged.sequences.shape
    return dict(
        mode=mode, label=mode_label(mode, width), width=width, prompts=len(prompts), new_tokens=new_tokens,
        rows=paged.stats.rows, identical=bool(torch.equal(stock.sequences, paged.sequences)),
        same_token_share=(stock.sequences == paged.sequences).float().mean().item() if same_shape else 0.0,
        kv_cache_dtype=kv_cache_dtype, stock=stock, paged=paged,
    )
