"""Where shared-prefix (split) attention starts to pay on the PyTorch path: one decode step of one layer, split vs
unsplit, over prefix lengths and group shapes.

    python benchmarks/split_threshold.py [--reps 200] [--out benchmarks/results/split_threshold.json]

Per (heads, rows, group size, shared prefix) case, one layer's decode attention is timed both ways on the same pool:
- split: `shared_prefix_attention` (each group's shared blocks once, each row's own blocks, merged), what the plugin
  runs when the split pays;
- unsplit: every row's K/V gathered through its block table and stock's SDPA (`sdpa_attention_forward`), what it runs
  otherwise (beam rows are not laid out regularly, so they are gathered).
Alternating, median of `--reps`. For each shape the crossover is the smallest prefix from which the split stays faster;
the rule's unit is redundant tokens, (rows - groups) x prefix (see paged_generate/attention/split_rule.py). Prints a table, the largest crossover (the threshold below which the split
never paid) and the constant in use, and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_utils import RESULTS_DIR, run_info, write_json
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from paged_generate.attention.shared_prefix import shared_prefix_attention
from paged_generate.attention.split_rule import SPLIT_MIN_REDUNDANT_TOKENS
from paged_generate.blocks import cdiv
from paged_generate.kernels import group_members
from paged_generate.layout import gather_rows, strided_rows

HEADS = {"4-layer (8/2 heads, dim 32)": (8, 2, 32), "100M (12/4 heads, dim 64)": (12, 4, 64)}
SHAPES = ((4, 4), (8, 8), (16, 8), (32, 8))  # (rows, group size)
PREFIXES = (16, 32, 64, 128, 256, 512, 1024, 2048)
OWN_TOKENS, BLOCK_SIZE = 64, 16


class _Module(torch.nn.Module):
    """What sdpa_attention_forward reads from an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def time_case(heads, rows: int, group: int, prefix: int, reps: int) -> dict:
    num_q_heads, num_kv_heads, head_dim = heads
    groups = rows // group
    prefix_blocks, own_blocks = prefix // BLOCK_SIZE, cdiv(OWN_TOKENS, BLOCK_SIZE)
    generator = torch.Generator().manual_seed(0)
    pools = [torch.randn(groups * prefix_blocks + rows * own_blocks, BLOCK_SIZE, num_kv_heads, head_dim,
                         generator=generator) for _ in range(2)]
    prefix_tables = torch.arange(groups * prefix_blocks).view(groups, prefix_blocks)
    own_tables = (groups * prefix_blocks + torch.randperm(rows * own_blocks, generator=generator)).view(rows, -1)
    row_group = torch.arange(rows) // group
    members = group_members(row_group, groups, max_group_size=group)
    full_tables = torch.cat([prefix_tables[row_group], own_tables], 1)
    query = torch.randn(rows, num_q_heads, 1, head_dim, generator=generator)
    module, scale, seq_len = _Module(num_q_heads // num_kv_heads), head_dim**-0.5, prefix + OWN_TOKENS

    def split():
        prefix_keys = tuple(strided_rows(pool, (0, prefix_blocks), groups, prefix_blocks) for pool in pools)
        return shared_prefix_attention(query, *pools, row_group=row_group, prefix_tables=prefix_tables,
                                       prefix_lens=None, suffix_tables=own_tables, suffix_lens=OWN_TOKENS, scale=scale,
                                       prefix_keys=prefix_keys, members=members, uniform_group_size=group)

    def unsplit():
        key, value = (gather_rows(pool, full_tables, seq_len) for pool in pools)
        return sdpa_attention_forward(module, query, key, value, None, scaling=scale)[0]

    torch.testing.assert_close(split(), unsplit(), atol=1e-4, rtol=1e-4)
    times = {"split": [], "unsplit": []}
    for rep in range(reps):
        for name, run in (("split", split), ("unsplit", unsplit)) if rep % 2 else (("unsplit", unsplit), ("split", split)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    split_us, unsplit_us = (statistics.median(times[name]) * 1e6 for name in ("split", "unsplit"))
    return {"rows": rows, "group": group, "prefix": prefix, "split_us": split_us, "unsplit_us": unsplit_us,
            "redundant_tokens": (rows - groups) * prefix}


def crossover(cases: list[dict]) -> dict | None:
    """The first case (by prefix) from which the split stays faster, or None if it never is."""
    for i, case in enumerate(cases):
        if all(later["split_us"] < later["unsplit_us"] for later in cases[i:]):
            return case
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS_DIR / "split_threshold.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results, crossovers = {}, []
    print("| heads | rows / group | " + " | ".join(f"prefix {p}" for p in PREFIXES) + " | split pays from |")
    print("|---|---|" + "---|" * len(PREFIXES) + "---|")
    for label, heads in HEADS.items():
        for rows, group in SHAPES:
            cases = [time_case(heads, rows, group, prefix, args.reps) for prefix in PREFIXES]
            first = crossover(cases)
            crossovers.append(first["redundant_tokens"] if first else None)
            results[f"{label}, {rows} rows / {group}"] = {"cases": cases, "crossover": first}
            cells = " | ".join(f"{case['split_us'] / case['unsplit_us']:.2f}" for case in cases)
            where = f"{first['prefix']} ({first['redundant_tokens']:,} tokens)" if first else "never"
            print(f"| {label} | {rows} / {group} | {cells} | {where} |", flush=True)
    measured = max((c for c in crossovers if c is not None), default=None)
    print(f"\nCells: split time / unsplit time. Largest crossover: {measured:,} redundant tokens; in use: "
          f"{SPLIT_MIN_REDUNDANT_TOKENS['torch']:,} (paged_generate/attention/split_rule.py).")
    write_json(args.out, {**run_info(), "block_size": BLOCK_SIZE, "own_tokens": OWN_TOKENS, "results": results,
                          "largest_crossover": measured, "in_use": SPLIT_MIN_REDUNDANT_TOKENS["torch"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
