"""KV saving and CPU time against the block size, on the embedded trained model and held-out Python prompts cut to the
PagedAttention paper's shapes.

    python benchmarks/block_size.py [--prompts 16] [--block-sizes 1,4,8,16,32,auto] [--widths 2,4,6]
                                    [--shapes 19/58,161/338] [--modes beam,sample] [--threads 1] [--quick]
                                    [--out benchmarks/results/block_size.json]

Model: tiny-python-llama (paged_generate/assets), loaded as the demo loads it (fp32). Prompts: `--prompts` windows of
the held-out attrs source (benchmarks/data/heldout, as benchmarks/quality.py reads it) at evenly spaced positions, cut
to the shape's prompt length; exactly the shape's new tokens (min_new_tokens = max_new_tokens). Beam search, or
sampling (temperature 0.8, top-k 50, seeded) with `num_return_sequences` = width.

For each (shape, mode, width) stock runs every prompt once, then paged at each block size ("auto": the default, which
`enable_paged_cache` resolves per call); every paged run must give stock's tokens. KV saving = 1 - (paged peak KV
bytes summed over the prompts) / (stock's KV bytes summed), from `cache_stats`. Sampling is also held against the
distinct-token bound (the prompt once plus every sample's own tokens): "slack / row" is how many token slots per row
the blocks hold beyond that bound at the peak (the worst prompt). Seconds are summed over the prompts (stock and paged
back to back; they only mean something on a quiet machine).

Checks (exit 1 when one fails), at the default block size: beam search saves more than the paper's Figure 15 at every
width of both shapes (width 2 against the low end of the paper's range, wider against its top end), and sampling holds
at most one block per row beyond the distinct-token bound.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_utils import RESULTS_DIR, run_info, write_json
from quality import heldout_tokens

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache
from paged_generate.demo import load_model

SHAPE_NAMES = {"19/58": "Alpaca", "161/338": "ShareGPT"}
# vLLM paper (Kwon et al. 2023) Figure 15: memory saved by sharing, widths 2-6 (low end at width 2, top at width 6).
PAPER = {("19/58", "beam"): (0.376, 0.552), ("161/338", "beam"): (0.443, 0.663),
         ("19/58", "sample"): (0.061, 0.098), ("161/338", "sample"): (0.162, 0.305)}
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=50)
SEED = 0


def prompts_of(tokens: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` prompts [1, length] starting at evenly spaced positions of the held-out tokens."""
    starts = torch.linspace(0, len(tokens) - length - 1, count).long()
    return [tokens[s : s + length][None] for s in starts.tolist()]


def generate_kwargs(mode: str, width: int, new_tokens: int) -> dict:
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=1)
    if mode == "beam":
        return dict(common, num_beams=width, num_return_sequences=1, do_sample=False)
    return dict(common, num_return_sequences=width, **SAMPLING)


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, float]:
    torch.manual_seed(SEED)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out, time.perf_counter() - start


def paper_anchor(shape: str, mode: str, width: int) -> float | None:
    """The paper's figure a run at `width` is held against: the range's low end at width 2, its top end wider."""
    low_high = PAPER.get((shape, mode))
    return None if low_high is None else low_high[0] if width <= 2 else low_high[1]


def measure(model, prompts: list[torch.Tensor], shape: str, mode: str, width: int, block_sizes: list) -> list[dict]:
    """One row per block size for this (shape, mode, width)."""
    prompt_len, new_tokens = parse_shape(shape)
    kwargs = generate_kwargs(mode, width, new_tokens)
    disable_paged_cache(model)
    stock, stock_s = [], 0.0
    for ids in prompts:
        out, seconds = timed_generate(model, ids, kwargs)
        stock.append(out)
        stock_s += seconds
    rows = []
    for block_size in block_sizes:
        enable_paged_cache(model, block_size=block_size, min_shared_tokens=0)  # paged whatever the call rule
        paged_bytes = dense_bytes = 0
        paged_s, slack, resolved = 0.0, 0.0, set()
        try:
            for ids, reference in zip(prompts, stock):
                out, seconds = timed_generate(model, ids, kwargs)
                if not torch.equal(out, reference):
                    raise SystemExit(f"paged tokens differ from stock at {shape} {mode} width {width} block size "
                                     f"{block_size}: refusing to report figures for wrong tokens")
                paged_s += seconds
                stats = cache_stats(model)
                paged_bytes += stats.peak_kv_bytes
                dense_bytes += stats.dense_kv_bytes
                resolved.add(stats.block_size)
                token_bytes = stats.dense_kv_bytes // (stats.rows * stats.max_seq_len)
                bound_tokens = prompt_len + stats.rows * (stats.max_seq_len - prompt_len)
                slack = max(slack, (stats.peak_kv_bytes / token_bytes - bound_tokens) / stats.rows)
        finally:
            disable_paged_cache(model)
        seq_len = prompt_len + new_tokens - 1  # tokens a row's cache holds at the end
        bound = 1 - (prompt_len + width * (seq_len - prompt_len)) / (width * seq_len)
        rows.append(dict(
            shape=shape, shape_name=SHAPE_NAMES.get(shape, ""), mode=mode, width=width, block_size=block_size,
            resolved_block_sizes=sorted(resolved), prompts=len(prompts), saving=1 - paged_bytes / dense_bytes,
            paged_kv_bytes_per_call=paged_bytes / len(prompts), stock_kv_bytes_per_call=dense_bytes / len(prompts),
            distinct_token_bound_saving=bound if mode == "sample" else None,
            slack_tokens_per_row=slack if mode == "sample" else None,
            paper=paper_anchor(shape, mode, width), stock_s=stock_s, paged_s=paged_s, stock_over_paged=stock_s / paged_s,
        ))
        print(f"  {shape} {mode} width {width} block size {block_size}: saving {rows[-1]['saving']:.1%}",
              file=sys.stderr, flush=True)
    return rows


def parse_shape(shape: str) -> tuple[int, int]:
    prompt_len, new_tokens = shape.split("/")
    return int(prompt_len), int(new_tokens)


def label(block_size) -> str:
    return str(block_size)


def auto_label(rows: list[dict], shape: str, mode: str) -> str:
    sizes = sorted({s for r in rows if (r["shape"], r["mode"], r["block_size"]) == (shape, mode, "auto")
                    for s in r["resolved_block_sizes"]})
    return f"auto ({'/'.join(map(str, sizes))})" if sizes else "auto"


def saving_table(rows: list[dict], block_sizes: list) -> str:
    """Saving per (shape, mode, width) across block sizes, with the paper's figure and (sampling) the bound."""
    header = ["shape", "mode", "width"] + [f"bs {label(b)}" for b in block_sizes] + ["paper (Fig. 15)",
                                                                                     "distinct-token bound"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    keys = sorted({(r["shape"], r["mode"], r["width"]) for r in rows}, key=lambda k: (parse_shape(k[0]), k[1], k[2]))
    for shape, mode, width in keys:
        cells = [f"{shape} {SHAPE_NAMES.get(shape, '')}".strip(), mode, str(width)]
        bound = None
        for block_size in block_sizes:
            row = next((r for r in rows if (r["shape"], r["mode"], r["width"], r["block_size"])
                        == (shape, mode, width, block_size)), None)
            if row is None:
                cells.append("-")
                continue
            bound = row["distinct_token_bound_saving"]
            text = f"{row['saving']:.1%}"
            if block_size == "auto":
                text += f" ({'/'.join(map(str, row['resolved_block_sizes']))})"
            cells.append(text)
        anchor = paper_anchor(shape, mode, width)
        cells.append(f"{anchor:.1%}" if anchor is not None else "-")
        cells.append(f"{bound:.1%}" if bound is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(rows: list[dict]) -> str:
    header = ["shape", "mode", "width", "block size", "paged KV KiB / call", "stock KV KiB / call", "saving",
              "slack / row (tokens)", "stock s", "paged s", "stock / paged"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * (len(header) - 4)]
    for r in rows:
        size = label(r["block_size"])
        if r["block_size"] == "auto":
            size += f" ({'/'.join(map(str, r['resolved_block_sizes']))})"
        slack = f"{r['slack_tokens_per_row']:.1f}" if r["slack_tokens_per_row"] is not None else "-"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['width']} | {size} | {r['paged_kv_bytes_per_call'] / 1024:.1f} "
                     f"| {r['stock_kv_bytes_per_call'] / 1024:.1f} | {r['saving']:.1%} | {slack} | {r['stock_s']:.2f} "
                     f"| {r['paged_s']:.2f} | {r['stock_over_paged']:.2f}x |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[tuple[bool, str]]:
    """At the default ("auto") block size: beams beat the paper, samples within one block per row of the bound."""
    results = []
    for r in rows:
        if r["block_size"] != "auto":
            continue
        where = f"{r['shape']} {r['mode']} width {r['width']} (block size {'/'.join(map(str, r['resolved_block_sizes']))})"
        if r["mode"] == "beam" and r["paper"] is not None:
            ok = r["saving"] > r["paper"]
            results.append((ok, f"{'PASS' if ok else 'FAIL'} beam saving {r['saving']:.1%} > paper {r['paper']:.1%} at "
                                f"{where}"))
        if r["mode"] == "sample":
            one_block = max(r["resolved_block_sizes"])
            ok = r["slack_tokens_per_row"] <= one_block
            results.append((ok, f"{'PASS' if ok else 'FAIL'} sampling holds {r['slack_tokens_per_row']:.1f} tokens / row "
                                f"beyond the distinct-token bound (<= one block, {one_block}) at {where}"))
    return results


def main(argv=None) -> int:
    def csv(kind):
        return lambda text: [kind(item) for item in text.split(",") if item]

    def size(text: str):
        return text if text == "auto" else int(text)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per shape")
    parser.add_argument("--block-sizes", type=csv(size), default=[1, 4, 8, 16, 32, "auto"])
    parser.add_argument("--widths", type=csv(int), default=[2, 4, 6])
    parser.add_argument("--shapes", type=csv(str), default=["19/58", "161/338"], help="prompt/new tokens")
    parser.add_argument("--modes", type=csv(str), default=["beam", "sample"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 prompts, the shapes cut to a tenth")
    parser.add_argument("--out", default=str(RESULTS_DIR / "block_size.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts = 2
        args.shapes = [f"{max(p // 10, 2)}/{max(n // 10, 2)}" for p, n in map(parse_shape, args.shapes)]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    tokens = heldout_tokens(tokenizer)
    rows, start = [], time.perf_counter()
    for shape in args.shapes:
        prompts = prompts_of(tokens, args.prompts, parse_shape(shape)[0])
        for mode in args.modes:
            for width in args.widths:
                rows += measure(model, prompts, shape, mode, width, args.block_sizes)
    saving, detail, results = saving_table(rows, args.block_sizes), detail_table(rows), checks(rows)
    print(saving, "\n", detail, sep="\n")
    for _, line in results:
        print(line)
    write_json(args.out, {**run_info(), "model": "tiny-python-llama (fp32)", "prompts": args.prompts,
                          "sampling": SAMPLING, "seed": SEED, "wall_seconds": time.perf_counter() - start,
                          "rows": rows, "saving_table": saving, "detail_table": detail,
                          "checks": [dict(passed=ok, line=line) for ok, line in results]})
    print(f"wrote {args.out}")
    return 1 if any(not ok for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
