"""Time of one decoding forward, stock `DynamicCache` vs `PagedCache`, paired step by step.

    python benchmarks/decode_step.py [--rounds 10] [--model 4-layer|100M] [--cases "NAME;..."]
                                     [--out benchmarks/results/decode_step.json]

End-to-end runs of a short generate() call move by several percent from one run to the next on a shared machine, more
than the plugin's own per-step cost. Here two copies of the 4-layer GQA Llama of benchmarks/speed.py (one stock, one
enabled) decode the same prompt side by side: at every position both take one step, in alternating order, and the
difference of the two times is kept. Prints the median step times and the median of the paired differences per case,
and writes JSON.

A step is what generate() does with the cache per token: one forward, and for beam search the reorder of the cache
(`reorder_cache`, the same random beam indices for both). Beam and sampling cases start from one prompt forked to
the rows as each side does it: stock repeats the prompt (8 identical rows in the prompt forward), the plugin computes
it once and forks its blocks. The enabled copy pages every case (`min_shared_tokens=0`), except the one marked "call
rule (stock cache)": what generate() gives a greedy batch-1 call by default, stock's cache under the plugin's
attention entry.

Wide cases (128 beams, 256 samples at prompt 512) also report the plugin's bookkeeping alone per step: the beam reorder
of the block tables, the step's planning (blocks, copy-on-write) and its metadata tensors, without the model
(`bookkeeping_us`): it is vectorised over rows, so it grows with the width far slower than the forward does.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from bench_utils import RESULTS_DIR, build_model, run_info, write_json
from transformers import DynamicCache

from paged_generate import PagedCache, enable_paged_cache
from paged_generate.blocks.sizes import auto_block_size
from paged_generate.patches.compat import CACHE_KWARG

CASES = {
    # What generate() does by default for this call: the call rule runs it on stock's cache, under the plugin's
    # attention entry (the enabled model, a DynamicCache).
    "greedy, batch 1, prompt 128, 128 steps, call rule (stock cache)": dict(rows=1, prompt_len=128, steps=128,
                                                                          stock_cache=True),
    "greedy, batch 1, prompt 128, 128 steps": dict(rows=1, prompt_len=128, steps=128),
    "greedy, batch 4, prompt 128, 128 steps": dict(rows=4, prompt_len=128, steps=128),
    "4 beams, prompt 32, 128 steps": dict(rows=4, prompt_len=32, steps=128, fork=True, reorder=True),
    "8 beams, prompt 16, 128 steps": dict(rows=8, prompt_len=16, steps=128, fork=True, reorder=True),
    "8 beams, prompt 32, 128 steps": dict(rows=8, prompt_len=32, steps=128, fork=True, reorder=True),
    "8 beams, prompt 128, 128 steps": dict(rows=8, prompt_len=128, steps=128, fork=True, reorder=True),
    "8 samples, prompt 128, 128 steps": dict(rows=8, prompt_len=128, steps=128, fork=True),
    "128 beams, prompt 512, 64 steps": dict(rows=128, prompt_len=512, steps=64, fork=True, reorder=True, wide=True),
    "256 samples, prompt 512, 64 steps": dict(rows=256, prompt_len=512, steps=64, fork=True, wide=True),
}


def call_block_size(case: dict) -> int:
    """The block size generate() gives this case's call under `block_size="auto"` (the default)."""
    return auto_block_size(case["prompt_len"] + case["steps"], shares_rows=case["rows"] > 1)


def bookkeeping_us(case: dict, rounds: int) -> dict:
    """Microseconds per step of the cache's own work for `case`, with no model: reorder (beams), plan, metadata."""
    block_size = call_block_size(case)
    generator = torch.Generator().manual_seed(1)
    rows, per_step = case["rows"], []
    for _ in range(rounds):
        cache = PagedCache(num_layers=1, block_size=block_size)
        layer = cache.layers[0]
        layer.num_written = 0
        cache.step_for(layer, 1, case["prompt_len"])  # the prompt once
        layer.num_written = case["prompt_len"]
        cache.batch_repeat_interleave(rows)
        for _ in range(case["steps"]):
            beam_idx = torch.randint(0, rows, (rows,), generator=generator)
            start = time.perf_counter()
            step = cache.step_for(layer, rows, 1)
            device_step = step.on(torch.device("cpu"))
            _ = device_step.block_tables, device_step.slot_mapping  # built on first use, as attention reads them
            if case.get("reorder"):
                cache.reorder_cache(beam_idx)
            per_step.append((time.perf_counter() - start) * 1e6)
            layer.num_written = step.seq_len
    return {"bookkeeping_us": statistics.median(per_step), "bookkeeping_steps": len(per_step)}


def _start(model, cache, prompt: torch.Tensor, case: dict, label: str) -> None:
    """The prompt forward, as each side runs it: stock on every row, the plugin once per prompt then forked."""
    rows = case["rows"]
    if not case.get("fork"):
        model(prompt, use_cache=True, **{CACHE_KWARG: cache})
    elif label == "stock":
        model(prompt[:1].expand(rows, -1), use_cache=True, **{CACHE_KWARG: cache})
    else:
        model(prompt[:1], use_cache=True, **{CACHE_KWARG: cache})
        cache.batch_repeat_interleave(rows)


def paired_steps(stock_model, paged_model, case: dict, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, stock_model.config.vocab_size, (case["rows"], case["prompt_len"]), generator=generator)
    token = torch.full((case["rows"], 1), 5)
    models = {"stock": stock_model, "paged": paged_model}
    times = {"stock": [], "paged": []}
    differences = []
    with torch.no_grad():
        for _ in range(rounds):
            caches = {"stock": DynamicCache(config=stock_model.config),
                      "paged": (DynamicCache(config=paged_model.config) if case.get("stock_cache")
                                else PagedCache.from_model(paged_model, block_size=call_block_size(case)))}
            if not case.get("fork") and not case.get("stock_cache"):
                # What generate() tells the cache of a call whose rows share nothing: how long the rows will grow.
                caches["paged"].expected_seq_len = case["prompt_len"] + case["steps"]
            for label in models:
                _start(models[label], caches[label], prompt, case, label)
            for step in range(case["steps"]):
                position = torch.full((case["rows"], 1), case["prompt_len"] + step)
                beam_idx = torch.randint(0, case["rows"], (case["rows"],), generator=generator)
                seconds = {}
                for label in ("stock", "paged") if step % 2 else ("paged", "stock"):
                    start = time.perf_counter()
                    models[label](token, use_cache=True, position_ids=position, cache_position=position[0],
                                  **{CACHE_KWARG: caches[label]})
                    if case.get("reorder"):
                        caches[label].reorder_cache(beam_idx)
                    seconds[label] = time.perf_counter() - start
                for label in models:
                    times[label].append(seconds[label] * 1e6)
                differences.append((seconds["paged"] - seconds["stock"]) * 1e6)
    stock_us, paged_us = statistics.median(times["stock"]), statistics.median(times["paged"])
    extra_us = statistics.median(differences)
    return {"stock_us": stock_us, "paged_us": paged_us, "paired_extra_us": extra_us,
            "paired_extra_fraction": extra_us / stock_us, "steps_timed": len(differences)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="prompts decoded per case (each a fresh pair of caches)")
    parser.add_argument("--model", choices=("4-layer", "100M"), default="4-layer")
    parser.add_argument("--cases", default=";".join(CASES), help="case names separated by ;")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/decode_step.json, or "
                                      "decode_step_100M.json)")
    args = parser.parse_args(argv)
    out = args.out or str(RESULTS_DIR / ("decode_step.json" if args.model == "4-layer" else "decode_step_100M.json"))
    stock_model = build_model(args.model)
    paged_model = copy.deepcopy(stock_model)
    enable_paged_cache(paged_model, min_shared_tokens=0)  # the paged path's steps, whatever the call rule
    results = {}
    print("| case | steps timed | stock us / step (median) | paged us / step (median) "
          "| paged - stock, paired (median) | bookkeeping us / step |")
    print("|---|---|---|---|---|---|")
    for name in args.cases.split(";"):
        case = CASES[name]
        result = results[name] = paired_steps(stock_model, paged_model, case, args.rounds)
        if case.get("wide"):
            result.update(bookkeeping_us(case, args.rounds))
        bookkeeping = f"{result['bookkeeping_us']:.0f}" if "bookkeeping_us" in result else "-"
        print(f"| {name} | {result['steps_timed']} | {result['stock_us']:.0f} | {result['paged_us']:.0f} "
              f"| {result['paired_extra_us']:+.0f} us ({100 * result['paired_extra_fraction']:+.1f}%) "
              f"| {bookkeeping} |", flush=True)
    write_json(out, {**run_info(), "model": args.model, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
