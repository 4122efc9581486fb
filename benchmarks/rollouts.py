"""RL rollouts: a GRPO-shaped batch, stock vs paged with repeated rows vs paged with num_return_sequences.

    python benchmarks/rollouts.py [--prompts 8] [--generations 8] [--prompt-len 512] [--new-tokens 256]
                                  [--repeats 3] [--device cpu] [--out benchmarks/results/rollouts.json]
    python benchmarks/rollouts.py --prompts 2 --generations 2 --prompt-len 32 --new-tokens 8 --repeats 1  # smoke run

TRL's GRPOTrainer (without vLLM) repeats each prompt `generations` times as adjacent rows and samples one completion
per row. Three ways of producing those completions on the 4-layer benchmark model (benchmarks/bench_utils.py, random
weights, fp32), `new-tokens` sampled tokens forced per row:

- stock, repeated rows: stock generate() on the batch as TRL builds it;
- paged, repeated rows: the same call with the plugin on, which computes each distinct prompt once and lets its rows
  share its blocks;
- paged, num_return_sequences: the distinct prompts once, `num_return_sequences=generations`.

The repeated-rows run should take what the num_return_sequences run takes: the same peak KV (the script fails
otherwise) and the same time. Peak KV is the paged cache's blocks in use at the peak; stock's is its `DynamicCache`
at the peak (rows x longest length). The distinct-token bound is the prompts once plus every row's own new tokens (blocks
round it up: the last block of a row is whole).

Each round runs the three ways in rotating order after one warm-up round; the warm-up round also runs stock with
num_return_sequences. Every paged run must give its stock run's tokens (repeated rows against stock repeated rows,
num_return_sequences against stock num_return_sequences), or the script stops without reporting a time. Prints a
markdown table of median seconds and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_utils import RESULTS_DIR, build_model, run_info, write_json

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache

WAYS = ("stock, repeated rows", "paged, repeated rows", "paged, num_return_sequences")


def rollout_inputs(num_prompts: int, generations: int, prompt_len: int, vocab: int, device) -> dict:
    """{"prompts": [num_prompts, prompt_len] ids, "rows": each prompt `generations` times, adjacent (TRL's order)}."""
    prompts = torch.randint(3, vocab, (num_prompts, prompt_len), generator=torch.Generator().manual_seed(1))
    return {"prompts": prompts.to(device), "rows": prompts.repeat_interleave(generations, dim=0).to(device)}


def run_way(model, way: str, inputs: dict, generations: int, new_tokens: int, paged: bool | None = None):
    """(seconds, tokens [rows, prompt_len + new_tokens], CacheStats or None) of one generate() call."""
    paged = way.startswith("paged") if paged is None else paged
    (enable_paged_cache if paged else disable_paged_cache)(model)
    repeated = way.endswith("repeated rows")
    input_ids = inputs["rows"] if repeated else inputs["prompts"]
    kwargs = {} if repeated else dict(num_return_sequences=generations)
    torch.manual_seed(0)
    _synchronize(input_ids.device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    _synchronize(input_ids.device)
    seconds = time.perf_counter() - start
    stats = cache_stats(model) if paged else None
    disable_paged_cache(model)
    return seconds, out, stats


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, args) -> dict:
    inputs = rollout_inputs(args.prompts, args.generations, args.prompt_len, model.config.vocab_size, args.device)
    times = {way: [] for way in WAYS}
    stats, tokens = {}, {}
    for repeat in range(args.repeats + 1):  # round 0 warms up and checks tokens; it is not timed
        shift = repeat % len(WAYS)
        for way in WAYS[shift:] + WAYS[:shift]:
            seconds, tokens[way], way_stats = run_way(model, way, inputs, args.generations, args.new_tokens)
            if way_stats is not None:
                stats[way] = way_stats
            if repeat:
                times[way].append(seconds)
        if repeat == 0:
            _, tokens["stock, num_return_sequences"], _ = run_way(model, "paged, num_return_sequences", inputs,
                                                                  args.generations, args.new_tokens, paged=False)
        for paged_way, stock_way in (("paged, repeated rows", "stock, repeated rows"),
                                     ("paged, num_return_sequences", "stock, num_return_sequences")):
            if not torch.equal(tokens[paged_way], tokens[stock_way]):
                raise SystemExit(f"{paged_way}: tokens differ from {stock_way} in round {repeat}: refusing to report "
                                 f"a time for wrong tokens")
    return {"times": times, "stats": stats}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO's num_generations)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS_DIR / "rollouts.json"))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    model = build_model("4-layer", device=args.device,
                        max_positions=max(4096, args.prompt_len + args.new_tokens))
    result = run(model, args)
    times, stats = result["times"], result["stats"]

    rows = args.prompts * args.generations
    reference = stats["paged, repeated rows"]
    # Stock's DynamicCache at its peak: rows x the longest length (the last sampled token is never written).
    dense = reference.dense_kv_bytes
    bytes_per_token = dense // (rows * reference.max_seq_len)
    bound = (args.prompts * args.prompt_len + rows * (reference.max_seq_len - args.prompt_len)) * bytes_per_token
    stock_s = statistics.median(times["stock, repeated rows"])
    print(f"model: 4-layer, {args.prompts} prompts x {args.generations} generations = {rows} rows, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens sampled; distinct-token bound {bound / 2**20:.2f} MiB "
          f"({1 - bound / dense:.1%} below stock)\n")
    print("| way | rows | prompt forward on | peak KV MiB | KV saving | rounds | median s | stock / this |")
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for way in WAYS:
        way_stats = stats.get(way)
        kv = way_stats.peak_kv_bytes if way_stats else dense
        seconds = statistics.median(times[way])
        table[way] = {"peak_kv_bytes": kv, "saving": 1 - kv / dense,
                      "prefill_rows": way_stats.prefill_rows if way_stats else rows,
                      "median_s": seconds, "speedup": stock_s / seconds, "runs_s": times[way]}
        print(f"| {way} | {rows} | {table[way]['prefill_rows']} | {kv / 2**20:.2f} | {table[way]['saving']:.1%} "
              f"| {len(times[way])} | {seconds:.2f} | {stock_s / seconds:.2f}x |")
    repeated, samples = table["paged, repeated rows"], table["paged, num_return_sequences"]
    ratio = repeated["median_s"] / samples["median_s"]
    print(f"\nrepeated rows vs num_return_sequences: peak KV {repeated['peak_kv_bytes']} vs "
          f"{samples['peak_kv_bytes']} bytes, time ratio {ratio:.3f} (goal: equal KV, time within 5%)")
    write_json(args.out, {**run_info(), "model": "4-layer", "prompts": args.prompts,
                          "generations": args.generations, "prompt_len": args.prompt_len,
                          "new_tokens": args.new_tokens, "device": args.device, "dense_kv_bytes": dense,
                          "distinct_token_bound_bytes": bound, "repeated_over_num_return_sequences_time": ratio,
                          "results": table})
    if repeated["peak_kv_bytes"] != samples["peak_kv_bytes"]:
        print("FAILED: the repeated rows hold more KV than num_return_sequences", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
