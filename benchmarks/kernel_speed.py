"""GPU micro-benchmarks of the Triton attention kernels (CUDA only).

    python benchmarks/kernel_speed.py [--check] [--peak-bw BYTES_PER_S] [--reps 50] [--quick] [--budget-s S]
                                      [--kv-cache-dtype int8|fp8] [--out benchmarks/results/kernel_speed.json]

1. Decode: `paged_attention` for 1/4/16/64 rows x 512/2k/8k/32k tokens per row (GQA 32 q-heads / 8 kv-heads,
   head_dim 128, bf16, block_size 16, randperm block tables). Reports the achieved bandwidth (bytes of K/V read /
   time) as a fraction of the device's peak HBM bandwidth, and the speedup over
   `torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)` on the same K/V held contiguous.
   Goals: >= 80% of peak for long rows; >= 1.0x vs SDPA. Shapes whose pool and contiguous copy do not fit in 60%
   of the free GPU memory are skipped.
2. Shared prefix: 8/16/32/64 rows sharing a 2k/8k/32k prompt, each with 128 own tokens:
   `shared_prefix_paged_attention` vs plain `paged_attention` over the same rows (each row's table = shared blocks +
   own blocks). Reports the speedup (goal >= 4x) and the "logical bandwidth": bytes the unshared computation reads
   / time.
3. Shared-prefix threshold: 8/16/32/64 rows sharing a 128-token to 32k-token prompt (powers of two), shared-prefix vs
   plain: the prompt length from which shared-prefix attention pays (speedup >= 1 there and at every longer prompt),
   per row count, and their maximum, `shared_prefix_min_prompt`: below it the dispatch should take the plain kernel.
4. With `--kv-cache-dtype int8` (or fp8): decode on compressed blocks (1-64 rows x 8k/32k tokens, every full block
   int8 / fp8 with a scale per block and kv head, dequantized in registers) vs the same rows in bf16 blocks. Reads
   about half the bytes; goal >= 1.6x faster than bf16 for rows of 8k+ tokens.

Times are GPU times: CUDA events around one call, median of `--reps` (after warmup), with L2 flushed before each rep
(so K/V comes from HBM) and the GPU kept busy while the host enqueues the call (so Python and launch overheads are
not counted). `--check` first asserts, on one small case each, that both kernels match their PyTorch references
(the kernel tests' rule: error vs a float64 reference at most 2x the reference's own error in bf16).
`--quick` runs fewer shapes (for scripts/gpu_check.py) and `--budget-s` stops starting new shapes after that many
seconds. Prints markdown tables and writes JSON. Without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_utils import RESULTS_DIR, write_json

try:
    import paged_generate  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_generate import kernels  # imports no Triton until a kernel is used
from paged_generate.blocks import cdiv

DEFAULT_OUT = RESULTS_DIR / "kernel_speed.json"
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DECODE_ROWS, DECODE_TOKENS = (1, 4, 16, 64), (512, 2048, 8192, 32768)
SHARED_ROWS, SHARED_PROMPTS, OWN_TOKENS = (8, 16, 32, 64), (2048, 8192, 32768), 128
THRESHOLD_PROMPTS = tuple(128 << i for i in range(9))  # 128 ... 32768
QUICK = dict(decode_rows=(1, 16, 64), decode_tokens=(2048, 32768), shared_rows=(8, 64), shared_prompts=(8192,),
             threshold_rows=(8, 32, 64), threshold_prompts=(128, 512, 2048, 8192, 32768))
MEMORY_FRACTION = 0.6  # of the free GPU memory a shape may use
LONG_ROW_TOKENS = 8192  # "long rows" for the bandwidth goal
GOALS = {"decode_peak_fraction": 0.8, "decode_vs_sdpa": 1.0, "shared_speedup": 4.0, "compressed_vs_bf16": 1.6}
COMPRESSED_ROWS, COMPRESSED_TOKENS = (1, 4, 16, 64), (8192, 32768)
QUANTIZE_CHUNK_BLOCKS = 4096  # blocks quantized at once when building a compressed pool (bounds the fp32 temporary)
# Peak HBM bandwidth by device name, bytes/s: the first entry whose words all appear in the name wins.
PEAK_HBM_BW = (
    (("H200",), 4.8e12),
    (("H100", "PCIE"), 2.0e12),
    (("H100", "NVL"), 3.9e12),
    (("H100",), 3.35e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (("A100", "80GB"), 2.0e12),
)
L2_FLUSH_BYTES = 256 * 2**20
HOST_COVER_CYCLES = 2_000_000  # ~1 ms of GPU spinning while the host enqueues one call


# --- device --------------------------------------------------------------------------------------------------------
def peak_bandwidth(device_name: str, override: float | None) -> float | None:
    """Peak HBM bytes/s: `override` if given, else looked up from the name; None when unknown."""
    if override:
        return override
    name = device_name.upper()
    return next((bw for words, bw in PEAK_HBM_BW if all(w in name for w in words)), None)


def kv_bytes(rows: int, tokens: int) -> int:
    """Bytes of K and V for `tokens` tokens in each of `rows` rows."""
    return 2 * rows * tokens * NUM_KV_HEADS * HEAD_DIM * torch.finfo(DTYPE).bits // 8


def fits(needed: int, device="cuda") -> bool:
    if torch.device(device).type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return needed <= MEMORY_FRACTION * free


# --- inputs --------------------------------------------------------------------------------------------------------
def make_pool(num_blocks: int, device, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return tuple(torch.randn(shape, generator=generator, device=device, dtype=DTYPE) for _ in range(2))


def make_query(rows: int, device, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(rows, NUM_Q_HEADS, 1, HEAD_DIM, generator=generator, device=device, dtype=DTYPE)


def decode_case(rows: int, tokens: int, device) -> dict:
    """A pool holding `rows` rows of `tokens` tokens each, in randomly permuted blocks."""
    blocks_per_row = cdiv(tokens, BLOCK_SIZE)
    key_cache, value_cache = make_pool(rows * blocks_per_row, device)
    generator = torch.Generator(device=device).manual_seed(2)
    perm = torch.randperm(rows * blocks_per_row, generator=generator, device=device)
    return dict(query=make_query(rows, device), key_cache=key_cache, value_cache=value_cache,
                block_tables=perm.view(rows, blocks_per_row).to(torch.int32),
                seq_lens=torch.full((rows,), tokens, dtype=torch.int32, device=device))  # fmt: skip


def contiguous_kv(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' K and V as SDPA takes them, [rows, kv_heads, tokens, head_dim], gathered one row at a time."""
    rows, tokens = case["block_tables"].shape[0], int(case["seq_lens"][0])
    out = []
    for pool in (case["key_cache"], case["value_cache"]):
        dense = torch.empty(rows, NUM_KV_HEADS, tokens, HEAD_DIM, dtype=pool.dtype, device=pool.device)
        for r in range(rows):
            dense[r] = pool[case["block_tables"][r].long()].flatten(0, 1)[:tokens].transpose(0, 1)
        out.append(dense)
    return out[0], out[1]


def shared_case(rows: int, prompt: int, own: int, device) -> dict:
    """`rows` rows (one group) sharing `prompt` tokens, each with `own` more tokens, in randomly permuted blocks."""
    prefix_blocks, own_blocks = prompt // BLOCK_SIZE, cdiv(own, BLOCK_SIZE)
    key_cache, value_cache = make_pool(prefix_blocks + rows * own_blocks, device)
    generator = torch.Generator(device=device).manual_seed(3)
    perm = torch.randperm(prefix_blocks + rows * own_blocks, generator=generator, device=device)
    row_group = torch.zeros(rows, dtype=torch.int64, device=device)
    grouping = dict(row_group=row_group, prefix_tables=perm[None, :prefix_blocks].to(torch.int32),
                    prefix_len=torch.tensor([prefix_blocks * BLOCK_SIZE], dtype=torch.int32, device=device),
                    suffix_tables=perm[prefix_blocks:].view(rows, own_blocks).to(torch.int32),
                    seq_lens=torch.full((rows,), prompt + own, dtype=torch.int32, device=device))  # fmt: skip
    # What generate() holds per step and hands every layer: built once, outside the timed call.
    members = kernels.group_members(row_group, 1, max_group_size=rows)
    full_tables = kernels.full_block_tables(**{k: grouping[k] for k in ("row_group", "prefix_tables", "prefix_len",
                                                                        "suffix_tables", "seq_lens")},
                                            block_size=BLOCK_SIZE)  # fmt: skip
    return dict(query=make_query(rows, device), key_cache=key_cache, value_cache=value_cache, members=members,
                full_tables=full_tables, **grouping)  # fmt: skip


def compressed_case(case: dict, kv_cache_dtype: str, tables_key: str = "block_tables") -> dict:
    """`case` with its pools stored as a compressing PagedCache stores them: every block int8 / fp8 with a scale per
    (block, kv head) (`paged_generate.quantize`), and each row's partial last block, if any, also in bf16 in a side
    pool at `partial_slots[row]` (the kernels read it from there)."""
    from paged_generate.quantize import quantize_blocks

    out = dict(case)
    for name in ("key", "value"):
        pool = case[f"{name}_cache"]
        parts = [quantize_blocks(chunk, kv_cache_dtype) for chunk in pool.split(QUANTIZE_CHUNK_BLOCKS)]
        out[f"{name}_cache"] = torch.cat([q for q, _ in parts])
        out[f"{name}_scales"] = torch.cat([scales for _, scales in parts])
    tables, seq_lens = case[tables_key], case["seq_lens"].tolist()
    partial_rows = [row for row, length in enumerate(seq_lens) if length % BLOCK_SIZE]
    last = [int(tables[row, seq_lens[row] // BLOCK_SIZE]) for row in partial_rows] or [0]
    slots = torch.full((len(seq_lens),), -1, dtype=torch.int32)
    slots[partial_rows] = torch.arange(len(partial_rows), dtype=torch.int32)
    for name in ("key", "value"):
        out[f"partial_{name}_cache"] = case[f"{name}_cache"][torch.tensor(last)].clone()
    out["partial_slots"] = slots.to(case["seq_lens"].device)
    return out


def compressed_args(case: dict) -> dict:
    return {k: case[k] for k in ("key_scales", "value_scales", "partial_key_cache", "partial_value_cache",
                                 "partial_slots")}


# --- the calls being timed -----------------------------------------------------------------------------------------
SCALE = HEAD_DIM**-0.5


def run_paged(case: dict, tables_key: str = "block_tables", **options) -> torch.Tensor:
    return kernels.paged_attention(case["query"], case["key_cache"], case["value_cache"], case[tables_key],
                                   case["seq_lens"], scale=SCALE, **options)  # fmt: skip


def run_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=SCALE, enable_gqa=True)


def run_shared(case: dict, **options) -> torch.Tensor:
    grouping = {k: case[k] for k in ("row_group", "prefix_tables", "prefix_len", "suffix_tables", "seq_lens")}
    return kernels.shared_prefix_paged_attention(case["query"], case["key_cache"], case["value_cache"], **grouping,
                                                 scale=SCALE, members=case["members"], **options)  # fmt: skip


# --- --check -------------------------------------------------------------------------------------------------------
def assert_matches(name: str, out: torch.Tensor, reference, query: torch.Tensor) -> float:
    """The kernel tests' rule: error vs a float64 reference <= 2x the reference's own error in the low dtype."""
    truth = reference(query.double()).double()
    low = reference(query).double()
    err = (out.double() - truth).abs().max().item()
    ref_err = (low - truth).abs().max().item()
    if not (torch.isfinite(out).all() and err <= 2 * ref_err + 1e-6):
        raise SystemExit(f"--check failed: {name} error {err:.3g} vs reference-in-{query.dtype} error {ref_err:.3g}")
    return err


def check_kernels(device) -> dict:
    """One small decode and one small shared-prefix case (ragged lengths, two groups) against the references."""
    case = decode_case(4, 160, device)
    case["seq_lens"] = torch.tensor([160, 1, 17, 100], dtype=torch.int32, device=device)
    errors = {}
    for splits in (1, 4):
        reference = lambda q: kernels.paged_attention_reference(  # noqa: E731
            q, case["key_cache"], case["value_cache"], case["block_tables"], case["seq_lens"], scale=SCALE)
        errors[f"paged_attention splits={splits}"] = assert_matches(
            "paged_attention", run_paged(case, num_splits=splits), reference, case["query"])

    shared = shared_case(6, 64, 40, device)
    shared["row_group"] = torch.tensor([1, 0, 1, 1, 0, 1], device=device)  # two interleaved groups
    shared["prefix_tables"] = torch.cat([shared["prefix_tables"], shared["prefix_tables"].flip(1)])
    shared["prefix_len"] = torch.tensor([64, 32], dtype=torch.int32, device=device)
    # Own tokens (at most 3 blocks here): 48, 1, 40, 32, 0 (the query is the prefix's last token), 1.
    shared["seq_lens"] = torch.tensor([80, 65, 72, 64, 64, 33], dtype=torch.int32, device=device)
    shared["members"] = kernels.group_members(shared["row_group"], 2)
    grouping = {k: shared[k] for k in ("row_group", "prefix_tables", "prefix_len", "suffix_tables", "seq_lens")}
    shared["full_tables"] = kernels.full_block_tables(**grouping, block_size=BLOCK_SIZE)
    reference = lambda q: kernels.shared_prefix_paged_attention_reference(  # noqa: E731
        q, shared["key_cache"], shared["value_cache"], **grouping, scale=SCALE)
    for splits in ((None, None), (3, 2)):
        out = run_shared(shared, num_splits=splits[0], suffix_splits=splits[1])
        errors[f"shared_prefix splits={splits}"] = assert_matches("shared_prefix_paged_attention", out, reference,
                                                                  shared["query"])  # fmt: skip
    # The unshared baseline of the shared-prefix benchmark: paged_attention over the full tables.
    errors["paged_attention full tables"] = assert_matches("paged_attention (full tables)",
                                                           run_paged(shared, "full_tables"), reference,
                                                           shared["query"])  # fmt: skip
    return errors


def check_compressed(device, kv_cache_dtype: str) -> dict:
    """The check of `check_kernels` on compressed blocks (ragged lengths: rows with and without a partial block),
    against the references reading the same storage (dequantize, then attend)."""
    case = decode_case(4, 160, device)
    case["seq_lens"] = torch.tensor([160, 1, 17, 100], dtype=torch.int32, device=device)
    case = compressed_case(case, kv_cache_dtype)
    quantized, errors = compressed_args(case), {}
    for splits in (1, 4):
        reference = lambda q: kernels.paged_attention_reference(  # noqa: E731
            q, case["key_cache"], case["value_cache"], case["block_tables"], case["seq_lens"], scale=SCALE,
            **quantized)
        errors[f"paged_attention {kv_cache_dtype} splits={splits}"] = assert_matches(
            "paged_attention (compressed)", run_paged(case, num_splits=splits, **quantized), reference, case["query"])
    shared = shared_case(6, 64, 40, device)
    shared["seq_lens"] = torch.tensor([104, 65, 72, 64, 80, 97], dtype=torch.int32, device=device)
    shared = compressed_case(shared, kv_cache_dtype, tables_key="full_tables")
    quantized = compressed_args(shared)
    grouping = {k: shared[k] for k in ("row_group", "prefix_tables", "prefix_len", "suffix_tables", "seq_lens")}
    reference = lambda q: kernels.shared_prefix_paged_attention_reference(  # noqa: E731
        q, shared["key_cache"], shared["value_cache"], **grouping, scale=SCALE, **quantized)
    errors[f"shared_prefix {kv_cache_dtype}"] = assert_matches("shared_prefix_paged_attention (compressed)",
                                                               run_shared(shared, **quantized), reference,
                                                               shared["query"])  # fmt: skip
    return errors


# --- timing --------------------------------------------------------------------------------------------------------
def gpu_time(fn, reps: int, warmup: int = 5) -> float:
    """Median GPU seconds of `fn()` over `reps` runs, each from a cold L2 and with the host overhead hidden."""
    for _ in range(warmup):
        fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    sleep = getattr(torch.cuda, "_sleep", None)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.zero_()
        if sleep is not None:
            sleep(HOST_COVER_CYCLES)  # the GPU spins while the host enqueues the call
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


# --- benchmarks ----------------------------------------------------------------------------------------------------
def wall_time(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()`: the CPU stand-in for `gpu_time` (scripts/gpu_check.py --dry-run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timer(device):
    return gpu_time if torch.device(device).type == "cuda" else wall_time


def bench_decode(rows: int, tokens: int, peak: float | None, reps: int, device="cuda") -> dict | None:
    read = kv_bytes(rows, tokens)
    if not fits(2 * read + (512 << 20), device):  # the pool, its contiguous copy for SDPA, the L2 flush buffer, slack
        return None
    case = decode_case(rows, tokens, device)
    paged_s = timer(device)(lambda: run_paged(case), reps)
    key, value = contiguous_kv(case)
    sdpa_s = timer(device)(lambda: run_sdpa(case["query"], key, value), reps)
    bandwidth = read / paged_s
    return dict(rows=rows, tokens=tokens, kv_bytes=read, paged_s=paged_s, bandwidth=bandwidth,
                peak_fraction=bandwidth / peak if peak else None, sdpa_s=sdpa_s, vs_sdpa=sdpa_s / paged_s)  # fmt: skip


def bench_shared(rows: int, prompt: int, peak: float | None, reps: int, device="cuda",
                 own: int = OWN_TOKENS) -> dict | None:
    logical = kv_bytes(rows, prompt + own)  # what the unshared computation reads
    if not fits(kv_bytes(1, prompt) + kv_bytes(rows, own) + (512 << 20), device):
        return None
    case = shared_case(rows, prompt, own, device)
    shared_s = timer(device)(lambda: run_shared(case), reps)
    paged_s = timer(device)(lambda: run_paged(case, "full_tables"), reps)
    bandwidth = logical / shared_s
    return dict(rows=rows, prompt=prompt, own=own, logical_bytes=logical, shared_s=shared_s, paged_s=paged_s,
                speedup=paged_s / shared_s, logical_bandwidth=bandwidth,
                logical_peak_fraction=bandwidth / peak if peak else None)  # fmt: skip


def bench_compressed(rows: int, tokens: int, kv_cache_dtype: str, peak: float | None, reps: int,
                     device="cuda") -> dict | None:
    bf16 = kv_bytes(rows, tokens)
    read = bf16 // 2 + 2 * rows * cdiv(tokens, BLOCK_SIZE) * NUM_KV_HEADS * 4  # 1-byte K/V and fp32 scales
    if not fits(bf16 + read + (512 << 20), device):  # both pools, the L2 flush buffer, slack
        return None
    case = decode_case(rows, tokens, device)
    bf16_s = timer(device)(lambda: run_paged(case), reps)
    compressed = compressed_case(case, kv_cache_dtype)
    quantized = compressed_args(compressed)
    compressed_s = timer(device)(lambda: run_paged(compressed, **quantized), reps)
    bandwidth = read / compressed_s
    return dict(rows=rows, tokens=tokens, kv_cache_dtype=kv_cache_dtype, kv_bytes=read, bf16_s=bf16_s,
                compressed_s=compressed_s, speedup=bf16_s / compressed_s, bandwidth=bandwidth,
                peak_fraction=bandwidth / peak if peak else None)  # fmt: skip


def run_all(bench, grid, peak, reps, device="cuda", deadline: float | None = None, **options) -> list[dict]:
    results = []
    for args in grid:
        if deadline is not None and time.monotonic() > deadline:
            print(f"skipped {bench.__name__}{args} and later shapes: out of time")
            break
        result = bench(*args, peak, reps, device, **options)
        if result is None:
            print(f"skipped {bench.__name__}{args}: does not fit in {MEMORY_FRACTION:.0%} of free GPU memory")
        else:
            results.append(result)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return results


def shared_prefix_threshold(results: list[dict]) -> dict:
    """Per row count, the shortest measured prompt from which shared-prefix attention is at least as fast as plain
    paged attention at that prompt and every longer one (None: never); `shared_prefix_min_prompt` is the largest of
    them (the prompt length below which shared-prefix attention stops paying, for any of these row counts)."""
    per_rows = {}
    for rows in sorted({r["rows"] for r in results}):
        measured = sorted((r["prompt"], r["speedup"]) for r in results if r["rows"] == rows)
        threshold = None
        for prompt, _ in reversed(measured):
            if all(speedup >= 1.0 for p, speedup in measured if p >= prompt):
                threshold = prompt
        per_rows[rows] = threshold
    known = [t for t in per_rows.values() if t is not None]
    overall = max(known) if known and len(known) == len(per_rows) else None
    return {"per_rows": per_rows, "shared_prefix_min_prompt": overall}


# --- report --------------------------------------------------------------------------------------------------------
def percent(x: float | None) -> str:
    return f"{x:.0%}" if x is not None else "n/a"


def decode_table(results: list[dict]) -> str:
    lines = ["| rows | tokens/row | KV read | paged_attention µs | GB/s | of peak | SDPA µs | SDPA / paged |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['rows']} | {r['tokens']} | {r['kv_bytes'] / 2**20:.0f} MiB | {r['paged_s'] * 1e6:.1f} | "
                     f"{r['bandwidth'] / 1e9:.0f} | {percent(r['peak_fraction'])} | {r['sdpa_s'] * 1e6:.1f} | "
                     f"{r['vs_sdpa']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def shared_table(results: list[dict]) -> str:
    lines = ["| rows | shared prompt | own tokens | shared_prefix µs | paged_attention µs | paged / shared | "
             "logical GB/s | logical / peak |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['rows']} | {r['prompt']} | {r['own']} | {r['shared_s'] * 1e6:.1f} | "
                     f"{r['paged_s'] * 1e6:.1f} | {r['speedup']:.2f}x | {r['logical_bandwidth'] / 1e9:.0f} | "
                     f"{percent(r['logical_peak_fraction'])} |")  # fmt: skip
    return "\n".join(lines)


def compressed_table(results: list[dict]) -> str:
    lines = ["| rows | tokens/row | storage | KV read | bf16 µs | compressed µs | bf16 / compressed | GB/s | of peak |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['rows']} | {r['tokens']} | {r['kv_cache_dtype']} | {r['kv_bytes'] / 2**20:.0f} MiB | "
                     f"{r['bf16_s'] * 1e6:.1f} | {r['compressed_s'] * 1e6:.1f} | {r['speedup']:.2f}x | "
                     f"{r['bandwidth'] / 1e9:.0f} | {percent(r['peak_fraction'])} |")  # fmt: skip
    return "\n".join(lines)


def goals(decode: list[dict], shared: list[dict], compressed: list[dict] | None = None) -> dict:
    long_rows = [r for r in decode if r["tokens"] >= LONG_ROW_TOKENS]
    fractions = [r["peak_fraction"] for r in long_rows if r["peak_fraction"] is not None]
    summary = {
        "decode: min fraction of peak, rows >= 8k tokens (goal >= 80%)": min(fractions) if fractions else None,
        "decode: min SDPA / paged (goal >= 1.0x)": min((r["vs_sdpa"] for r in decode), default=None),
        "shared prefix: min paged / shared (goal >= 4x)": min((r["speedup"] for r in shared), default=None),
    }
    if compressed is not None:
        long_rows = [r["speedup"] for r in compressed if r["tokens"] >= LONG_ROW_TOKENS]
        summary["compressed decode: min bf16 / compressed, rows >= 8k tokens (goal >= 1.6x)"] = min(
            long_rows, default=None)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="assert the kernels match the references first")
    parser.add_argument("--peak-bw", type=float, default=None, help="peak HBM bytes/s (default: from the device name)")
    parser.add_argument("--reps", type=int, default=50, help="timed runs per measurement (median; >= 20)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (scripts/gpu_check.py)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new shape after this many seconds")
    parser.add_argument("--kv-cache-dtype", choices=("int8", "fp8"), default=None,
                        help="also time decode on compressed blocks against bf16 blocks")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    if args.reps < 20:
        parser.error("--reps must be >= 20")
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA device (none found): nothing to measure.")
        return 0
    if not kernels.triton_available() or kernels.is_interpreting():
        print("benchmarks/kernel_speed.py needs Triton compiling for the GPU (Triton missing, or TRITON_INTERPRET is set).")
        return 1

    device_name = torch.cuda.get_device_name()
    peak = peak_bandwidth(device_name, args.peak_bw)
    import triton

    print(f"# Triton kernels on {device_name}: peak HBM {peak / 1e12:.2f} TB/s" if peak else
          f"# Triton kernels on {device_name}: peak HBM unknown (pass --peak-bw)")  # fmt: skip
    print(f"torch {torch.__version__}, triton {triton.__version__}; GQA {NUM_Q_HEADS}/{NUM_KV_HEADS} heads, head_dim "
          f"{HEAD_DIM}, {str(DTYPE).replace('torch.', '')}, block_size {BLOCK_SIZE}; GPU time, median of {args.reps}\n")
    check = None
    if args.check:
        check = check_kernels("cuda")
        if args.kv_cache_dtype:
            check.update(check_compressed("cuda", args.kv_cache_dtype))
        print("--check passed: " + ", ".join(f"{k}: max error {v:.2g}" for k, v in check.items()) + "\n")

    grid = QUICK if args.quick else dict(decode_rows=DECODE_ROWS, decode_tokens=DECODE_TOKENS, shared_rows=SHARED_ROWS,
                                         shared_prompts=SHARED_PROMPTS, threshold_rows=SHARED_ROWS,
                                         threshold_prompts=THRESHOLD_PROMPTS)  # fmt: skip
    decode = run_all(bench_decode, [(r, t) for t in grid["decode_tokens"] for r in grid["decode_rows"]], peak,
                     args.reps, deadline=deadline)  # fmt: skip
    print("## Decode: paged_attention vs SDPA on contiguous K/V\n\n" + decode_table(decode) + "\n", flush=True)
    shared = run_all(bench_shared, [(r, p) for p in grid["shared_prompts"] for r in grid["shared_rows"]], peak,
                     args.reps, deadline=deadline)  # fmt: skip
    print("## Shared-prefix decode vs plain paged_attention\n\n" + shared_table(shared) + "\n")
    sweep = run_all(bench_shared, [(r, p) for p in grid["threshold_prompts"] for r in grid["threshold_rows"]], peak,
                    args.reps, deadline=deadline)  # fmt: skip
    threshold = shared_prefix_threshold(sweep)
    print("## Shared-prefix threshold\n\n" + shared_table(sweep) + "\n")
    print(f"shared prefix pays from (prompt tokens, per rows): {threshold['per_rows']}; "
          f"dispatch threshold: {threshold['shared_prefix_min_prompt']}\n")
    compressed = None
    if args.kv_cache_dtype:
        grid = [(r, t, args.kv_cache_dtype) for t in COMPRESSED_TOKENS for r in COMPRESSED_ROWS]
        compressed = run_all(bench_compressed, grid, peak, args.reps, deadline=deadline)
        print(f"## Decode on {args.kv_cache_dtype} blocks vs bf16 blocks\n\n" + compressed_table(compressed) + "\n")
    summary = goals(decode, shared, compressed)
    for name, value in summary.items():
        print(f"- {name}: {'n/a' if value is None else f'{value:.0%}' if 'peak' in name else f'{value:.2f}x'}")

    out = Path(args.out)
    write_json(out, {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "device": device_name, "peak_bandwidth": peak, "torch": torch.__version__, "triton": triton.__version__,
        "shape": dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE,
                      dtype=str(DTYPE)),
        "reps": args.reps, "check": check, "decode": decode, "shared_prefix": shared, "compressed": compressed,
        "goals": summary, "threshold_sweep": sweep, "threshold": threshold,
    })  # fmt: skip
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
