"""How much compressed KV storage changes what the model computes: paged-generate's int8 / fp8 blocks and transformers'
own quantized cache, against full precision, on the embedded tiny-python-llama and held-out Python code.

    python benchmarks/quality.py [--windows 0] [--prompts 50] [--out benchmarks/results/quality.json] [--quick]
                                 [--kinds paged-int8,paged-fp8,hf-fp8,hf-quanto-int4,hf-quanto-int2]
                                 [--key-scales-experiment]

Model: tiny-python-llama (paged_generate/assets, trained on the Python standard library), loaded as the demo loads it
(fp32). Text: attrs 26.1.0's `attr` package (benchmarks/data/heldout, MIT), which it never saw.

- Perplexity: windows of 256 held-out tokens (the model was trained on 256-token windows); in each, the first 128 go
  through the cache block by block (16 tokens per forward), the other 128 token by token, teacher-forced. Negative
  log-likelihood over every predicted token; full precision is stock `DynamicCache` (paged "auto" is checked to give
  the same logits).
- Top-1 agreement: share of the token-by-token positions whose most likely next token is full precision's.
- Generation: beam search (8 beams) and sampling (8 samples, seeded, temperature 0.8, top-k 50) on `--prompts`
  held-out prompts of 64 tokens, 32 new tokens: share of prompts whose best beam (all 8 samples) equals full
  precision's.
- Peak KV bytes: what the cache held at its largest during the perplexity runs (paged: `cache_stats`' figure;
  transformers: the quantized tensors with their scales plus the full-precision residual), and stock's.
- transformers' QuantizedCache beam search: besides the generation figures, a direct check that `reorder_cache`
  moves the quantized rows (4 rows of distinct K/V, 200 tokens so that most are quantized, a permutation, one more
  token: is each row read back nearest to the row it was reordered from?). A reorder bug in its quantized layers was
  reported upstream.

Paged goals (checked, exit 1 when missed): perplexity within +0.5% (int8) / +2% (fp8), top-1 agreement >= 99% /
>= 97%. Seconds per run are recorded but only mean something on a quiet machine. `--key-scales-experiment` also
measures keys quantized per channel (KIVI) instead of per (block, head), by simulation (fake quantization).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from bench_utils import RESULTS_DIR, run_info, write_json

from paged_generate import PagedCache, disable_paged_cache, enable_paged_cache
from paged_generate.demo import load_model
from paged_generate.patches.compat import CACHE_KWARG

HELDOUT = Path(__file__).resolve().parent / "data" / "heldout" / "attrs-26.1.0-attr.txt"
WINDOW, PROMPT_CHUNK, PROMPT_TOKENS = 256, 16, 128
GEN_PROMPT, GEN_NEW, WIDTH, SEED = 64, 32, 8, 0
GOALS = {"paged-int8": (0.005, 0.99), "paged-fp8": (0.02, 0.97)}  # max perplexity increase, min top-1 agreement
KINDS = ("paged-int8", "paged-fp8", "hf-fp8", "hf-quanto-int4", "hf-quanto-int2")
KIND_LABELS = {
    "full": "full precision (stock DynamicCache)", "paged-auto": "paged, auto (model dtype)",
    "paged-int8": "paged, int8 blocks", "paged-fp8": "paged, fp8 e4m3 blocks",
    "hf-fp8": "transformers QuantizedCache fp8", "hf-quanto-int4": "transformers QuantizedCache quanto int4",
    "hf-quanto-int2": "transformers QuantizedCache quanto int2",
    "paged-int8-channel-keys": "paged int8, keys per channel (simulated)",
    "paged-fp8-channel-keys": "paged fp8, keys per channel (simulated)",
}


# --- data ---------------------------------------------------------------------------------------------------------
def heldout_tokens(tokenizer) -> torch.Tensor:
    """The held-out files tokenized as the training corpus was: joined with `<|endoftext|>` (one token)."""
    return torch.tensor(tokenizer(HELDOUT.read_text(encoding="utf-8"), verbose=False)["input_ids"], dtype=torch.long)


def windows_of(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """[count, WINDOW] consecutive windows from the start (count 0: all that fit)."""
    available = len(tokens) // WINDOW
    count = available if count <= 0 else min(count, available)
    return tokens[: count * WINDOW].view(count, WINDOW)


def prompts_of(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """[count, GEN_PROMPT] prompts starting at evenly spaced positions of the held-out text."""
    starts = torch.linspace(0, len(tokens) - GEN_PROMPT - 1, count).long()
    return torch.stack([tokens[s : s + GEN_PROMPT] for s in starts.tolist()])


# --- caches -------------------------------------------------------------------------------------------------------
def hf_cache_config(kind: str) -> dict | None:
    """transformers' `cache_config` for a QuantizedCache kind; None when this install cannot build it."""
    from transformers import cache_utils

    if kind == "hf-fp8":
        return {"backend": "fp8"} if hasattr(cache_utils, "Fp8QuantizedLayer") else None
    try:
        import optimum.quanto  # noqa: F401  (optional: pip install optimum-quanto)
    except ImportError:
        return None
    return {"backend": "quanto", "nbits": int(kind[-1])}


def make_cache(model, kind: str):
    """A fresh cache of `kind` for one perplexity run (the model enabled or not as the kind needs)."""
    from transformers import DynamicCache, QuantizedCache

    disable_paged_cache(model)
    if kind == "full":
        return DynamicCache(config=model.config)
    if kind.startswith("paged-"):
        enable_paged_cache(model, min_shared_tokens=0)
        return PagedCache.from_model(model, kv_cache_dtype=kind.split("-")[1])
    config = dict(hf_cache_config(kind))
    return QuantizedCache(config=model.config, backend=config.pop("backend"), **config)


def held_bytes(value) -> int:
    """Bytes of the tensors in `value`: a tensor (quanto's quantized tensors: their inner tensors), or a tuple."""
    if isinstance(value, (tuple, list)):
        return sum(held_bytes(item) for item in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(held_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


def cache_bytes(cache) -> int:
    """K/V bytes `cache` holds now."""
    if isinstance(cache, PagedCache):
        return cache.kv_bytes()
    return sum(held_bytes(getattr(layer, name, None)) for layer in cache.layers
               for name in ("keys", "values", "_quantized_keys", "_quantized_values"))


# --- perplexity and agreement ---------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced(model, kind: str, windows: torch.Tensor, batch: int) -> dict:
    """Log-probabilities of every next token (prompt block by block, then token by token through the cache) and the
    argmax at the token-by-token positions, for every window."""
    nll, top1, peak, stock_peak, seconds = [], [], 0, 0, 0.0
    for first in range(0, len(windows), batch):
        ids = windows[first : first + batch]
        cache = make_cache(model, kind)
        start = time.perf_counter()
        logits = []
        for chunk in ids[:, :PROMPT_TOKENS].split(PROMPT_CHUNK, dim=1):
            logits.append(model(input_ids=chunk, use_cache=True, **{CACHE_KWARG: cache}).logits)
            peak = max(peak, cache_bytes(cache))
        for position in range(PROMPT_TOKENS, WINDOW - 1):
            logits.append(model(input_ids=ids[:, position : position + 1], use_cache=True,
                                **{CACHE_KWARG: cache}).logits)
            peak = max(peak, cache_bytes(cache))
        seconds += time.perf_counter() - start
        if isinstance(cache, PagedCache):
            peak = max(peak, cache.stats().peak_kv_bytes)
            stock_peak = max(stock_peak, cache.stats().dense_kv_bytes)
        logits = torch.cat(logits, dim=1).float()  # [rows, WINDOW - 1, vocab]: predictions of tokens 1 ..
        log_probs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        nll.append(-log_probs)
        top1.append(logits[:, PROMPT_TOKENS - 1 :].argmax(-1))
    disable_paged_cache(model)
    return dict(nll=torch.cat(nll), top1=torch.cat(top1), peak_kv_bytes=peak, seconds=seconds,
                stock_kv_bytes=stock_peak)


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


# --- generation ---------------------------------------------------------------------------------------------------
def generate_kwargs(mode: str) -> dict:
    common = dict(max_new_tokens=GEN_NEW, pad_token_id=1)
    if mode == "beam":
        return dict(common, num_beams=WIDTH, num_return_sequences=1, do_sample=False)
    return dict(common, do_sample=True, num_return_sequences=WIDTH, temperature=0.8, top_k=50)


@torch.no_grad()
def generations(model, kind: str, prompts: torch.Tensor, mode: str) -> tuple[list[torch.Tensor], float]:
    """Each prompt's generated sequences with `kind`'s cache, and the seconds all calls took."""
    disable_paged_cache(model)
    extra = {}
    if kind.startswith("paged-"):
        enable_paged_cache(model, kv_cache_dtype=kind.split("-")[1])
    elif kind.startswith("hf-"):
        extra = dict(cache_implementation="quantized", cache_config=hf_cache_config(kind))
    outputs, seconds = [], 0.0
    try:
        for prompt in prompts:
            ids = prompt[None]
            torch.manual_seed(SEED)
            start = time.perf_counter()
            outputs.append(model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs(mode), **extra))
            seconds += time.perf_counter() - start
    finally:
        disable_paged_cache(model)
    return outputs, seconds


def share_equal(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The share of prompts whose sequences all equal the reference's."""
    same = [a.shape == b.shape and torch.equal(a, b) for a, b in zip(outputs, reference)]
    return sum(same) / len(same)


def share_sequences_equal(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The share of single sequences (all prompts, every sample) equal to the reference's."""
    same = [a.shape == b.shape and torch.equal(x, y) for a, b in zip(outputs, reference) for x, y in zip(a, b)]
    return sum(same) / len(same)


# --- transformers' QuantizedCache reorder check ----------------------------------------------------------------------
@torch.no_grad()
def reorder_check(model, kind: str) -> dict:
    """Does `reorder_cache` move the quantized rows? Rows of distinct K/V, reordered, read back after one more token:
    each should be nearest to the row it was reordered from."""
    cache = make_cache(model, kind)
    config = model.config
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(4, heads, 200, head_dim, generator=generator)
    layer = cache.layers[0]
    for part in keys.split(50, dim=2):  # several updates, as generate makes them: most tokens end up quantized
        layer.update(part, part.clone())
    order = torch.tensor([2, 0, 3, 1])
    cache.reorder_cache(order)
    one = torch.randn(4, heads, 1, head_dim, generator=generator)
    read, _ = layer.update(one, one.clone())
    read = read[:, :, :200].float()
    distance = ((read[:, None] - keys[None]) ** 2).flatten(2).mean(-1)  # [read row, original row]
    nearest = distance.argmin(-1)
    return dict(reordered=bool(torch.equal(nearest, order)), nearest=nearest.tolist(), expected=order.tolist())


@torch.no_grad()
def reorder_logic_check() -> dict:
    """The same check on transformers' `QuantizedLayer` itself, with a quantizer that changes nothing: whether its
    reorder logic moves the quantized rows, whichever backend (quanto, HQQ) would be plugged in."""
    from transformers.cache_utils import QuantizedLayer

    class Identity(QuantizedLayer):
        def _quantize(self, tensor, axis):
            return tensor.clone()

        def _dequantize(self, q_tensor):
            return q_tensor

    layer = Identity(residual_length=128)
    keys = torch.randn(4, 2, 200, 16, generator=torch.Generator().manual_seed(0))
    for part in keys.split(50, dim=2):
        layer.update(part, part.clone())
    order = torch.tensor([2, 0, 3, 1])
    layer.reorder_cache(order)
    read, _ = layer.update(keys[:, :, :1], keys[:, :, :1].clone())
    return dict(reordered=bool(torch.equal(read[:, :, :200], keys[order])), residual_length=128, tokens=200)


# --- per-channel key scales, simulated -------------------------------------------------------------------------------
def channel_keys_pools():
    """A `CompressedPools` whose keys are fake-quantized per (block, head, channel), KIVI's grouping, and kept
    dequantized in the model's dtype; values as the library stores them. Quality only (its bytes mean nothing)."""
    from paged_generate import compressed
    from paged_generate.quantize import _QMAX

    class ChannelKeys(compressed.CompressedPools):
        def __init__(self, kv_cache_dtype, key_states, value_states, block_size):
            super().__init__(kv_cache_dtype, key_states, value_states, block_size)
            self.keys = self.keys.to(self.dtype)

        def provide(self, num_blocks, num_slots):
            super().provide(num_blocks, num_slots)
            self.key_scales.fill_(1.0)

        def _complete(self, step, device_step, states, pool, scales, partial):
            if pool is not self.keys:
                return super()._complete(step, device_step, states, pool, scales, partial)
            tokens = states.transpose(1, 2)
            earlier = step.past_len % step.block_size
            if earlier:
                tokens = torch.cat([partial[device_step.fill_slots, :earlier], tokens], dim=1)
            blocks = tokens.reshape(-1, step.block_size, *tokens.shape[2:]).float()
            qmax = _QMAX[self.kv_cache_dtype]
            channel_scales = blocks.abs().amax(dim=1, keepdim=True).div(qmax).clamp(min=1e-30)
            scaled = (blocks / channel_scales).clamp(-qmax, qmax)
            rounded = scaled.round() if self.kv_cache_dtype == "int8" else scaled.to(torch.float8_e4m3fn).float()
            pool.index_copy_(0, device_step.fill_blocks, (rounded * channel_scales).to(self.dtype))

    return ChannelKeys


def with_channel_keys(run):
    """`run()` with the cache storing keys per channel (see `channel_keys_pools`)."""
    from paged_generate import cache as cache_module

    original = cache_module.CompressedPools
    cache_module.CompressedPools = channel_keys_pools()
    try:
        return run()
    finally:
        cache_module.CompressedPools = original


# --- report -------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    header = ["KV storage", "peak KV MiB", "vs stock", "perplexity", "vs full", "top-1 agree", "beam = full",
              "all 8 samples = full", "single samples = full", "beam reorder ok", "ppl s", "beam s", "sample s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    for row in rows:
        reorder = row.get("reorder")
        lines.append("| " + " | ".join([
            KIND_LABELS[row["kind"]], cell(row["peak_kv_bytes"] / 2**20, ".2f"),
            cell(row["peak_kv_bytes"] / row["stock_kv_bytes"], ".1%"), cell(row["perplexity"], ".3f"),
            cell(row["perplexity_change"], "+.2%"), cell(row["top1_agreement"], ".2%"),
            cell(row.get("beam_equal"), ".0%"), cell(row.get("sample_equal"), ".0%"),
            cell(row.get("sample_sequences_equal"), ".0%"),
            "-" if reorder is None else ("yes" if reorder["reordered"] else "**no**"),
            cell(row.get("perplexity_seconds"), ".1f"), cell(row.get("beam_seconds"), ".1f"),
            cell(row.get("sample_seconds"), ".1f"),
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=0, help="256-token windows for perplexity (0: all)")
    parser.add_argument("--batch", type=int, default=16, help="windows per forward")
    parser.add_argument("--prompts", type=int, default=50, help="held-out prompts for beam search and sampling")
    parser.add_argument("--kinds", default=",".join(KINDS), help="storages besides full precision")
    parser.add_argument("--key-scales-experiment", action="store_true",
                        help="also measure keys quantized per channel (simulated)")
    parser.add_argument("--quick", action="store_true", help="2 windows, 2 prompts: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.prompts = 2, 2
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    tokens = heldout_tokens(tokenizer)
    windows, prompts = windows_of(tokens, args.windows), prompts_of(tokens, args.prompts)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    skipped = [kind for kind in kinds if kind.startswith("hf-") and hf_cache_config(kind) is None]
    kinds = ["full", "paged-auto"] + [kind for kind in kinds if kind not in skipped]

    started = time.perf_counter()

    def progress(what):
        print(f"  [{time.perf_counter() - started:6.0f} s] {what}", file=sys.stderr, flush=True)

    runs = {}
    for kind in kinds:
        runs[kind] = teacher_forced(model, kind, windows, args.batch)
        progress(f"perplexity {kind}")
    if args.key_scales_experiment:
        for kind in ("paged-int8", "paged-fp8"):
            runs[kind + "-channel-keys"] = with_channel_keys(lambda: teacher_forced(model, kind, windows, args.batch))
            progress(f"perplexity {kind}, keys per channel")
    full = runs["full"]
    reference = {mode: generations(model, "full", prompts, mode) for mode in ("beam", "sample")}
    progress("generation, full precision")
    rows = []
    for kind, run in runs.items():
        row = dict(kind=kind, label=KIND_LABELS[kind], perplexity=perplexity(run["nll"]),
                   perplexity_change=perplexity(run["nll"]) / perplexity(full["nll"]) - 1,
                   top1_agreement=(run["top1"] == full["top1"]).float().mean().item(),
                   peak_kv_bytes=run["peak_kv_bytes"], stock_kv_bytes=full["peak_kv_bytes"],
                   perplexity_seconds=run["seconds"])
        if "channel-keys" not in kind:
            for mode in ("beam", "sample"):
                outputs, seconds = reference[mode] if kind == "full" else generations(model, kind, prompts, mode)
                row[f"{mode}_equal"] = share_equal(outputs, reference[mode][0])
                row[f"{mode}_sequences_equal"] = share_sequences_equal(outputs, reference[mode][0])
                row[f"{mode}_seconds"] = seconds
        if kind.startswith("hf-"):
            row["reorder"] = reorder_check(model, kind)
        rows.append(row)
        progress(f"generation {kind}")

    logic = reorder_logic_check()
    text = table(rows)
    print(text)
    import transformers

    print(f"\ntransformers {transformers.__version__} QuantizedLayer.reorder_cache with a quantizer that changes "
          f"nothing (200 tokens, residual 128): quantized rows {'moved' if logic['reordered'] else '**NOT moved**'}")
    results = []
    auto = next(row for row in rows if row["kind"] == "paged-auto")
    same = torch.equal(runs["paged-auto"]["nll"], full["nll"]) and auto["beam_equal"] == auto["sample_equal"] == 1.0
    results.append((same, f"{'PASS' if same else 'FAIL'} paged auto gives full precision's log-likelihoods and "
                          f"sequences exactly"))
    for row in rows:
        if row["kind"] in GOALS:
            max_change, min_agreement = GOALS[row["kind"]]
            ok = row["perplexity_change"] <= max_change and row["top1_agreement"] >= min_agreement
            results.append((ok, f"{'PASS' if ok else 'FAIL'} {row['kind']}: perplexity {row['perplexity_change']:+.2%} "
                                f"(<= +{max_change:.1%}), top-1 agreement {row['top1_agreement']:.2%} "
                                f"(>= {min_agreement:.0%})"))
    for kind in skipped:
        results.append((None, f"SKIP {kind}: not available here (fp8: transformers >= 5.21; quanto: pip install "
                              f"optimum-quanto)"))
    for _, line in results:
        print(line)
    write_json(args.out, {
        **run_info(), "heldout": str(HELDOUT.relative_to(Path(__file__).resolve().parents[1])),
        "heldout_tokens": len(tokens), "windows": len(windows), "prompts": len(prompts),
        "settings": dict(window=WINDOW, prompt_chunk=PROMPT_CHUNK, prompt_tokens=PROMPT_TOKENS, gen_prompt=GEN_PROMPT,
                         gen_new=GEN_NEW, width=WIDTH, seed=SEED, block_size=16),
        "rows": rows, "table_markdown": text, "quantized_layer_reorder": logic,
        "checks": [dict(passed=ok, line=line) for ok, line in results],
    })
    print(f"wrote {args.out}")
    return 1 if any(ok is False for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
