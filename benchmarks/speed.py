"""End-to-end generate() time, stock transformers vs paged-generate, in one process with alternating runs.

    python benchmarks/speed.py [--repeats 5] [--cases NAME,...] [--kv-cache-dtype auto|int8|fp8] [--out ...]
    python benchmarks/speed.py --sweep 4-layer|100M [--repeats 3] [--prompts 16,32,...]
                               [--out benchmarks/results/speed_sweep_4-layer.json]
    python benchmarks/speed.py ... --min-shared-tokens 0   # every call paged, whatever the call rule says

Models (random weights, fp32, benchmarks/bench_utils.py): the 4-layer GQA Llama (hidden 256, 8 q-heads, 2 kv-heads)
and a ~100M-parameter Llama shape (12 layers, hidden 768, 12 q-heads, 4 kv-heads). Without `--sweep`, the named cases
run on the 4-layer model; `--sweep` runs prompts of 16, 32, 128, 512 and 2048 tokens x (4 beams, 8 beams, 8 samples)
on one model (128 new tokens on the 4-layer model, 64 on the 100M one).

Each case runs `--repeats` rounds after one warm-up round; a round runs stock and paged back to back, in alternating
order. Every round's paged tokens must equal stock's, or the script stops without reporting a time for wrong tokens.
Prints a markdown table of median seconds and the ratio stock / paged, and writes JSON. The "call" column says how
the plugin ran the call: paged, or on stock's cache where the call rule (paged_generate/call_rule.py) found its rows
share too few prompt tokens for paging to pay. `--min-shared-tokens 0` pages every call (the paged path's own time).

`--kv-cache-dtype int8` / `fp8` times paged with compressed blocks, and paged with full-precision blocks ("auto") in
the same rounds, for the ratio between them. Compressed blocks are lossy: their share of tokens equal to stock is
reported instead of refusing a time (with "auto", paged must give stock's tokens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_utils import RESULTS_DIR, build_model, run_info, write_json

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache

CASES = {
    "prompt 2048 / 8 beams / 128 new": dict(prompt_len=2048, new_tokens=128, num_beams=8),
    "prompt 2048 / 8 samples / 128 new": dict(prompt_len=2048, new_tokens=128, do_sample=True, num_return_sequences=8),
    "prompt 128 / greedy batch 1 / 128 new": dict(prompt_len=128, new_tokens=128, rounds_factor=4),
}
# A short case runs more rounds: a shared machine's hiccups are a larger share of a 0.4 s run than of a 3 s one.

SWEEP_PROMPTS = (16, 32, 128, 512, 2048)
SWEEP_MODES = {"4 beams": dict(num_beams=4), "8 beams": dict(num_beams=8),
               "8 samples": dict(do_sample=True, num_return_sequences=8)}
SWEEP_NEW_TOKENS = {"4-layer": 128, "100M": 64}
_NOT_GENERATE_KWARGS = ("prompt_len", "new_tokens", "rounds_factor")


def sweep_cases(model_name: str, prompts=SWEEP_PROMPTS) -> dict:
    new_tokens = SWEEP_NEW_TOKENS[model_name]
    return {f"prompt {prompt} / {mode} / {new_tokens} new": dict(prompt_len=prompt, new_tokens=new_tokens, **kwargs)
            for prompt in prompts for mode, kwargs in SWEEP_MODES.items()}


def time_generate(model, input_ids, case) -> tuple[float, torch.Tensor]:
    kwargs = {k: v for k, v in case.items() if k not in _NOT_GENERATE_KWARGS}
    torch.manual_seed(0)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=case["new_tokens"],
                         min_new_tokens=case["new_tokens"], pad_token_id=0, **kwargs)
    return time.perf_counter() - start, out


def run_case(model, case, repeats: int, kv_cache_dtype: str = "auto", min_shared_tokens: int | None = None) -> dict:
    input_ids = torch.randint(3, model.config.vocab_size, (1, case["prompt_len"]),
                              generator=torch.Generator().manual_seed(1))
    labels = ["stock", "paged"] + (["paged_auto"] if kv_cache_dtype != "auto" else [])
    times = {label: [] for label in labels}
    equal, paged_calls = [], []
    repeats *= case.get("rounds_factor", 1)
    for repeat in range(repeats + 1):  # the first round warms up every path and is dropped
        outputs = {}
        for label in labels if repeat % 2 == 0 else labels[::-1]:
            if label == "stock":
                disable_paged_cache(model)
            else:
                enable_paged_cache(model, kv_cache_dtype=kv_cache_dtype if label == "paged" else "auto",
                                   min_shared_tokens=min_shared_tokens)
            seconds, outputs[label] = time_generate(model, input_ids, case)
            if label == "paged":
                paged_calls.append(cache_stats(model).paged)
            if repeat:
                times[label].append(seconds)
        disable_paged_cache(model)
        exact = outputs["paged_auto"] if kv_cache_dtype != "auto" else outputs["paged"]
        if not torch.equal(outputs["stock"], exact):
            raise SystemExit(f"paged output differs from stock in round {repeat}: refusing to report a time for wrong "
                             f"tokens")
        equal.append((outputs["paged"] == outputs["stock"]).float().mean().item())
    stock, paged = statistics.median(times["stock"]), statistics.median(times["paged"])
    # Rounds run back to back, so the ratio within a round is less exposed to the machine's slow drifts.
    round_ratios = [s / p for s, p in zip(times["stock"], times["paged"])]
    result = {"kv_cache_dtype": kv_cache_dtype, "stock_s": stock, "paged_s": paged, "speedup": stock / paged,
              "median_round_speedup": statistics.median(round_ratios), "stock_runs": times["stock"],
              "paged_runs": times["paged"],
              "tokens_equal_stock": statistics.mean(equal),
              # False: the call rule ran the call on stock's cache (too few shared prompt tokens to pay)
              "paged_call": all(paged_calls)}
    if kv_cache_dtype != "auto":
        auto = statistics.median(times["paged_auto"])
        result.update(paged_auto_s=auto, auto_over_paged=auto / paged, paged_auto_runs=times["paged_auto"])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (without --sweep)")
    parser.add_argument("--sweep", choices=sorted(SWEEP_NEW_TOKENS), help="run the prompt-length sweep on this model")
    parser.add_argument("--prompts", default=",".join(map(str, SWEEP_PROMPTS)),
                        help="the sweep's prompt lengths, comma-separated")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "int8", "fp8"), default="auto",
                        help="paged blocks: auto (the model's dtype) or compressed")
    parser.add_argument("--min-shared-tokens", type=int, default=None,
                        help="enable_paged_cache's min_shared_tokens (default: the measured rule; 0 pages every call)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/speed.json, or speed_sweep_MODEL.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model_name = args.sweep or "4-layer"
    model = build_model(model_name)
    if args.sweep:
        cases = sweep_cases(args.sweep, [int(prompt) for prompt in args.prompts.split(",")])
    else:
        cases = {name: CASES[name] for name in args.cases.split(",")}
    suffix = "" if args.min_shared_tokens is None else f"_min_shared_{args.min_shared_tokens}"
    name = f"speed_sweep_{args.sweep}" if args.sweep else "speed"
    out = args.out or str(RESULTS_DIR / f"{name}{suffix}.json")
    results = {}
    print(f"model: {model_name}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters\n")
    compressed = args.kv_cache_dtype != "auto"
    extra = " paged auto s | paged auto / paged | tokens = stock |" if compressed else ""
    print(f"| case | rounds | stock s (median) | paged s (median) | stock / paged | median of per-round ratios | "
          f"call |{extra}")
    print("|---|---|---|---|---|---|---|" + "---|" * (3 if compressed else 0))
    for name, case in cases.items():
        result = results[name] = run_case(model, case, args.repeats, args.kv_cache_dtype, args.min_shared_tokens)
        line = (f"| {name} | {len(result['stock_runs'])} | {result['stock_s']:.2f} | {result['paged_s']:.2f} "
                f"| {result['speedup']:.2f}x | {result['median_round_speedup']:.2f}x "
                f"| {'paged' if result['paged_call'] else 'stock cache'} |")
        if compressed:
            line += (f" {result['paged_auto_s']:.2f} | {result['auto_over_paged']:.2f}x | "
                     f"{result['tokens_equal_stock']:.0%} |")
        print(line, flush=True)
        write_json(out, {**run_info(), "model": model_name, "kv_cache_dtype": args.kv_cache_dtype,
                         "min_shared_tokens": args.min_shared_tokens,
                         "results": results})  # after each case: a long sweep
    return 0


if __name__ == "__main__":
    sys.exit(main())
