"""Prefix caching across generate() calls: a shared document, a few-shot prefix, two models on one pool.

    python benchmarks/prefix_reuse.py [--context 2048] [--questions 16] [--question-len 16] [--new-tokens 32]
                                      [--fewshot 1024] [--fewshot-questions 64] [--batch 8] [--repeats 3]
                                      [--device cpu] [--out benchmarks/results/prefix_reuse.json]
    python benchmarks/prefix_reuse.py --parts c  # (c) only: bytes, no timings
    python benchmarks/prefix_reuse.py --context 64 --questions 3 --new-tokens 4 --fewshot 48 --fewshot-questions 8 \
        --batch 4 --repeats 1  # smoke run

On the 4-layer benchmark model (benchmarks/bench_utils.py, random weights, fp32), greedy:

(a) document: a `context`-token document, then `questions` questions about it, one generate() call each
    (`new-tokens` new tokens). Time to first token (the prompt forward, until the first logits) and total time of
    the calls, for stock generate(), the plugin without a pool (whose call rule runs calls sharing nothing across
    rows on stock's cache), and the plugin with a `KVPool` (prefix caching, every call paged): its first call
    computes the document, the later ones only their question.
(b) few-shot: a `fewshot`-token prefix and `fewshot-questions` questions, in generate() calls of `batch` rows each.
    The questions have one length: left padding would shift the prefix across block boundaries, and rows padded
    differently share no cached block.
(c) memory: two models (different weights) answering the document questions in turn, each on a private pool, or
    both on one pool, without and with a budget. KV bytes held after the calls (cached blocks), the most storage the
    pools held at once, and the prompt tokens served from the cache.

Each timed way runs once untimed first. Every pooled call must give stock's tokens, or the script stops without
reporting a time. Each round starts from a fresh pool (its first call computes the whole prompt). Prints markdown
tables of median seconds and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_utils import RESULTS_DIR, build_model, run_info, write_json
from transformers import LogitsProcessor, LogitsProcessorList

from paged_generate import KVPool, cache_stats, disable_paged_cache, enable_paged_cache

WAYS = ("stock", "paged, no pool", "paged, KVPool")


class FirstLogits(LogitsProcessor):
    """Notes when generate() first has logits: the end of the prompt forward (time to first token)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            _synchronize(scores.device)
            self.at = time.perf_counter()
        return scores


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(length: int, seed: int, vocab: int, device, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed)).to(device)


def _set_way(model, way: str, pool: KVPool | None = None) -> None:
    disable_paged_cache(model)
    if way == "paged, no pool":
        enable_paged_cache(model)
    elif way == "paged, KVPool":
        enable_paged_cache(model, pool=pool)


def timed_calls(model, way: str, prompts: list[torch.Tensor], new_tokens: int):
    """Each prompt in its own generate() call: (time to first token per call, seconds per call, tokens per call,
    prompt tokens served from the cache per call)."""
    _set_way(model, way, KVPool())
    ttft, seconds, outputs, hits = [], [], [], []
    for input_ids in prompts:
        first = FirstLogits()
        _synchronize(input_ids.device)
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, pad_token_id=0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             logits_processor=LogitsProcessorList([first]))
        _synchronize(input_ids.device)
        seconds.append(time.perf_counter() - start)
        ttft.append(first.at - start)
        outputs.append(out)
        hits.append(cache_stats(model).prefix_hit_tokens if way == "paged, KVPool" else 0)
    disable_paged_cache(model)
    return ttft, seconds, outputs, hits


def compare(model, name: str, prompts: list[torch.Tensor], args) -> dict:
    """Rounds of every way on `prompts`; the medians of their totals, and the pooled calls' cache hits."""
    totals = {way: {"ttft_s": [], "total_s": [], "first_call_ttft_s": [], "later_calls_ttft_s": []} for way in WAYS}
    hit_tokens = None
    for repeat in range(args.repeats + 1):  # round 0 warms up and checks tokens; it is not timed
        shift = repeat % len(WAYS)
        tokens = {}
        for way in WAYS[shift:] + WAYS[:shift]:
            ttft, seconds, tokens[way], hits = timed_calls(model, way, prompts, args.new_tokens)
            if way == "paged, KVPool":
                hit_tokens = hits
            if repeat:
                totals[way]["ttft_s"].append(statistics.mean(ttft))
                totals[way]["first_call_ttft_s"].append(ttft[0])
                totals[way]["later_calls_ttft_s"].append(statistics.mean(ttft[1:]) if len(ttft) > 1 else ttft[0])
                totals[way]["total_s"].append(sum(seconds))
        for way in WAYS[1:]:
            if not all(torch.equal(a, b) for a, b in zip(tokens[way], tokens["stock"])):
                raise SystemExit(f"{name}, {way}: tokens differ from stock in round {repeat}: refusing to report a "
                                 f"time for wrong tokens")
    table = {way: {key: statistics.median(values) for key, values in figures.items()} | {"runs": figures}
             for way, figures in totals.items()}
    stock = table["stock"]
    print(f"\n({name}) {len(prompts)} calls, {prompts[0].shape[0]} rows x {prompts[0].shape[1]} prompt tokens each, "
          f"{args.new_tokens} new tokens; prompt tokens served from the pool's cache per call: {hit_tokens}\n")
    print("| way | mean time to first token s | later calls' TTFT s | total s | stock TTFT / this | "
          "stock total / this |")
    print("|---|---|---|---|---|---|")
    for way, row in table.items():
        row["ttft_speedup"] = stock["ttft_s"] / row["ttft_s"]
        row["total_speedup"] = stock["total_s"] / row["total_s"]
        print(f"| {way} | {row['ttft_s']:.4f} | {row['later_calls_ttft_s']:.4f} | {row['total_s']:.3f} | "
              f"{row['ttft_speedup']:.2f}x | {row['total_speedup']:.2f}x |")
    return {"calls": len(prompts), "rows": prompts[0].shape[0], "prompt_len": prompts[0].shape[1],
            "prefix_hit_tokens": hit_tokens, "results": table}


def memory(models, prompts: list[torch.Tensor], args) -> dict:
    """(c): the two models answer in turn; KV bytes their pools hold, three ways."""
    block_bytes = 16 * sum(_bytes_per_token(model) for model in models[:1])
    one_model_peak = None
    results = {}
    for way in ("two private pools", "one shared pool", "one shared pool, budget"):
        if way == "two private pools":
            pools = [KVPool(), KVPool()]
        else:
            budget = None if way == "one shared pool" else int(one_model_peak * 1.25) // block_bytes * block_bytes
            pools = [KVPool(max_cache_bytes=budget)] * 2
        for model, pool in zip(models, pools):
            enable_paged_cache(model, pool=pool)
        distinct = list({id(pool): pool for pool in pools}.values())
        peak_storage, hits = 0, 0
        for input_ids in prompts:
            for model in models:
                model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, pad_token_id=0,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
                hits += cache_stats(model).prefix_hit_tokens
                peak_storage = max(peak_storage, sum(pool.stats().storage_bytes for pool in distinct))
        stats = [pool.stats() for pool in distinct]
        if way == "two private pools":
            one_model_peak = max(stats[0].storage_bytes, stats[1].storage_bytes)
        results[way] = {"bytes_held": sum(s.bytes_held for s in stats), "cached_blocks": sum(s.cached_blocks
                                                                                                for s in stats),
                        "peak_storage_bytes": peak_storage, "prefix_hit_tokens": hits,
                        "evictions": sum(s.evictions for s in stats),
                        "max_cache_bytes": stats[0].max_cache_bytes if len(stats) == 1 else None}
        for model in models:
            disable_paged_cache(model)
    print(f"\n(c) two models, {len(prompts)} document questions each, in turn\n")
    print("| pools | budget MiB | KV held after MiB | peak storage MiB | prompt tokens from cache | evictions |")
    print("|---|---|---|---|---|---|")
    for way, row in results.items():
        budget = f"{row['max_cache_bytes'] / 2**20:.2f}" if row["max_cache_bytes"] else "none"
        print(f"| {way} | {budget} | {row['bytes_held'] / 2**20:.2f} | {row['peak_storage_bytes'] / 2**20:.2f} | "
              f"{row['prefix_hit_tokens']} | {row['evictions']} |")
    return results


def _bytes_per_token(model) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize * config.num_hidden_layers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048, help="tokens of the shared document, (a) and (c)")
    parser.add_argument("--questions", type=int, default=16, help="questions about the document, (a) and (c)")
    parser.add_argument("--question-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fewshot", type=int, default=1024, help="tokens of the few-shot prefix, (b)")
    parser.add_argument("--fewshot-questions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="rows per generate() call, (b)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run, e.g. 'c' for the bytes only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS_DIR / "prefix_reuse.json"))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    positions = max(4096, args.context + args.fewshot + args.question_len + args.new_tokens)
    model = build_model("4-layer", device=args.device, max_positions=positions)
    vocab, device = model.config.vocab_size, args.device

    document = _tokens(args.context, 1, vocab, device)
    doc_prompts = [torch.cat([document, _tokens(args.question_len, 100 + i, vocab, device)], 1)
                   for i in range(args.questions)]
    prefix = _tokens(args.fewshot, 2, vocab, device)
    fewshot_prompts = [torch.cat([prefix.expand(args.batch, -1),
                                  _tokens(args.question_len, 1000 + i, vocab, device, rows=args.batch)], 1)
                       for i in range(-(-args.fewshot_questions // args.batch))]
    print(f"model: 4-layer, fp32, {device}, greedy")
    document_result = compare(model, "a: document", doc_prompts, args) if "a" in args.parts else None
    fewshot_result = compare(model, "b: few-shot", fewshot_prompts, args) if "b" in args.parts else None
    memory_result = None
    if "c" in args.parts:
        second = build_model("4-layer", seed=1, device=args.device, max_positions=positions)
        memory_result = memory([model, second], doc_prompts, args)
    write_json(args.out, {**run_info(), "model": "4-layer", "device": args.device, "context": args.context,
                          "questions": args.questions, "question_len": args.question_len,
                          "new_tokens": args.new_tokens, "fewshot": args.fewshot,
                          "fewshot_questions": args.fewshot_questions, "batch": args.batch,
                          "document": document_result, "fewshot_batches": fewshot_result, "memory": memory_result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
