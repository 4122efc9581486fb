"""paged-generate: the command line.

`paged-generate demo` runs beam search and parallel sampling on a few Python-code prompts with stock
`model.generate()` and with the paged cache, and prints them side by side: the generated text (the same tokens), the
time, the KV cache at its peak and the saving, and the memory each generate() call added to the process.
`--kv-cache-dtype int8` (or fp8) stores full blocks compressed: less memory, and tokens close to, not equal to,
stock's. The default
model is the embedded tiny-python-llama (a 4M-parameter Llama trained on the Python standard library); `--model`
takes any local directory or hub id of a supported causal LM.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time

from .blocks.sizes import AUTO, block_size_problem
from .quantize import KV_CACHE_DTYPES

__all__ = ["main"]

MIB = 2**20
QUICK = dict(width=4, new_tokens=16, prompts=2)
DEFAULTS = dict(width=6, new_tokens=48, prompts=3)
DTYPES = ("float32", "bfloat16", "float16", "auto")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _block_size(text: str) -> int | str:
    if text == AUTO:
        return text
    value = _positive_int(text)
    problem = block_size_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"beam", "sample"})
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of beam, sample; got {text!r}")
    return list(dict.fromkeys(modes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="stock vs paged generate(): beam search and sampling side by side",
        description="Stock vs paged generate() on Python-code prompts: beam search and parallel sampling, side by "
                    "side.",
    )
    demo.add_argument("--model", metavar="PATH_OR_ID",
                      help="a local directory or hub id of a causal LM (default: the embedded tiny-python-llama)")
    demo.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default: float32)")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    demo.add_argument("--width", type=_positive_int, help=f"beams and samples per prompt (default {DEFAULTS['width']})")
    demo.add_argument("--new-tokens", type=_positive_int, help=f"tokens to generate (default {DEFAULTS['new_tokens']})")
    demo.add_argument("--prompts", type=_positive_int, metavar="N",
                      help=f"how many of the built-in Python prompts to batch (default {DEFAULTS['prompts']})")
    demo.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt of your own (repeatable)")
    demo.add_argument("--modes", type=_modes, default=["beam", "sample"], help="beam,sample (default: both)")
    demo.add_argument("--block-size", type=_block_size, default=AUTO,
                      help="tokens per KV block, or auto (the default: chosen per call from its lengths)")
    demo.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                      help="how full KV blocks are stored: auto (the model's dtype, the default; token-identical), "
                           "int8 or fp8 (compressed, lossy)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=_positive_int,
                      help="torch intra-op threads (default: 1 for the embedded model, which gains nothing from more; "
                           "torch's choice with --model)")
    demo.add_argument("--quick", action="store_true",
                      help=f"small run: {QUICK['prompts']} prompts, width {QUICK['width']}, "
                           f"{QUICK['new_tokens']} new tokens (explicit options still win)")
    demo.add_argument("--plot", metavar="FILE.png", help="write a figure of KV memory per decoding step (matplotlib)")
    demo.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr, terminals only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return demo(args)
    return EXIT_USAGE  # unreachable: argparse requires a known command


def _error(message: str) -> None:
    print(f"paged-generate: error: {message}", file=sys.stderr)


def demo(args: argparse.Namespace) -> int:
    for name, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.plot:
        from .demo.plots import MatplotlibMissing, require_matplotlib

        try:
            require_matplotlib()
        except MatplotlibMissing as error:
            _error(f"--plot {error}")
            return EXIT_FAILED

    import torch
    from tqdm import tqdm

    from . import UnsupportedModelError, disable_paged_cache, enable_paged_cache
    from .demo import PROMPTS, compare, load_model

    threads = args.threads or (1 if args.model is None else None)
    if threads:
        torch.set_num_threads(threads)
    if args.no_progress or not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # transformers' own bars (loading weights)
    prompts = list(args.prompt) if args.prompt else [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    started = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        _error(f"could not load {args.model or 'the embedded model'}: {error}")
        return EXIT_USAGE
    try:
        enable_paged_cache(model, block_size=args.block_size)  # refuses unsupported models before anything runs
    except UnsupportedModelError as error:
        _error(f"{args.model}: {error}")
        return EXIT_USAGE
    finally:
        disable_paged_cache(model)

    progress = False if args.no_progress else None  # None: bars on a terminal only
    # Warm-up (not timed): one short call each way pays the one-time costs of the first generate().
    for paged in (False, True):
        if paged:
            enable_paged_cache(model, block_size=args.block_size, kv_cache_dtype=args.kv_cache_dtype,
                               min_shared_tokens=0)
        inputs = tokenizer(prompts[:1], return_tensors="pt").to(args.device)
        model.generate(**inputs, max_new_tokens=2, num_beams=2, pad_token_id=tokenizer.pad_token_id)
    disable_paged_cache(model)

    comparisons = []
    for mode in tqdm(args.modes, desc="paged-generate demo", unit="mode", leave=False,
                     disable=True if args.no_progress else None):
        comparisons.append(compare(model, tokenizer, prompts, mode=mode, width=args.width, new_tokens=args.new_tokens,
                                   seed=args.seed, block_size=args.block_size, progress=progress,
                                   kv_cache_dtype=args.kv_cache_dtype))
    seconds = time.perf_counter() - started

    info = dict(
        model=args.model or "tiny-python-llama (embedded)", parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), device=str(args.device),
        threads=torch.get_num_threads(), block_size=args.block_size, kv_cache_dtype=args.kv_cache_dtype,
        prompts=prompts, width=args.width,
        new_tokens=args.new_tokens, seed=args.seed,
    )
    if args.plot:
        from .demo.plots import kv_figure

        figure = kv_figure(comparisons, title=f"KV cache per decoding step: stock vs paged ({_short_name(info)})")
        figure.savefig(args.plot, dpi=110)
    if args.json:
        payload = dict(info, seconds=seconds, plot=args.plot, identical=all(c["identical"] for c in comparisons),
                       results=[_json_result(c) for c in comparisons])
        print(json.dumps(payload, indent=2))
    else:
        print(format_report(info, comparisons, seconds, args.plot))
    if args.kv_cache_dtype == "auto" and not all(c["identical"] for c in comparisons):
        _error("stock and paged generated different tokens (see the table); please report this with the command.")
        return EXIT_FAILED
    return EXIT_OK


def _same(comparison: dict) -> str:
    """The "same tokens" cell: yes / NO, or with compressed blocks (lossy) the share of tokens equal to stock's."""
    if comparison["identical"]:
        return "yes"
    return "NO" if comparison.get("kv_cache_dtype", "auto") == "auto" else f"{comparison['same_token_share']:.0%}"


def _short_name(info: dict) -> str:
    return info["model"].split(" ")[0].rstrip("/").split("/")[-1]


def _json_result(comparison: dict) -> dict:
    result = {key: value for key, value in comparison.items() if key not in ("stock", "paged")}
    result["stock"] = comparison["stock"].as_dict()
    result["paged"] = comparison["paged"].as_dict()
    return result


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:.2f}"


def _excerpt(text: str, width: int) -> str:
    shown = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def format_report(info: dict, comparisons: list[dict], seconds: float, plot: str | None = None) -> str:
    """The demo's table: one line per mode, stock and paged side by side; then excerpts of the generated text."""
    labels = [f"{c['label']} x {c['prompts']} prompts" for c in comparisons]
    w = max([len(label) for label in labels] + [4])
    memory_kind = comparisons[0]["stock"].memory_kind if comparisons else "rss"
    memory_header = "RSS growth in generate, MiB *" if memory_kind == "rss" else "CUDA alloc growth, MiB *"
    lines = [
        f"paged-generate demo - {_short_name(info)} ({info['parameters'] / 1e6:.1f}M parameters, {info['dtype']}, "
        f"{info['device']}, {info['threads']} thread(s)): {len(info['prompts'])} Python prompts, "
        f"{info['new_tokens']} new tokens, "
        + (f"KV blocks of {info['block_size']} tokens" if info["block_size"] != AUTO else "KV block size per call")
        + (f" stored as {info['kv_cache_dtype']}" if info.get("kv_cache_dtype", "auto") != "auto" else ""),
        "",
        f"{'':<{w}} | {'time, s':^15} | {'KV cache at peak, MiB':^24} | {memory_header:^29} | {'same':^6}",
        f"{'mode':<{w}} | {'stock':>7} {'paged':>7} | {'stock':>7} {'paged':>7} {'saving':>8} | "
        f"{'stock':>14} {'paged':>14} | {'tokens':^6}",
        "-" * w + "-+-" + "-" * 15 + "-+-" + "-" * 24 + "-+-" + "-" * 29 + "-+-" + "-" * 6,
    ]
    for c, label in zip(comparisons, labels):
        stock, paged = c["stock"], c["paged"]
        lines.append(
            f"{label:<{w}} | {stock.seconds:>7.2f} {paged.seconds:>7.2f} | "
            f"{_mib(stock.kv_peak_bytes):>7} {_mib(paged.kv_peak_bytes):>7} {paged.stats.saving:>8.1%} | "
            f"{_mib(stock.memory_growth_bytes):>14} {_mib(paged.memory_growth_bytes):>14} | "
            f"{_same(c):^6}"
        )
    notes = [
        "KV cache: stock = bytes of the DynamicCache's K/V tensors at its largest; paged = blocks in use at the peak x "
        "bytes per block (saving = 1 - paged / stock)"
        + ("; full blocks compressed with their scales, partial blocks in the model's dtype; same tokens: the share "
           "equal to stock's (compression is lossy)." if info.get("kv_cache_dtype", "auto") != "auto" else "."),
        "* Peak memory of the process sampled during each generate() call minus the memory just before it. Both runs "
        "share one process (stock first); each starts after a garbage collection and malloc_trim, but allocator "
        "caching can still hide part of a run's growth: read it as an indication, the KV columns as the measure.",
    ]
    lines += [""] + [textwrap.fill(note, width=116, subsequent_indent="  ") for note in notes]
    lines += [
        "",
        "Generated text (first beam / first sample per prompt; stock and paged side by side):",
    ]
    for c in comparisons:
        group = 1 if c["mode"] == "beam" else c["width"]
        for i, prompt in enumerate(info["prompts"]):
            stock_text, paged_text = c["stock"].texts[i * group], c["paged"].texts[i * group]
            first_line = prompt.strip().splitlines()[0] if prompt.strip() else ""
            lines.append(f"  {c['mode']:<6} [{_excerpt(first_line, 22):<22}]  stock: {_excerpt(stock_text, 44):<44}  "
                         f"paged: {'(same)' if stock_text == paged_text else _excerpt(paged_text, 44)}")
    for c in comparisons:
        lines += ["", f"The end of the first prompt and its {c['label'].split(',')[0]} continuation (paged, first "
                      f"{'beam' if c['mode'] == 'beam' else 'sample'}):", ""]
        prompt_lines = info["prompts"][0].rstrip("\n").splitlines()
        generated = c["paged"].texts[0]
        lines += ["    " + line for line in prompt_lines[-3:]]
        lines += ["    " + "#" * 24 + " generated from here " + "#" * 24]
        lines += ["    " + line for line in generated.splitlines()[:12]]
    lines += ["", f"done in {seconds:.1f} s" + (f"; KV figure written to {plot}" if plot else "")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
