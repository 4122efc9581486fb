"""KV-cache and process memory of stock vs paged `generate()`: beam search and sampling at several widths.

For each prompt/new-token shape, mode (beam, sample) and width, one configuration runs stock and then paged once per
`--kv-cache-dtypes` entry, each in a fresh process (so peak RSS belongs to that run alone). Printed as a markdown
table and written as JSON.

    python benchmarks/memory.py [--shapes 1024/128,19/58,161/338] [--widths 2,4,6,8] [--modes beam,sample]
                                [--kv-cache-dtypes auto,int8,fp8] [--dtype float32|bfloat16]
                                [--out benchmarks/results/memory.json] [--device cpu] [--threads 1]

Model: a 4-layer GQA Llama (hidden 256, 8 query heads, 2 KV heads) with random weights, fp32 unless `--dtype`. 19/58
and 161/338 are the average Alpaca and ShareGPT lengths used in the PagedAttention paper.

Ends with checks at 1024/128, width 8: the KV saving of beam search and of sampling must be >= 75% with "auto"; with
int8 / fp8 blocks in bf16, >= 90% (beams) and >= 88% (samples); in fp32, int8 must hold at most a third of what
"auto" holds. Exits non-zero when a check fails, when "auto" tokens differ from stock (int8 / fp8 are lossy: their
share of tokens equal to stock is reported), or when the stock KV measured in the stock run disagrees with the
plugin's `dense_kv_bytes`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata, util
from pathlib import Path

import bench_utils
from bench_utils import write_json

DEFAULT_OUT = bench_utils.RESULTS_DIR / "memory.json"
SHAPE_NAMES = {"1024/128": "long prompt", "19/58": "Alpaca", "161/338": "ShareGPT"}
CHECK_SHAPE, CHECK_WIDTH, CHECK_MIN_SAVING = "1024/128", 8, 0.75
# Compressed blocks in bf16: the saving against stock at CHECK_SHAPE / CHECK_WIDTH, per mode.
COMPRESSED_MIN_SAVING = {"beam": 0.90, "sample": 0.88}
FP32_INT8_MAX_SHARE = 1 / 3  # int8 blocks in fp32: at most this share of the "auto" paged KV (~4x less)
DTYPES = ("float32", "bfloat16", "float16")
MODEL_SEED, PROMPT_SEED, GENERATE_SEED = 0, 1, 2
RESULT_MARK = "MEMORY_RESULT "  # prefixes the child's JSON line, so stray prints cannot be mistaken for it
MIB = 2**20


# --- child: one (shape, mode, width, stock|paged) run in a fresh process ------------------------------------------
def build_model(device: str, dtype: str = "float32"):
    """The benchmark model; the same weights in every process thanks to the fixed seed."""
    import torch

    return bench_utils.build_model("4-layer", seed=MODEL_SEED, head_scale=8, max_positions=2048, device=device,
                                   dtype=getattr(torch, dtype))


def make_prompt(prompt_len: int, vocab_size: int, device: str):
    """One prompt of random ids, skipping pad/bos/eos (0, 1, 2) so nothing in it is special."""
    import torch

    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(3, vocab_size, (1, prompt_len), generator=generator).to(device)


def generate_kwargs(mode: str, width: int, new_tokens: int) -> dict:
    # min_new_tokens = max_new_tokens: EOS cannot end a run early, so stock and paged do exactly the same work.
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, return_dict_in_generate=True)
    if mode == "beam":
        return dict(common, num_beams=width, num_return_sequences=1)
    if mode == "sample":
        return dict(common, do_sample=True, num_return_sequences=width)
    raise ValueError(f"unknown mode {mode!r}; expected beam or sample")


class MemoryProbe:
    """Process memory of the run: peak RSS on CPU, peak allocated CUDA memory on CUDA (RSS there is host-side)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")
        self.kind = "cuda_max_memory_allocated" if self.cuda else "ru_maxrss"

    def baseline(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated()
        return self._maxrss()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        import resource

        # Peak resident set of this process so far; Linux reports KiB. Peak, not current: the KV cache and the
        # step's activations come and go inside generate(), and only the high-water mark says what it needed.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stock_kv(output) -> dict:
    """Bytes of the stock DynamicCache returned by generate(), read off its layers' K/V tensors.

    A DynamicCache only grows (each step concatenates one position), so the cache at the end of the call is its peak.
    """
    cache = output.get("cache")  # the name from transformers 5.24 on (`past_key_values` there is a deprecated alias)
    if cache is None:  # older releases
        cache = output.get("past_key_values")
    layers = cache.layers
    return {
        "kv_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in layers),
        "kv_rows": int(layers[0].keys.shape[0]),
        "kv_seq_len": int(layers[0].keys.shape[-2]),
    }


def tokens_hash(sequences) -> str:
    """Compact fingerprint of the generated ids: the parent compares stock and paged by it."""
    array = sequences.detach().cpu().contiguous().numpy()
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()[:16]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_single(spec: str, device: str, threads: int, dtype: str = "float32") -> dict:
    """`--single SHAPE,MODE,WIDTH,RUN` (e.g. 1024/128,beam,8,paged; RUN paged-int8 / paged-fp8 for compressed
    blocks): one generate() call, its memory figures."""
    import torch
    import transformers

    from paged_generate import cache_stats, enable_paged_cache

    if threads > 0:
        # Memory, not speed, is measured: on a shared machine intra-op threads spinning against other work slow a run
        # down many times over (seen: 15 s vs 0.3 s), while the figures do not depend on the thread count.
        torch.set_num_threads(threads)
    shape, mode, width, run = spec.split(",")
    prompt_len, new_tokens, width = *parse_shape(shape), int(width)
    probe = MemoryProbe(device)
    model = build_model(device, dtype)
    prompt = make_prompt(prompt_len, model.config.vocab_size, device)
    if run.startswith("paged"):
        enable_paged_cache(model, kv_cache_dtype=run.partition("-")[2] or "auto", min_shared_tokens=0)
    elif run != "stock":
        raise ValueError(f"unknown run {run!r}; expected stock, paged, paged-int8 or paged-fp8")
    # Baseline after the model and prompt exist: peak minus baseline is what generate() itself added.
    base = probe.baseline()

    torch.manual_seed(GENERATE_SEED)  # same seed in both runs: sampling draws the same tokens
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **generate_kwargs(mode, width, new_tokens))
    seconds = time.perf_counter() - start
    peak = probe.peak()

    result = dict(
        shape=shape, mode=mode, width=width, run=run, seconds=seconds, mem_kind=probe.kind, mem_base_bytes=base,
        mem_peak_bytes=peak, tokens_hash=tokens_hash(output.sequences), out_rows=int(output.sequences.shape[0]),
        out_len=int(output.sequences.shape[1]), torch=torch.__version__, transformers=transformers.__version__,
        tokens=output.sequences.detach().cpu().tolist(),
        device_name=torch.cuda.get_device_name() if probe.cuda else cpu_name(),
        threads=torch.get_num_threads(),
    )
    result.update(stock_kv(output) if run == "stock" else {"stats": cache_stats(model).as_dict()})
    return result


# --- parent: the grid, one child process per run ------------------------------------------------------------------
def parse_shape(shape: str) -> tuple[int, int]:
    prompt_len, new_tokens = shape.split("/")
    return int(prompt_len), int(new_tokens)


def run_child(shape: str, mode: str, width: int, run: str, args: argparse.Namespace) -> dict:
    """Run one configuration in a fresh interpreter and return the JSON line it printed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--threads", str(args.threads),
               "--dtype", args.dtype, "--single", f"{shape},{mode},{width},{run}"]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {shape} {mode} {width} {run} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(RESULT_MARK):])


def combine(stock: dict, paged: dict) -> dict:
    """One table row from a stock and a paged run of the same configuration."""
    stats = paged["stats"]
    same_tokens = [a == b for a, b in zip(sum(stock["tokens"], []), sum(paged["tokens"], []))]
    stock_kv_bytes, paged_kv_bytes = stock["kv_bytes"], stats["peak_kv_bytes"]
    # One token position over all rows and layers: the tolerance between the measured stock cache and the plugin's
    # `dense_kv_bytes` (rows x longest length x bytes per token), which count the same tensors.
    token_bytes = stock_kv_bytes // max(stock["kv_seq_len"], 1)
    return dict(
        shape=stock["shape"], shape_name=SHAPE_NAMES.get(stock["shape"], ""), mode=stock["mode"], width=stock["width"],
        kv_cache_dtype=stats.get("kv_cache_dtype", "auto"),
        tokens_equal_share=sum(same_tokens) / max(len(same_tokens), 1),
        stock_kv_bytes=stock_kv_bytes, stock_kv_rows=stock["kv_rows"], stock_kv_seq_len=stock["kv_seq_len"],
        dense_kv_bytes=stats["dense_kv_bytes"], dense_agrees=abs(stock_kv_bytes - stats["dense_kv_bytes"]) <= token_bytes,
        paged_kv_bytes=paged_kv_bytes, paged_pool_bytes=stats["pool_bytes"],
        kv_saving=1.0 - paged_kv_bytes / stock_kv_bytes if stock_kv_bytes else 0.0,
        mem_kind=stock["mem_kind"],
        stock_mem_peak_bytes=stock["mem_peak_bytes"], paged_mem_peak_bytes=paged["mem_peak_bytes"],
        stock_mem_base_bytes=stock["mem_base_bytes"], paged_mem_base_bytes=paged["mem_base_bytes"],
        stock_mem_gen_bytes=stock["mem_peak_bytes"] - stock["mem_base_bytes"],
        paged_mem_gen_bytes=paged["mem_peak_bytes"] - paged["mem_base_bytes"],
        same_tokens=stock["tokens_hash"] == paged["tokens_hash"],
        stock_tokens_hash=stock["tokens_hash"], paged_tokens_hash=paged["tokens_hash"],
        stock_seconds=stock["seconds"], paged_seconds=paged["seconds"], paged_stats=stats,
    )


def run_grid(args) -> tuple[list[dict], list[dict], dict | None]:
    """(rows, failures, one child's report): a configuration whose child fails is recorded and the grid goes on."""
    rows, failures, first_child = [], [], None
    for shape in args.shapes:
        for mode in args.modes:
            for width in args.widths:
                try:
                    stock = run_child(shape, mode, width, "stock", args)
                except RuntimeError as error:
                    failures.append(dict(shape=shape, mode=mode, width=width, error=str(error)))
                    print(f"  FAILED {shape} {mode} {width} stock:\n{error}", file=sys.stderr, flush=True)
                    continue
                first_child = first_child or stock
                for kv_cache_dtype in args.kv_cache_dtypes:
                    run = "paged" if kv_cache_dtype == "auto" else f"paged-{kv_cache_dtype}"
                    try:
                        paged = run_child(shape, mode, width, run, args)
                    except RuntimeError as error:
                        failures.append(dict(shape=shape, mode=mode, width=width, kv_cache_dtype=kv_cache_dtype,
                                             error=str(error)))
                        print(f"  FAILED {shape} {mode} {width} {run}:\n{error}", file=sys.stderr, flush=True)
                        continue
                    rows.append(combine(stock, paged))
                    print(f"  done {shape} {mode} {width} {kv_cache_dtype}: saving {rows[-1]['kv_saving']:.1%}",
                          file=sys.stderr, flush=True)
    return rows, failures, first_child


# --- report -------------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    mem = "peak RSS" if rows and rows[0]["mem_kind"] == "ru_maxrss" else "peak CUDA alloc"
    header = [
        "shape (prompt/new)", "mode", "width", "KV dtype", "stock KV MiB", "paged KV MiB", "KV saving",
        f"stock {mem} MiB", f"paged {mem} MiB", "stock generate +MiB", "paged generate +MiB", "same tokens",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i > 1 else "---" for i in range(len(header))) + "|"]
    for row in rows:
        name = f"{row['shape']} {row['shape_name']}".strip()
        same = "yes" if row["same_tokens"] else ("**NO**" if row["kv_cache_dtype"] == "auto" else
                                                 f"{row['tokens_equal_share']:.0%} of tokens")
        cells = [
            name, row["mode"], str(row["width"]), row["kv_cache_dtype"],
            f"{row['stock_kv_bytes'] / MIB:.2f}", f"{row['paged_kv_bytes'] / MIB:.2f}", f"{row['kv_saving']:.1%}",
            f"{row['stock_mem_peak_bytes'] / MIB:.1f}", f"{row['paged_mem_peak_bytes'] / MIB:.1f}",
            f"{row['stock_mem_gen_bytes'] / MIB:.1f}", f"{row['paged_mem_gen_bytes'] / MIB:.1f}", same,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(rows: list[dict], failures: list[dict], dtype: str = "float32") -> list[tuple[bool | None, str]]:
    """(passed, line) for each check; passed is None for a check the chosen grid does not cover."""
    results = []
    for failure in failures:
        last_line = failure["error"].strip().splitlines()[-1]
        results.append((False, f"FAIL run crashed at {failure['shape']} {failure['mode']} width {failure['width']}: {last_line}"))

    def at_check(mode, kv_cache_dtype):
        return next((r for r in rows if (r["shape"], r["mode"], r["width"], r["kv_cache_dtype"])
                     == (CHECK_SHAPE, mode, CHECK_WIDTH, kv_cache_dtype)), None)

    kv_dtypes = sorted({r["kv_cache_dtype"] for r in rows}) or ["auto"]
    for mode in ("beam", "sample"):
        for kv_cache_dtype in kv_dtypes:
            minimum = CHECK_MIN_SAVING if kv_cache_dtype == "auto" else COMPRESSED_MIN_SAVING[mode]
            if kv_cache_dtype != "auto" and dtype != "bfloat16":
                continue  # the compressed goals are set in bf16
            row = at_check(mode, kv_cache_dtype)
            what = f"KV saving at {CHECK_SHAPE}, {mode} width {CHECK_WIDTH}, {kv_cache_dtype} blocks, {dtype}"
            if row is None:
                results.append((None, f"SKIP {what}: not in the grid"))
            else:
                ok = row["kv_saving"] >= minimum
                results.append((ok, f"{'PASS' if ok else 'FAIL'} {what}: {row['kv_saving']:.1%} (>= {minimum:.0%})"))
        auto, int8 = at_check(mode, "auto"), at_check(mode, "int8")
        if dtype == "float32" and auto is not None and int8 is not None:
            share = int8["paged_kv_bytes"] / auto["paged_kv_bytes"]
            ok = share <= FP32_INT8_MAX_SHARE
            less = auto["paged_kv_bytes"] / int8["paged_kv_bytes"]
            results.append((ok, f"{'PASS' if ok else 'FAIL'} int8 blocks hold {share:.1%} of the paged fp32 KV at "
                                f"{CHECK_SHAPE}, {mode} width {CHECK_WIDTH} ({less:.2f}x less; "
                                f"<= {FP32_INT8_MAX_SHARE:.0%})"))
    for row in rows:
        where = f"{row['shape']} {row['mode']} width {row['width']}"
        if not row["same_tokens"] and row["kv_cache_dtype"] == "auto":
            results.append((False, f"FAIL paged tokens differ from stock at {where} "
                                   f"({row['paged_tokens_hash']} vs {row['stock_tokens_hash']})"))
        if not row["dense_agrees"]:
            results.append((False, f"FAIL measured stock KV {row['stock_kv_bytes']} B != dense_kv_bytes "
                                   f"{row['dense_kv_bytes']} B (beyond one token) at {where}"))
    exact = [r for r in rows if r["kv_cache_dtype"] == "auto"]
    if exact and all(r["same_tokens"] for r in exact):
        results.append((True, f"PASS paged tokens equal stock in all {len(exact)} configurations with auto"))
    if rows and all(r["dense_agrees"] for r in rows):
        results.append((True, "PASS measured stock KV matches cache_stats().dense_kv_bytes within one token everywhere"))
    return results


def library_source() -> dict:
    """Which paged_generate code the children import: its folder, a digest of its source, git commit and changes.

    Read before and after the grid: a run that straddles an edit of the library says so.
    """
    root = Path(util.find_spec("paged_generate").origin).parent  # found without importing torch into this process
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], capture_output=True, text=True, cwd=root)
        except OSError:
            return None
        return done.stdout.rstrip("\n") if done.returncode == 0 else None  # keep porcelain's leading status column

    # The commit alone does not say what ran when the library has uncommitted changes: list them too.
    uncommitted = git("status", "--porcelain", "--", ".")
    return dict(
        paged_generate_path=str(root), library_digest=digest.hexdigest()[:16], git_commit=git("rev-parse", "HEAD"),
        library_uncommitted_changes=uncommitted.splitlines() if uncommitted is not None else None,  # None: unknown
    )


def environment(first_child: dict | None, device: str, source: dict) -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    child = first_child or {}
    return dict(
        platform=platform.platform(), machine=platform.machine(), cpu_count=os.cpu_count(), python=platform.python_version(),
        device=device, device_name=child.get("device_name"), torch_threads=child.get("threads"),
        torch=child.get("torch") or version("torch"), transformers=child.get("transformers") or version("transformers"),
        paged_generate=version("paged-generate"), **source,
    )


# --- entry --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def csv(kind):
        return lambda text: [kind(item) for item in text.split(",") if item]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=csv(str), default=["1024/128", "19/58", "161/338"], help="prompt/new tokens")
    parser.add_argument("--widths", type=csv(int), default=[2, 4, 6, 8], help="beams (beam) or samples (sample)")
    parser.add_argument("--modes", type=csv(str), default=["beam", "sample"], help="beam and/or sample")
    parser.add_argument("--kv-cache-dtypes", type=csv(str), default=["auto"],
                        help="paged runs per configuration: auto, int8, fp8 (enable_paged_cache's kv_cache_dtype)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's dtype (default float32)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak memory: torch.cuda.max_memory_allocated)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (0: torch's default)")
    parser.add_argument("--single", metavar="SHAPE,MODE,WIDTH,RUN", help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args(argv)
    for shape in args.shapes:
        parse_shape(shape)  # fail on a malformed shape before any child starts
    unknown = set(args.modes) - {"beam", "sample"}
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; expected beam and/or sample")
    unknown = set(args.kv_cache_dtypes) - {"auto", "int8", "fp8"}
    if unknown:
        parser.error(f"unknown kv cache dtype(s) {sorted(unknown)}; expected auto, int8 and/or fp8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.single:
        print(RESULT_MARK + json.dumps(run_single(args.single, args.device, args.threads, args.dtype)), flush=True)
        return 0

    source, start = library_source(), time.perf_counter()  # before the grid: what the runs started on
    rows, failures, first_child = run_grid(args)
    wall = time.perf_counter() - start
    changed = library_source()["library_digest"] != source["library_digest"]
    env = dict(environment(first_child, args.device, source), library_changed_during_run=changed)
    table, results = markdown_table(rows), checks(rows, failures, args.dtype)
    print(table)
    print(f"\n{len(rows) * 2} runs in {wall:.0f} s wall ({len(failures)} configuration(s) failed); "
          f"memory: {rows[0]['mem_kind'] if rows else '-'}")
    for _, line in results:
        print(line)
    if changed:
        print("WARNING the paged_generate source changed while the grid ran: later rows measured other code")

    write_json(args.out, dict(
        command=" ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv]),
        environment=env,
        settings=dict(shapes=args.shapes, modes=args.modes, widths=args.widths, kv_cache_dtypes=args.kv_cache_dtypes,
                      model_seed=MODEL_SEED, prompt_seed=PROMPT_SEED, generate_seed=GENERATE_SEED, dtype=args.dtype,
                      threads=args.threads,
                      model="LlamaForCausalLM, 4 layers, hidden 256, 8 q-heads, 2 kv-heads, intermediate 512, vocab 1024"),
        wall_seconds=wall, rows=rows, failures=failures, table_markdown=table,
        checks=[dict(passed=ok, line=line) for ok, line in results],
    ))
    print(f"wrote {args.out}")
    return 1 if any(ok is False for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
