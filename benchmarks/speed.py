"""End-to-end generate() time, stock transformers vs paged-generate, in one process with alternating runs.

    python benchmarks/speed.py [--repeats 5] [--out benchmarks/results/speed.json]

Model: the 4-layer GQA Llama of benchmarks/memory.py (hidden 256, 8 q-heads, 2 kv-heads), random weights, fp32.
Prints a markdown table of median seconds (and the ratio stock / paged) and writes JSON. `--repeats` rounds per case
(the short greedy case runs 4x as many), after one warm-up round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0]: its kernels.py would shadow the `kernels` package transformers probes.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from paged_generate import disable_paged_cache, enable_paged_cache

CASES = {
    "prompt 2048 / 8 beams / 128 new": dict(prompt_len=2048, new_tokens=128, num_beams=8),
    "prompt 2048 / 8 samples / 128 new": dict(prompt_len=2048, new_tokens=128, do_sample=True, num_return_sequences=8),
    "prompt 128 / greedy batch 1 / 128 new": dict(prompt_len=128, new_tokens=128, rounds_factor=4),
}
# A short case runs more rounds: a shared machine's hiccups are a larger share of a 0.4 s run than of a 3 s one.


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def time_generate(model, input_ids, case) -> tuple[float, torch.Tensor]:
    kwargs = {k: v for k, v in case.items() if k not in ("prompt_len", "new_tokens", "rounds_factor")}
    torch.manual_seed(0)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=case["new_tokens"],
                         min_new_tokens=case["new_tokens"], pad_token_id=0, **kwargs)
    return time.perf_counter() - start, out


def run_case(model, case, repeats: int) -> dict:
    input_ids = torch.randint(3, model.config.vocab_size, (1, case["prompt_len"]), generator=torch.Generator().manual_seed(1))
    times = {"stock": [], "paged": []}
    outputs = {}
    repeats *= case.get("rounds_factor", 1)
    for repeat in range(repeats + 1):  # the first round warms up both paths and is dropped
        for label in ("stock", "paged") if repeat % 2 == 0 else ("paged", "stock"):
            (enable_paged_cache if label == "paged" else disable_paged_cache)(model)
            seconds, outputs[label] = time_generate(model, input_ids, case)
            if repeat:
                times[label].append(seconds)
    disable_paged_cache(model)
    if not torch.equal(outputs["stock"], outputs["paged"]):
        raise SystemExit("paged output differs from stock: refusing to report a time for wrong tokens")
    stock, paged = statistics.median(times["stock"]), statistics.median(times["paged"])
    # Rounds run back to back, so the ratio within a round is less exposed to the machine's slow drifts.
    round_ratios = [s / p for s, p in zip(times["stock"], times["paged"])]
    return {"stock_s": stock, "paged_s": paged, "speedup": stock / paged,
            "median_round_speedup": statistics.median(round_ratios), "stock_runs": times["stock"],
            "paged_runs": times["paged"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args(argv)
    model = build_model()
    results = {}
    print("| case | rounds | stock s (median) | paged s (median) | stock / paged | median of per-round ratios |")
    print("|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        result = results[name] = run_case(model, CASES[name], args.repeats)
        print(f"| {name} | {len(result['stock_runs'])} | {result['stock_s']:.2f} | {result['paged_s']:.2f} | {result['speedup']:.2f}x "
              f"| {result['median_round_speedup']:.2f}x |", flush=True)
    write_results(args.out, results)
    return 0


def write_results(out: str, results: dict) -> None:
    """`results` as JSON at `out`, with the command line and what ran it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
