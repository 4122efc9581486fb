"""`paged-generate demo`: beam search and sampling on a tiny model, stock vs paged, side by side."""

from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["main"]


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peaked next-token distributions, as a trained model has
    return model


def _run(model, input_ids, **kwargs):
    from . import cache_stats, disable_paged_cache, enable_paged_cache

    rows = []
    for label, enabled in (("stock", False), ("paged", True)):
        (enable_paged_cache if enabled else disable_paged_cache)(model)
        torch.manual_seed(0)
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=0, **kwargs)
        seconds = time.perf_counter() - start
        stats = cache_stats(model) if enabled else None
        rows.append((label, out, seconds, stats))
    disable_paged_cache(model)
    return rows


def demo(args) -> int:
    model = _tiny_model()
    torch.manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len))
    settings = (
        (f"beam search, {args.width} beams", dict(num_beams=args.width, num_return_sequences=min(2, args.width))),
        (f"sampling, {args.width} samples", dict(do_sample=True, num_return_sequences=args.width)),
    )
    print(f"{'mode':<26} {'run':<6} {'time s':>7} {'same tokens':>11} {'stock KV MiB':>12} {'paged KV MiB':>12} {'saving':>7}")
    for name, kwargs in settings:
        (_, stock_out, stock_s, _), (_, paged_out, paged_s, stats) = _run(
            model, prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs
        )
        same = torch.equal(stock_out, paged_out)
        mib = 2**20
        print(f"{name:<26} {'stock':<6} {stock_s:>7.2f} {'':>11} {stats.dense_kv_bytes / mib:>12.2f} {'':>12} {'':>7}")
        print(
            f"{'':<26} {'paged':<6} {paged_s:>7.2f} {str(same):>11} {'':>12} {stats.peak_kv_bytes / mib:>12.2f} "
            f"{stats.saving:>7.1%}"
        )
        if not same:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paged-generate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_demo = sub.add_parser("demo", help="stock vs paged generate() on a tiny random Llama")
    run_demo.add_argument("--prompt-len", type=int, default=256)
    run_demo.add_argument("--new-tokens", type=int, default=32)
    run_demo.add_argument("--width", type=int, default=4, help="beams and samples")
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
