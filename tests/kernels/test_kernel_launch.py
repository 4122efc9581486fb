"""How kernels are launched, which the interpreter does not check by itself: under the tensors' device, within CUDA's
grid limits, and with a bounded set of compiled variants per generate() call."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import left_padded_prompts, tiny_model  # noqa: E402

from paged_generate import disable_paged_cache, enable_paged_cache, kernels  # noqa: E402
from paged_generate.kernels import _triton, attention, block_copy, cache_write, shared_prefix, split_reduce  # noqa: E402
from paged_generate.kernels.grouping import group_members  # noqa: E402

KERNELS = {
    "_paged_attention_kernel": attention, "_split_reduce_kernel": split_reduce, "_prefix_kernel": shared_prefix,
    "_suffix_kernel": shared_prefix, "_write_kv_kernel": cache_write, "_copy_blocks_kernel": block_copy,
}
CUDA_GRID_YZ_MAX = 65535


def test_launch_context_is_the_tensors_cuda_device():
    context = _triton.launch_context(torch.device("cuda", 1))
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(_triton.launch_context(torch.device("cpu")), contextlib.nullcontext)


def _record_runs(monkeypatch, record):
    """Call `record(name, args, kwargs, warmup)` on every launch (and warm-up) of every kernel, then run it."""
    for name, module in KERNELS.items():
        kernel = getattr(module, name)
        original = kernel.run

        def run(*args, grid, warmup, _name=name, _run=original, **kwargs):
            record(_name, grid, args, kwargs, warmup)
            return _run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel, "run", run, raising=False)


def test_every_launch_runs_under_its_tensors_device(device, monkeypatch):
    # A layer on cuda:1 while cuda:0 is current must launch on cuda:1 (and its stream): a stand-in context records
    # which device each launch ran under.
    current = []
    seen = {}

    @contextlib.contextmanager
    def fake_context(dev):
        current.append(dev)
        yield
        current.pop()

    monkeypatch.setattr(_triton, "launch_context", fake_context)
    _record_runs(monkeypatch, lambda name, grid, args, kwargs, warmup: seen.setdefault(name, list(current)))
    torch.manual_seed(0)
    pool = [torch.randn(6, 16, 2, 32, device=device) for _ in range(2)]
    rows = 3
    query = torch.randn(rows, 4, 1, 32, device=device)
    seq_lens = torch.full((rows,), 70, dtype=torch.int32, device=device)
    tables = torch.randint(0, 6, (rows, 5), dtype=torch.int32, device=device)
    kernels.launch_write_kv(query[:, :2, 0], query[:, :2, 0], *pool, torch.arange(rows, device=device))
    kernels.launch_copy_blocks(*pool, torch.tensor([0], device=device), torch.tensor([5], device=device))
    kernels.launch_paged_attention(query, *pool, tables, seq_lens, scale=0.1, num_splits=2)
    row_group = torch.tensor([0, 0, 1], device=device)
    kernels.launch_shared_prefix_paged_attention(
        query, *pool, row_group=row_group, prefix_tables=tables[:2, :2],
        prefix_len=torch.tensor([32, 32], device=device), suffix_tables=tables[:, 2:], seq_lens=seq_lens, scale=0.1,
        members=group_members(row_group, 2, 2))
    assert set(seen) == set(KERNELS)
    for name, devices in seen.items():
        assert devices and devices[-1] == query.device, (name, devices)


def test_prefix_grid_stays_within_cuda_limits():
    # 2,048 prompts x 2 samples x 32 kv heads: 131,072 (group, kv head) pairs, twice CUDA's grid y limit.
    grid = shared_prefix.prefix_grid(m_tiles=2, num_groups=4096, num_kv_heads=32, num_splits=8)
    assert grid == (2 * 4096 * 32, 8)
    assert grid[0] < 2**31 and all(n <= CUDA_GRID_YZ_MAX for n in grid[1:])


def test_folded_prefix_launch_covers_every_tile_group_and_head(device):
    # Several query tiles (a 20-member group at 4 q heads per kv head takes two 64-row tiles), groups and kv heads in
    # one folded axis: every program must find its own (tile, group, head).
    from test_kernel_shared_prefix import make_case, run_and_check

    case = make_case([20, 3, 9], [2, 1, 3], [1 + i % 7 for i in range(32)], device=device, group=4, num_kv_heads=2)
    run_and_check(case, num_splits=2)


# --- compiled variants per call --------------------------------------------------------------------------------------
def _specialization_key(name, args, kwargs):
    """The cache key Triton's launcher computes for these arguments (types, 16-divisibility, ints equal to 1, the
    constexprs and options), with the kernel's `do_not_specialize` honoured."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = getattr(KERNELS[name], name)
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)  # interpreted
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, options = binder(*args, **kwargs)
    return name, str(specialization), str(sorted(options.items()))


def _variants(model, device, monkeypatch, **generate_kwargs):
    """{kernel: [specialisation keys in first-use order]} of one generate() call, and the number of forwards before
    the last new key appeared."""
    keys, forwards = {}, []
    split_reduce._warmed.clear()  # warm-ups are once per process; count this call's

    def record(name, grid, args, kwargs, warmup):
        key = _specialization_key(name, args, kwargs)
        if key not in keys.setdefault(name, []):
            keys[name].append(key)
            forwards.append(len(calls))

    calls = []
    _record_runs(monkeypatch, record)
    ids, mask = left_padded_prompts((100, 90))
    enable_paged_cache(model, backend="triton", block_size=8)
    try:
        original = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=0, **generate_kwargs)
    finally:
        disable_paged_cache(model)
    return keys, max(forwards)


@pytest.mark.parametrize("decoding", [dict(), dict(num_beams=2, num_return_sequences=2)], ids=["greedy", "beams"])
def test_compiled_variants_do_not_grow_with_the_steps(device, monkeypatch, decoding):
    # Over 40 steps the block tables widen from 13 to 18 blocks of 8 (a row stride of 16 on the way, which Triton
    # would specialise on) and decode crosses the KV-split threshold (lowered here to switch at 120 keys): neither may
    # add a compiled variant after the first decode step, nor may the longer call have more than a 3-step one.
    monkeypatch.setattr(attention, "MIN_KEYS_PER_SPLIT", 60)
    model = tiny_model("llama").to(device)
    short, _ = _variants(model, device, monkeypatch, max_new_tokens=3, **decoding)
    long, last_new = _variants(model, device, monkeypatch, max_new_tokens=40, **decoding)
    assert {k: len(v) for k, v in long.items()} == {k: len(v) for k, v in short.items()}, (short, long)
    assert long == short
    assert last_new <= 2, "a compiled variant first appeared after the first decode step"
    assert len(long["_paged_attention_kernel"]) <= 2  # the prompt step and the decode step
