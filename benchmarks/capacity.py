"""How wide a call fits in a KV budget: the largest `num_beams` and `num_return_sequences`, stock against paged.

    python benchmarks/capacity.py [--budgets 16,64,256] [--shapes 1024/128,19/58,161/338] [--dtype bfloat16]
                                  [--verify smallest|all|none] [--verify-layers 1|4] [--out benchmarks/results/...]

Model: the 4-layer benchmark Llama (benchmarks/bench_utils.py; 2 KV heads of 32), in `--dtype` (bfloat16: the goals
for int8 / fp8 blocks are stated on a bf16 model). A budget is bytes of K/V summed over layers.

- stock: its DynamicCache holds every row's whole length, `rows x (prompt + new - 1) x bytes per token` at the end of
  the call (it only grows); the width is that bound, and the verification runs stock once at its width and reads the
  returned cache's tensor sizes (they must equal the bound).
- paged, paged int8, paged fp8: `enable_paged_cache(max_cache_bytes=budget)` at the block size `block_size="auto"`
  picks on CPU. The largest width is found by running the library's own block bookkeeping (BlockTables, the allocator
  and its byte cap: what a generate() call runs, without the model) through the call: the prompt once, forked to every
  row, then one token per step; a width whose bookkeeping raises OutOfBlocksError does not fit. For samples this is
  the exact peak (it does not depend on the tokens). For beams it is the case where beams share none of their new
  tokens, the most a beam search can hold (beams reordered onto a common parent share blocks): the beam width is
  guaranteed, real beam searches may fit more.
- verification (`--verify`): the real generate() at the width found, under `max_cache_bytes=budget`, must complete;
  for samples, one more sample must fail with OutOfBlocksError. `--verify-layers 1` runs it on a model of the same
  KV shape per layer with 1 layer and a quarter of the budget: every byte figure is per layer times layers, so the
  widths are the same (the tokens are not: it checks the bookkeeping and the cap, not the 4-layer model's beams).

Writes a markdown table, JSON, and a plot (width against budget, one line per configuration and mode, one panel per
shape) next to the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from bench_utils import MODELS, RESULTS_DIR, build_model, run_info, write_json

from paged_generate import OutOfBlocksError, cache_stats, disable_paged_cache, enable_paged_cache
from paged_generate.blocks import BlockAllocator, BlockTables, PartialBlocks
from paged_generate.blocks.sizes import auto_block_size
from paged_generate.budget import CacheBudget
from paged_generate.stats import stock_cache_stats

MIB = 2**20
SHAPE_NAMES = {"1024/128": "", "19/58": "Alpaca", "161/338": "ShareGPT"}
CONFIGS = ("stock", "paged", "paged int8", "paged fp8")
MODES = ("beam", "sample")
GOALS = {"paged": 8, "paged int8": 16, "paged fp8": 16}  # x stock's width at 1024 / 128


def parse_shape(shape: str) -> tuple[int, int]:
    prompt_len, new_tokens = shape.split("/")
    return int(prompt_len), int(new_tokens)


def kv_dtype_of(config: str) -> str:
    return config.split()[1] if " " in config else "auto"


class KVShape:
    """K/V bytes of the 4-layer model in `dtype` (or of `layers` layers of the same shape)."""

    def __init__(self, dtype: torch.dtype, layers: int | None = None):
        spec = MODELS["4-layer"]
        self.layers = layers or spec["num_hidden_layers"]
        self.kv_heads = spec["num_key_value_heads"]
        self.head_dim = spec["hidden_size"] // spec["num_attention_heads"]
        self.element_bytes = dtype.itemsize
        self.bytes_per_token = 2 * self.kv_heads * self.head_dim * self.element_bytes * self.layers

    def budget(self, max_cache_bytes: int, kv_cache_dtype: str) -> CacheBudget:
        """As `enable_paged_cache` builds it for this model."""
        return CacheBudget(max_cache_bytes=max_cache_bytes, elements_per_token=2 * self.kv_heads * self.head_dim *
                           self.layers, element_bytes=self.element_bytes, kv_heads=self.kv_heads * self.layers,
                           kv_cache_dtype=kv_cache_dtype)


def stock_width(kv: KVShape, budget: int, prompt_len: int, new_tokens: int) -> int:
    return budget // ((prompt_len + new_tokens - 1) * kv.bytes_per_token)


def paged_fits(kv: KVShape, budget: int, kv_cache_dtype: str, width: int, prompt_len: int, new_tokens: int,
               block_size: int) -> bool:
    """Whether a call of `width` rows on one prompt completes under the byte cap, by the library's bookkeeping."""
    allocator = BlockAllocator(block_size=block_size, byte_cap=kv.budget(budget, kv_cache_dtype).cap(block_size))
    partial = PartialBlocks(block_size) if kv_cache_dtype != "auto" else None
    tables = BlockTables(allocator, num_rows=1, partial=partial)
    try:
        tables.append(prompt_len)  # the prompt, computed once
        tables.fork(width)  # shared by every row
        for _ in range(new_tokens - 1):  # the last token is returned, never fed back
            tables.append(1)
    except OutOfBlocksError:
        return False
    return True


def largest(fits) -> int:
    """The largest width w >= 0 with fits(w) (fits is monotone), by doubling then bisection."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def generate_kwargs(mode: str, width: int, new_tokens: int) -> dict:
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, return_dict_in_generate=True)
    if mode == "beam":
        return dict(common, num_beams=width, num_return_sequences=1, do_sample=False)
    return dict(common, do_sample=True, num_return_sequences=width)


@torch.no_grad()
def run(model, prompt_len: int, mode: str, width: int, new_tokens: int):
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    return model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs(mode, width, new_tokens))


def verify(model, layers_scale: float, row: dict) -> dict:
    """Run generate() at the row's width under its budget (scaled to the model's layers); see the module docstring."""
    prompt_len, new_tokens = parse_shape(row["shape"])
    budget = int(row["budget_mib"] * MIB * layers_scale)
    width, mode, config = row["width"], row["mode"], row["config"]
    start = time.perf_counter()
    if config == "stock":
        disable_paged_cache(model)
        out = run(model, prompt_len, mode, width, new_tokens)
        cache = out.get("cache") or out.get("past_key_values")
        held = stock_cache_stats(cache, block_size=0).peak_kv_bytes
        return dict(completed=True, measured_kv_bytes=held, within=held <= budget, seconds=time.perf_counter() - start)
    enable_paged_cache(model, max_cache_bytes=budget, kv_cache_dtype=kv_dtype_of(config))
    try:
        run(model, prompt_len, mode, width, new_tokens)
        stats = cache_stats(model)
        result = dict(completed=True, measured_kv_bytes=stats.peak_kv_bytes, block_size=stats.block_size,
                      within=stats.peak_kv_bytes <= budget)
        if mode == "sample":
            try:
                run(model, prompt_len, mode, width + 1, new_tokens)
                result["one_more_refused"] = False
            except OutOfBlocksError:
                result["one_more_refused"] = True
    except OutOfBlocksError as error:
        result = dict(completed=False, error=str(error))
    finally:
        disable_paged_cache(model)
    return dict(result, seconds=time.perf_counter() - start)


def table(rows: list[dict], shapes: list[str], budgets: list[int]) -> str:
    header = ["shape", "KV budget"] + [f"{config} {mode}s" for mode in MODES for config in CONFIGS]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for shape in shapes:
        for budget in budgets:
            cells = [f"{shape} {SHAPE_NAMES.get(shape, '')}".strip(), f"{budget} MiB"]
            for mode in MODES:
                stock = next(r["width"] for r in rows if (r["shape"], r["budget_mib"], r["mode"], r["config"]) ==
                             (shape, budget, mode, "stock"))
                for config in CONFIGS:
                    width = next(r["width"] for r in rows if (r["shape"], r["budget_mib"], r["mode"], r["config"]) ==
                                 (shape, budget, mode, config))
                    ratio = f" ({width / stock:.1f}x)" if config != "stock" and stock else ""
                    cells.append(f"{width}{ratio}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_checks(rows: list[dict]) -> list[tuple[bool, str]]:
    results = []
    for r in rows:
        goal = GOALS.get(r["config"])
        if r["shape"] != "1024/128" or goal is None:
            continue
        ratio = r["width"] / r["stock_width"] if r["stock_width"] else float("inf")
        ok = ratio >= goal
        results.append((ok, f"{'PASS' if ok else 'FAIL'} {r['config']} {r['mode']}s at {r['budget_mib']} MiB: "
                            f"{r['width']} = {ratio:.1f}x stock's {r['stock_width']} (goal >= {goal}x)"))
    return results


def plot(rows: list[dict], shapes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        budgets = sorted({r["budget_mib"] for r in rows})
        # Lines that coincide (samples and guaranteed beams; int8 and fp8) stay visible: markers of different sizes.
        for config, color, marker in zip(CONFIGS, ("black", "tab:blue", "tab:orange", "tab:green"), "osDx"):
            for mode, style, size in zip(MODES, ("-", "--"), (9, 5)):
                points = sorted((r["budget_mib"], r["width"]) for r in rows
                                if (r["shape"], r["config"], r["mode"]) == (shape, config, mode))
                ax.plot(*zip(*points), style, marker=marker, markersize=size, color=color, label=f"{config} {mode}s")
        ax.set(xscale="log", yscale="log", xlabel="KV budget (MiB)", ylabel="largest width that completes",
               title=f"prompt {shape.replace('/', ' / ')} new {SHAPE_NAMES.get(shape, '')}".strip())
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    def csv(kind):
        return lambda text: [kind(item) for item in text.split(",") if item]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=csv(int), default=[16, 64, 256], help="MiB of K/V")
    parser.add_argument("--shapes", type=csv(str), default=["1024/128", "19/58", "161/338"], help="prompt/new tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--verify", default="smallest", choices=["smallest", "all", "none"],
                        help="run generate() at the widths found: for the smallest budget, every budget, or none")
    parser.add_argument("--verify-layers", type=int, default=4, choices=[1, 4])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "capacity.json"))
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kv = KVShape(dtype)
    rows = []
    for shape in args.shapes:
        prompt_len, new_tokens = parse_shape(shape)
        block_size = auto_block_size(prompt_len + new_tokens, shares_rows=True)  # what "auto" picks on CPU
        for budget_mib in args.budgets:
            budget = budget_mib * MIB
            stock = stock_width(kv, budget, prompt_len, new_tokens)
            for mode in MODES:
                for config in CONFIGS:
                    if config == "stock":
                        width, size = stock, None
                    else:
                        size = block_size
                        width = largest(lambda w: paged_fits(kv, budget, kv_dtype_of(config), w, prompt_len,
                                                             new_tokens, block_size))
                    rows.append(dict(shape=shape, shape_name=SHAPE_NAMES.get(shape, ""), budget_mib=budget_mib,
                                     mode=mode, config=config, width=width, stock_width=stock, block_size=size,
                                     method="bound from the cache's shape" if config == "stock" else
                                     "the library's block bookkeeping under the byte cap" +
                                     (" (beams sharing none of their new tokens: a guaranteed width)"
                                      if mode == "beam" else " (exact)")))
    text = table(rows, args.shapes, args.budgets)
    print(text)
    results = goal_checks(rows)
    for _, line in results:
        print(line)
    if args.verify != "none":
        layers_scale = args.verify_layers / kv.layers
        model = build_model("4-layer", dtype=dtype, max_positions=2048)
        if args.verify_layers != kv.layers:
            model.model.layers = model.model.layers[: args.verify_layers]
            model.config.num_hidden_layers = args.verify_layers
            print(f"verifying on a {args.verify_layers}-layer model of the same KV shape per layer, with budgets "
                  f"scaled by {layers_scale:g}: the byte figures are per layer x layers", flush=True)
        smallest = min(args.budgets)
        for row in rows:
            if args.verify == "smallest" and row["budget_mib"] != smallest:
                continue
            row["verified"] = verify(model, layers_scale, row)
            print(f"verified {row['shape']} {row['budget_mib']} MiB {row['config']} {row['mode']}s x{row['width']}: "
                  f"{row['verified']}", flush=True)
            ok = row["verified"]["completed"] and row["verified"]["within"] and \
                row["verified"].get("one_more_refused", True)
            if row["config"] == "stock":
                expected = row["width"] * (sum(parse_shape(row["shape"])) - 1) * kv.bytes_per_token * layers_scale
                ok = ok and row["verified"]["measured_kv_bytes"] == expected
            results.append((ok, f"{'PASS' if ok else 'FAIL'} verified by generate(): {row['shape']} "
                                f"{row['budget_mib']} MiB {row['config']} {row['mode']}s x{row['width']}"))
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot(rows, args.shapes, png)
    write_json(out, {**run_info(), "model": f"4-layer benchmark Llama ({args.dtype})", "kv_bytes_per_token":
                     kv.bytes_per_token, "verify_layers": args.verify_layers, "rows": rows, "table": text,
                     "checks": [dict(passed=ok, line=line) for ok, line in results], "plot": png.name})
    print(f"wrote {out} and {png}")
    return 1 if any(not ok for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
