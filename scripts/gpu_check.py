"""One prepared check of paged-generate on a GPU: what the Triton interpreter and the CPU tests cannot see.

    python scripts/gpu_check.py [--out gpu_check_results] [--budget-s 480]
    python scripts/gpu_check.py --dry-run     # the same wiring on CPU: tiny shapes, the Triton interpreter, seconds

Runs in at most `--budget-s` seconds (8 minutes by default, for one H100 / H200) and downloads nothing (random-weight
models built from configs). Each part runs in its own process under a hard time limit, so a hang costs only that part;
progress lines carry the elapsed time. Parts:

1. kernel_tests: tests/kernels compiled for the GPU (TRITON_INTERPRET=0), less the sm_90 compile tests.
2. kernels: the bf16 `tl.dot` branch, which the interpreter never runs, against float64 references (the kernel tests'
   rule); the launch on cuda:1 while cuda:0 is current, when two GPUs exist; benchmarks/kernel_speed.py --quick
   (fraction of peak HBM bandwidth, against SDPA on contiguous K/V, shared prefix against plain, and the prompt length
   below which shared-prefix attention stops paying).
3. model: a ~1.1B-parameter Llama-shaped model (TinyLlama's shape) with random weights in bf16: generate() against
   stock for greedy batch 1 and 16, beams 8 and samples 8 on 2k-token prompts (token agreement); end-to-end time and
   peak GPU memory against stock, with what the pools' growth (reallocate and copy) costs; 8 beams of 16-512-token
   prompts stock against every call paged, where the call rule's threshold (paged_generate/call_rule.py, measured on
   CPU) sits on this device; and the host syncs of one decode forward under `torch.cuda.set_sync_debug_mode("warn")`,
   paged (both backends) against stock.

Writes results.json and results.md into --out (and each part's JSON and log beside them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = time.monotonic()
# Seconds per part on the GPU (their sum plus process start-ups stays under 8 minutes); the dry run's are small.
BUDGET = {"kernel_tests": 170, "kernels": 110, "model": 170}
DRY_BUDGET = {"kernel_tests": 240, "kernels": 240, "model": 240}
RESERVE_S = 15  # for writing the results after the last part


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


# --- the parent: run each part in a process of its own --------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the Triton interpreter")
    parser.add_argument("--out", default="gpu_check_results", help="folder for results.json / results.md")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock limit of the whole check")
    parser.add_argument("--parts", default="kernel_tests,kernels,model", help="comma-separated subset")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # internal: the part's wall-clock end
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        return run_part(args.part, out, args.dry_run, args.deadline)

    end = time.time() + args.budget_s
    results = {"dry_run": args.dry_run, "budget_s": args.budget_s, "parts": {}}
    for name in args.parts.split(","):
        left = end - time.time() - RESERVE_S
        limit = min((DRY_BUDGET if args.dry_run else BUDGET)[name], left)
        if limit < 10:
            results["parts"][name] = {"status": "skipped", "reason": "out of time"}
            log(f"{name}: skipped, out of time")
            continue
        log(f"{name}: starting ({limit:.0f}s at most)")
        status = run_process(part_command(name, out, args.dry_run, time.time() + limit - 5), out / f"{name}.log", limit,
                             env=part_env(args.dry_run))  # fmt: skip
        part = pytest_summary(out / f"{name}.log") if name == "kernel_tests" else _read_json(out / f"{name}.json")
        part["status"] = "ok" if status == 0 and not part.get("failures") else status_name(status, part)
        results["parts"][name] = part
        log(f"{name}: {part['status']}")
    results["elapsed_s"] = time.monotonic() - START
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0 if all(p["status"] in ("ok", "skipped") for p in results["parts"].values()) else 1


def part_command(name: str, out: Path, dry_run: bool, deadline: float) -> list[str]:
    if name == "kernel_tests":
        selection = (["tests/kernels/test_kernel_write_kv.py", "tests/kernels/test_kernel_copy_blocks.py"] if dry_run
                     else ["tests/kernels", "-k", "not compile"])  # fmt: skip
        return [sys.executable, "-m", "pytest", "-q", *selection, "-m", "not slow", "-p", "no:cacheprovider",
                f"--junitxml={out / 'kernel_tests.xml'}"]  # fmt: skip
    flags = ["--dry-run"] if dry_run else []
    return [sys.executable, str(Path(__file__).resolve()), "--part", name, "--out", str(out), "--deadline",
            str(deadline), *flags]  # fmt: skip


def part_env(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    return env


def run_process(command: list[str], log_path: Path, limit: float, env: dict) -> int | str:
    """Run `command` from the repository root, echoing its lines with timestamps; "timeout" past `limit` seconds."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def pump():
            for line in proc.stdout:
                log_file.write(line)
                log("  " + line.rstrip()[:200])

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
        reader.join(timeout=5)
    return code


def status_name(code, part: dict) -> str:
    if code == "timeout":
        return "timeout"
    return "failed" if code != 0 or part.get("failures") else "ok"


def pytest_summary(log_path: Path) -> dict:
    """Counts and failures from a pytest log, also when it was cut short (then from its progress dots)."""
    import re

    text = log_path.read_text() if log_path.exists() else ""
    failures = re.findall(r"^FAILED (\S+)", text, flags=re.M)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    if not counts:  # cut short: count the progress characters
        progress = "".join(line for line in text.splitlines() if re.fullmatch(r"[.FsExX]+(\s+\[\s*\d+%\])?", line))
        counts = {"passed": progress.count("."), "failed": progress.count("F"), "cut_short": True}
    if counts.get("failed") and not failures:
        failures = [f"{counts['failed']} failed (see kernel_tests.log)"]
    return {"counts": counts, "failures": failures}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- one part, in its own process -------------------------------------------------------------------------------------
class Part:
    """What a part records: written to its JSON after every step, so a part killed at its limit keeps what it did."""

    def __init__(self, name: str, out: Path, deadline: float | None):
        self.path, self.deadline = out / f"{name}.json", deadline
        self.data: dict = {"failures": []}

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def record(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    @contextlib.contextmanager
    def step(self, key: str, needs_s: float = 5.0):
        """Run a step unless too little time is left; an exception is recorded as that step's failure."""
        if self.time_left() < needs_s:
            self.record(key, {"status": "skipped", "reason": "out of time"})
            log(f"{key}: skipped, out of time")
            yield None
            return
        log(f"{key} ...")
        started = time.monotonic()
        try:
            yield self
        except (Exception, SystemExit) as exc:  # noqa: BLE001  (the check goes on with the next step)
            self.data["failures"].append(f"{key}: {type(exc).__name__}: {exc}")
            self.record(key, {"status": "error", "error": f"{type(exc).__name__}: {exc}"})
            log(f"{key}: {type(exc).__name__}: {exc}")
        finally:
            log(f"{key}: {time.monotonic() - started:.1f}s")


def run_part(name: str, out: Path, dry_run: bool, deadline: float | None) -> int:
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    import torch

    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU")
        return 2
    part = Part(name, out, deadline)
    part.record("environment", environment(device))
    {"kernels": kernels_part, "model": model_part}[name](part, device, dry_run)
    return 0


def environment(device) -> dict:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(), count=torch.cuda.device_count())
    return info


# --- part: kernels ----------------------------------------------------------------------------------------------------
def kernels_part(part: Part, device, dry_run: bool) -> None:
    import kernel_speed

    if dry_run:  # the benchmark's shapes, made tiny for the interpreter
        kernel_speed.NUM_Q_HEADS, kernel_speed.NUM_KV_HEADS, kernel_speed.HEAD_DIM = 4, 2, 32
        kernel_speed.SCALE = kernel_speed.HEAD_DIM**-0.5

    with part.step("bf16_dot_vs_float64") as ok:
        if ok:
            # kernel_speed's --check: bf16 paged (1 and 4 splits) and shared-prefix (merged, split) kernels against
            # float64 references, error at most twice the reference's own in bf16. On a GPU the kernels take the
            # bf16 tensor-core dot; under the interpreter they emulate it in fp32.
            part.record("bf16_dot_vs_float64", {"max_errors": kernel_speed.check_kernels(device)})
    with part.step("two_devices") as ok:
        if ok:
            part.record("two_devices", two_device_check(device))
    with part.step("kernel_speed", needs_s=20) as ok:
        if ok:
            part.record("kernel_speed", kernel_speed_run(kernel_speed, device, dry_run, part))


def two_device_check(device) -> dict:
    """Kernels on tensors of cuda:1 while cuda:0 is current, on a side stream of cuda:1: the reference's result."""
    import torch

    from paged_generate import kernels

    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": "needs two CUDA devices"}
    torch.cuda.set_device(0)
    other = torch.device("cuda", 1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    pool = [torch.randn(64, 16, 2, 64, generator=generator, dtype=torch.float16) for _ in range(2)]
    tables = torch.randperm(64, generator=generator)[:60].view(4, 15).int()
    seq_lens = torch.tensor([240, 17, 100, 1], dtype=torch.int32)
    query = torch.randn(4, 8, 1, 64, generator=generator, dtype=torch.float16)
    expected = kernels.paged_attention_reference(query.double(), *pool, tables, seq_lens, scale=0.125)
    stream = torch.cuda.Stream(device=other)
    with torch.cuda.stream(stream):
        on_other = [t.to(other, non_blocking=True) for t in (query, *pool, tables, seq_lens)]
        out = kernels.paged_attention(*on_other, scale=0.125, num_splits=3)
        new_keys = torch.randn(4, 2, 64, device=other, dtype=torch.float16)
        kernels.write_kv(new_keys, new_keys, on_other[1], on_other[2], torch.arange(4, device=other) * 16)
    stream.synchronize()
    error = (out.double().cpu() - expected).abs().max().item()
    written = torch.equal(on_other[1][0:4, 0].cpu(), new_keys.cpu())
    return {"status": "ok" if error < 1e-2 and written else "failed", "max_error": error, "kv_written": written,
            "current_device": torch.cuda.current_device()}  # fmt: skip


def kernel_speed_run(kernel_speed, device, dry_run: bool, part: Part) -> dict:
    if not dry_run:
        budget = max(part.time_left() - 15, 10)
        path = part.path.with_name("kernel_speed.json")
        kernel_speed.main(["--quick", "--reps", "20", "--budget-s", f"{budget:.0f}", "--out", str(path)])
        result = _read_json(path)
        return {k: result.get(k) for k in ("device", "peak_bandwidth", "decode", "shared_prefix", "goals",
                                           "threshold_sweep", "threshold")}  # fmt: skip
    # Dry run: the same calls on tiny CPU shapes with the wall clock.
    decode = kernel_speed.run_all(kernel_speed.bench_decode, [(1, 32)], None, 1, device)
    sweep = kernel_speed.run_all(kernel_speed.bench_shared, [(2, 32), (2, 64)], None, 1, device, own=8)
    return {"decode": decode, "threshold_sweep": sweep, "threshold": kernel_speed.shared_prefix_threshold(sweep)}


# --- part: model ------------------------------------------------------------------------------------------------------
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4)  # TinyLlama-1.1B's shape
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip


def model_part(part: Part, device, dry_run: bool) -> None:
    import torch

    shape = LLAMA_TINY if dry_run else LLAMA_1B
    prompt_len, new_tokens = (20, 3) if dry_run else (2048, 32)
    batch, fan_out = (3, 2) if dry_run else (16, 8)  # greedy batch; beams and samples per prompt
    with part.step("build") as ok:
        if not ok:
            return
        model = build_model(shape, device, torch.float32 if dry_run else torch.bfloat16)
        part.record("model", {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype),
                              **shape})  # fmt: skip
    cases = {
        "greedy, batch 1": dict(rows=1, kwargs=dict(do_sample=False)),
        f"greedy, batch {batch}": dict(rows=batch, kwargs=dict(do_sample=False)),
        f"beams {fan_out}": dict(rows=1, kwargs=dict(num_beams=fan_out, do_sample=False)),
        f"samples {fan_out}": dict(rows=1, kwargs=dict(do_sample=True, num_return_sequences=fan_out, top_k=0)),
    }
    parity = {}
    for name, case in cases.items():
        with part.step(f"parity: {name}", needs_s=20) as ok:
            if ok:
                parity[name] = parity_case(model, device, prompt_len, new_tokens, case, dry_run)
                part.record("parity", parity)
    speed = {}
    for name in (f"beams {fan_out}", f"greedy, batch {batch}")[: 1 if dry_run else 2]:
        with part.step(f"speed and memory: {name}", needs_s=30) as ok:
            if ok:
                speed[name] = speed_case(model, device, prompt_len, new_tokens * (1 if dry_run else 2), cases[name],
                                         dry_run)  # fmt: skip
                part.record("speed_and_memory", speed)
    with part.step("call rule: short prompts", needs_s=30) as ok:
        if ok:
            part.record("call_rule", call_rule_check(model, device, fan_out, dry_run))
    with part.step("host syncs of a decode forward", needs_s=10) as ok:
        if ok:
            syncs = sync_check(model, device, prompt_len, fan_out)
            part.record("host_syncs", syncs)
            if not syncs["no_extra_sync"]:
                part.data["failures"].append(f"a paged decode forward syncs more than stock's: {syncs['syncs']}")


def build_model(shape: dict, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="sdpa")  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # peaked next-token distributions, as a trained model's: beams and samples don't tie
        model.lm_head.weight.mul_(8.0)
    return model


def _prompts(rows: int, length: int, vocab: int, device):
    import torch

    generator = torch.Generator().manual_seed(rows * 1000 + length)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    return ids.to(device), torch.ones_like(ids).to(device)


def _generate(model, ids, mask, new_tokens, kwargs, *, paged: str | None, seed: int = 0):
    import torch

    from paged_generate import disable_paged_cache, enable_paged_cache

    if paged:
        enable_paged_cache(model, backend=paged, min_shared_tokens=0)
    else:
        disable_paged_cache(model)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=0, **kwargs)  # fmt: skip
    finally:
        disable_paged_cache(model)


def parity_case(model, device, prompt_len, new_tokens, case, dry_run: bool) -> dict:
    """Tokens of stock generate() against paged, on the Triton kernels and on the PyTorch path. In bf16 on a GPU
    neither is bit-identical to stock's SDPA (different summation orders), so this reports agreement; a fp32 or CPU
    run is token-identical (the test suite checks that)."""
    ids, mask = _prompts(case["rows"], prompt_len, model.config.vocab_size, device)
    stock = _generate(model, ids, mask, new_tokens, case["kwargs"], paged=None)
    results = {}
    for backend in ("triton", "torch"):
        paged = _generate(model, ids, mask, new_tokens, case["kwargs"], paged=backend)
        same_rows = (paged == stock).all(dim=1)
        differs = (paged != stock).any(dim=0).nonzero()
        results[backend] = dict(
            tokens_equal=bool(same_rows.all()), rows_equal=f"{int(same_rows.sum())}/{len(same_rows)}",
            first_difference=int(differs[0]) - prompt_len if len(differs) else None)  # fmt: skip
    return results


def speed_case(model, device, prompt_len, new_tokens, case, dry_run: bool) -> dict:
    """Median wall time of generate() (after a warm-up call) and its peak GPU memory, stock against paged; the KV the
    paged call held at its peak, and how often its pools grew, with the largest transient a growth adds (a pool and
    its grown copy side by side)."""
    import torch

    import paged_generate.cache as cache_module
    from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache

    backend = "triton" if dry_run else "auto"
    ids, mask = _prompts(case["rows"], prompt_len, model.config.vocab_size, device)
    result = {}
    for label, paged in (("stock", None), ("paged", backend)):
        times, peak = [], None
        for run in range(2 if dry_run else 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            _generate(model, ids, mask, new_tokens, case["kwargs"], paged=paged)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
            if run:
                times.append(time.perf_counter() - start)
        result[label] = {"seconds": statistics.median(times), "peak_bytes_over_weights": peak}
    growths = []
    original = cache_module.grown

    def grown(pool, capacity):
        growths.append((pool.numel() * pool.element_size(), capacity * pool[0].numel() * pool.element_size()))
        return original(pool, capacity)

    cache_module.grown = grown
    enable_paged_cache(model, backend=backend, min_shared_tokens=0)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0, **case["kwargs"])  # fmt: skip
        stats = cache_stats(model)
    finally:
        cache_module.grown = original
        disable_paged_cache(model)
    peak = result["paged"]["peak_bytes_over_weights"]
    result.update(speedup=result["stock"]["seconds"] / result["paged"]["seconds"], growths=len(growths),
                  largest_growth_transient_bytes=max((old + new for old, new in growths), default=0),
                  paged_kv_in_use_bytes=stats.peak_kv_bytes, paged_pool_bytes=stats.pool_bytes,
                  paged_peak_over_kv=peak / stats.peak_kv_bytes if peak and stats.peak_kv_bytes else None)  # fmt: skip
    return result


def call_rule_check(model, device, fan_out: int, dry_run: bool) -> dict:
    """Beams of short prompts, stock against every call paged: where paging starts to pay on this device, in the
    call rule's measure (paged_generate/call_rule.py: shared prompt tokens per new token, scaled to hidden size 256),
    and what the rule, measured on CPU, chooses for each."""
    from paged_generate.call_rule import REFERENCE_HIDDEN_SIZE, paging_pays

    new_tokens = 3 if dry_run else 64
    hidden = model.config.hidden_size
    cases = {}
    for prompt_len in (4, 8) if dry_run else (16, 64, 128, 512):
        ids, mask = _prompts(1, prompt_len, model.config.vocab_size, device)
        kwargs = dict(num_beams=fan_out, do_sample=False)
        seconds = {}
        for label, paged in (("stock", None), ("paged", "auto")):
            times = []
            for run in range(2 if dry_run else 3):  # the first warms up
                _synchronize(device)
                start = time.perf_counter()
                _generate(model, ids, mask, new_tokens, kwargs, paged=paged)
                _synchronize(device)
                if run:
                    times.append(time.perf_counter() - start)
            seconds[label] = statistics.median(times)
        shared = (fan_out - 1) * prompt_len
        cases[f"prompt {prompt_len}, {fan_out} beams, {new_tokens} new"] = dict(
            stock_s=seconds["stock"], paged_s=seconds["paged"], speedup=seconds["stock"] / seconds["paged"],
            shared_per_new_token_at_256=shared / new_tokens * (hidden / REFERENCE_HIDDEN_SIZE) ** 2,
            rule_pages=paging_pays(shared, new_tokens, hidden))  # fmt: skip
    return cases


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_check(model, device, prompt_len, fan_out) -> dict:
    """Host syncs of one decode forward of rows sharing a prompt (the beams' shape): stock, paged on the kernels,
    paged on the PyTorch path. On CUDA counted by `set_sync_debug_mode("warn")`; on CPU (dry run), host reads of
    tensors stand in."""
    import torch
    from transformers import DynamicCache

    from paged_generate import PagedCache, disable_paged_cache, enable_paged_cache
    from paged_generate.patches.compat import CACHE_KWARG

    ids, mask = _prompts(1, prompt_len, model.config.vocab_size, device)
    counts = {}
    for label, backend in (("stock", None), ("paged, kernels", "triton"), ("paged, PyTorch path", "torch")):
        if backend:
            enable_paged_cache(model, backend=backend, min_shared_tokens=0)
            cache = PagedCache.from_model(model, backend=backend)
        else:
            disable_paged_cache(model)
            cache = DynamicCache(config=model.config)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
                cache.batch_repeat_interleave(fan_out)
                token = torch.full((fan_out, 1), 5, device=device)
                step_mask = torch.ones(fan_out, prompt_len + 1, dtype=mask.dtype, device=device)
                model(input_ids=token, attention_mask=step_mask, **{CACHE_KWARG: cache}, use_cache=True)  # warm
                cache.crop(-1)
                with count_syncs(device) as count:
                    model(input_ids=token, attention_mask=step_mask, **{CACHE_KWARG: cache}, use_cache=True)
            counts[label] = count[0]
        finally:
            disable_paged_cache(model)
    extra = {k: v - counts["stock"] for k, v in counts.items() if k != "stock"}
    return {"syncs": counts, "paged_minus_stock": extra, "no_extra_sync": all(v <= 0 for v in extra.values())}


@contextlib.contextmanager
def count_syncs(device):
    import torch

    count = [0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                torch.cuda.set_sync_debug_mode("default")
        count[0] = sum("synchroniz" in str(w.message) for w in caught)
        return
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(original):
        def read(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield count
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# --- report -----------------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    parts = results["parts"]
    lines = [f"# paged-generate GPU check{' (dry run on CPU)' if results['dry_run'] else ''}", ""]
    env = next((p.get("environment") for p in parts.values() if p.get("environment")), {})
    lines += [f"Device: {env.get('name', env.get('device', '?'))}; torch {env.get('torch')}, triton "
              f"{env.get('triton')}, transformers {env.get('transformers')}; {results['elapsed_s']:.0f} s.", ""]
    lines += ["| part | status |", "|---|---|"] + [f"| {n} | {p['status']} |" for n, p in parts.items()] + [""]
    for name, part in parts.items():
        for failure in part.get("failures", []):
            lines.append(f"- {name} failure: {failure}")
    if parts.get("kernel_tests", {}).get("counts"):
        lines += ["", f"Kernel tests on the device: {parts['kernel_tests']['counts']}"]
    model = parts.get("model", {})
    if model.get("parity"):
        lines += ["", "## generate() against stock", "", "| case | Triton kernels | PyTorch path |", "|---|---|---|"]
        for case, r in model["parity"].items():
            cells = [f"{r[b]['rows_equal']} rows equal" + (f", first difference at token {r[b]['first_difference']}"
                                                           if r[b]["first_difference"] is not None else "")
                     for b in ("triton", "torch")]  # fmt: skip
            lines.append(f"| {case} | {cells[0]} | {cells[1]} |")
    if model.get("speed_and_memory"):
        lines += ["", "## End to end", "", "| case | stock s | paged s | stock / paged | stock peak MiB | "
                  "paged peak MiB | paged peak / KV in use | pool growths |", "|---" + "|---:" * 7 + "|"]
        for case, r in model["speed_and_memory"].items():
            stock, paged, ratio = r["stock"], r["paged"], r["paged_peak_over_kv"]
            mib = lambda b: f"{b / 2**20:.0f}" if b else "n/a"  # noqa: E731
            lines.append(f"| {case} | {stock['seconds']:.2f} | {paged['seconds']:.2f} | {r['speedup']:.2f}x | "
                         f"{mib(stock['peak_bytes_over_weights'])} | {mib(paged['peak_bytes_over_weights'])} | "
                         f"{f'{ratio:.2f}' if ratio else 'n/a'} | {r['growths']} |")
    if model.get("call_rule"):
        lines += ["", "## Call rule: beams of short prompts, every call paged", "",
                  "| case | stock s | paged s | stock / paged | shared tokens per new token (at hidden 256) | "
                  "the rule pages it |", "|---|---:|---:|---:|---:|---|"]
        for case, r in model["call_rule"].items():
            lines.append(f"| {case} | {r['stock_s']:.3f} | {r['paged_s']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['shared_per_new_token_at_256']:.1f} | {'yes' if r['rule_pages'] else 'no'} |")
        lines += ["", "Paging pays from the first ratio >= 1.00x: set `SHARED_TOKENS_PER_NEW_TOKEN` in "
                  "paged_generate/call_rule.py for CUDA from it."]
    if model.get("host_syncs"):
        lines += ["", f"Host syncs of one decode forward: {model['host_syncs']['syncs']}"]
    kernel_part = parts.get("kernels", {})
    if kernel_part.get("bf16_dot_vs_float64"):
        lines += ["", f"bf16 kernels vs float64: {kernel_part['bf16_dot_vs_float64']}"]
    if kernel_part.get("two_devices"):
        lines += ["", f"Launch on cuda:1 while cuda:0 is current: {kernel_part['two_devices']}"]
    speed = kernel_part.get("kernel_speed") or {}
    if speed.get("threshold"):
        lines += ["", f"Shared-prefix threshold (prompt tokens from which it pays): {speed['threshold']}"]
    if speed.get("goals"):
        lines += ["", "Kernel goals: " + json.dumps(speed["goals"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
