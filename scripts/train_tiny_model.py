"""Train the demo's embedded model: a tiny Llama-architecture causal LM of Python code from the standard library.

    python scripts/train_tiny_model.py [--out paged_generate/assets/tiny-python-llama] [--steps 900] [--threads 1]

Everything it needs is on every machine with Python: the corpus is the standard library's own top-level modules
(`sysconfig.get_paths()["stdlib"]/*.py`, sorted by name; every 25th file is held out for validation), the tokenizer is
a byte-level BPE (vocabulary 4096) trained on them with the `tokenizers` library, and the model is a 4-layer Llama
(hidden 256, 4 query heads, 2 KV heads (GQA), tied embeddings, ~4M parameters) trained from a fixed seed with AdamW
and a cosine learning rate on 256-token windows. No network.

Writes, into --out: model.safetensors (fp16 on disk; load with `dtype=torch.float32`), config.json,
generation_config.json (eos / pad ids), the tokenizer (PreTrainedTokenizerFast, left padding), and TRAINING.md (the
command, the corpus, steps, wall time, losses and a greedy sample). With `--threads 1` the run is deterministic on a
given machine and Python version (another Python version has another standard library, hence another corpus).
"""

from __future__ import annotations

import argparse
import glob
import inspect
import math
import platform
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "paged_generate" / "assets" / "tiny-python-llama"
EOS, PAD = "<|endoftext|>", "<|pad|>"
VALIDATION_EVERY = 25  # file i of the sorted list is held out when i % 25 == 0
SAMPLE_PROMPTS = (
    "def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\n\ndef read_config(path):\n",
)


def corpus_files() -> tuple[list[Path], list[Path], Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(Path(p) for p in glob.glob(str(root / "*.py")))
    train = [path for i, path in enumerate(files) if i % VALIDATION_EVERY]
    valid = [path for i, path in enumerate(files) if not i % VALIDATION_EVERY]
    return train, valid, root


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, padding_side="left", model_max_length=1_000_000_000,
        clean_up_tokenization_spaces=False,
    )


def pack(tokenizer, texts: list[str], context: int) -> tuple[torch.Tensor, int]:
    """All files, each followed by EOS, concatenated and cut into [num_windows, context] (the tail is dropped)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    num_windows = len(ids) // context
    return torch.tensor(ids[: num_windows * context], dtype=torch.long).view(num_windows, context), len(ids)


def build_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=windows[i : i + batch_size], labels=windows[i : i + batch_size]).loss.item()
              for i in range(0, len(windows), batch_size)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def samples(model, tokenizer, max_new_tokens: int = 48) -> list[str]:
    model.eval()
    texts = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    model.train()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic, shares the machine)")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    command = "python scripts/train_tiny_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    train_files, valid_files, root = corpus_files()
    train_texts, valid_texts = [read(p) for p in train_files], [read(p) for p in valid_files]
    train_bytes = sum(len(t.encode()) for t in train_texts)
    valid_bytes = sum(len(t.encode()) for t in valid_texts)
    print(f"corpus: {root}/*.py: {len(train_files)} train files ({train_bytes / 1e6:.2f} MB), "
          f"{len(valid_files)} validation files ({valid_bytes / 1e6:.2f} MB)", flush=True)

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_windows, train_tokens = pack(tokenizer, train_texts, args.context)
    valid_windows, valid_tokens = pack(tokenizer, valid_texts, args.context)
    print(f"tokenizer: vocab {len(tokenizer)}; train {train_tokens} tokens "
          f"({train_bytes / train_tokens:.2f} bytes/token) -> {len(train_windows)} windows of {args.context}; "
          f"validation {valid_tokens} tokens", flush=True)

    model = build_model(tokenizer, args)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor, epochs = torch.randperm(len(train_windows), generator=generator), 0, 0
    train_start, smoothed, log = time.time(), None, []
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order, cursor, epochs = torch.randperm(len(train_windows), generator=generator), 0, epochs + 1
        batch = train_windows[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - train_start
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.4f}  smoothed {smoothed:.4f}  "
                  f"lr {learning_rate(step, args):.2e}  {elapsed:7.1f}s", flush=True)
            log.append((step, loss.item(), smoothed))
    train_seconds = time.time() - train_start
    valid_loss = evaluate(model, valid_windows, args.batch_size)
    print(f"validation loss {valid_loss:.4f} (perplexity {math.exp(valid_loss):.1f})", flush=True)
    texts = samples(model, tokenizer)
    for text in texts:
        print("--- sample ---\n" + text, flush=True)

    from transformers import GenerationConfig

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=64,
    )
    model.to(torch.float16)  # ~8 MB on disk instead of ~16; the demo loads it as float32
    save_kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(
        model.save_pretrained).parameters else {}  # transformers 5 always writes safetensors
    model.save_pretrained(args.out, **save_kwargs)
    tokenizer.model_max_length = 1024  # set after packing, which tokenizes whole files
    tokenizer.save_pretrained(args.out)
    total_seconds = time.time() - started
    files = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file() and p.name != "TRAINING.md"}
    write_training_md(args, command, root, train_files, valid_files, train_bytes, valid_bytes, train_tokens,
                      valid_tokens, len(train_windows), num_params, epochs, log, valid_loss, train_seconds,
                      total_seconds, texts, files)
    print(f"wrote {args.out} ({sum(files.values()) / 1e6:.2f} MB) in {total_seconds:.0f}s", flush=True)
    return 0


def write_training_md(args, command, root, train_files, valid_files, train_bytes, valid_bytes, train_tokens,
                      valid_tokens, num_windows, num_params, epochs, log, valid_loss, train_seconds, total_seconds,
                      texts, files) -> None:
    import tokenizers
    import transformers

    tokens_seen = args.steps * args.batch_size * args.context
    last_step, last_loss, last_smoothed = log[-1]
    lines = [
        "# tiny-python-llama",
        "",
        "The default model of `paged-generate demo` and the notebooks: a tiny Llama-architecture causal LM of Python",
        "code, trained on this machine's Python standard library by `scripts/train_tiny_model.py`. It writes",
        "recognisably Python-shaped text (indentation, `def`/`self`/`return`, stdlib idioms), not correct programs.",
        "",
        "## Command",
        "",
        "```bash",
        command.strip(),
        "```",
        "",
        "## Corpus",
        "",
        f"- Python {platform.python_version()} ({platform.python_implementation()}) standard library: the top-level "
        f"modules `{root.name}/*.py` of `sysconfig.get_paths()[\"stdlib\"]`, sorted by file name (no packages, no "
        f"tests).",
        f"- Validation: every {VALIDATION_EVERY}th file of that list (index % {VALIDATION_EVERY} == 0): "
        + ", ".join(f"`{p.name}`" for p in valid_files) + ".",
        f"- Train: {len(train_files)} files, {train_bytes:,} bytes, {train_tokens:,} tokens "
        f"({train_bytes / train_tokens:.2f} bytes/token) in {num_windows:,} windows of {args.context} tokens "
        f"(files joined with `{EOS}`). Validation: {len(valid_files)} files, {valid_bytes:,} bytes, "
        f"{valid_tokens:,} tokens.",
        f"- Tokenizer: byte-level BPE trained on the train files with `tokenizers` {tokenizers.__version__}, "
        f"vocabulary {args.vocab_size} (`{EOS}` = EOS, `{PAD}` = padding), saved as a `PreTrainedTokenizerFast` "
        f"(left padding).",
        "",
        "## Model and training",
        "",
        f"- `LlamaForCausalLM`: 4 layers, hidden 256, MLP 688, 4 query heads / 2 KV heads (GQA, head dim 64), tied "
        f"embeddings, RoPE; {num_params:,} parameters. Stored in float16 (`model.safetensors`); load with "
        f"`AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)`.",
        f"- {args.steps} steps of {args.batch_size} x {args.context} tokens ({tokens_seen:,} tokens, "
        f"{tokens_seen / train_tokens:.1f} epochs), AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), "
        f"learning rate {args.lr:g} with {args.warmup} warm-up steps and a cosine decay to {args.min_lr:g}, gradient "
        f"clipping 1.0, seed {args.seed}, {args.threads} torch thread(s).",
        f"- Wall time: {train_seconds / 60:.1f} min of training ({total_seconds / 60:.1f} min in all) on "
        f"{_cpu_name()}, torch {torch.__version__}, transformers {transformers.__version__}.",
        f"- Final training loss {last_loss:.3f} (smoothed {last_smoothed:.3f}); validation loss {valid_loss:.3f} "
        f"(perplexity {math.exp(valid_loss):.1f}).",
        "",
        "| step | loss | smoothed |",
        "|---:|---:|---:|",
    ]
    shown = [row for i, row in enumerate(log) if i % max(1, len(log) // 12) == 0 or row is log[-1]]
    lines += [f"| {step} | {loss:.3f} | {smooth:.3f} |" for step, loss, smooth in shown]
    lines += ["", "## Greedy samples (48 new tokens)", ""]
    for text in texts:
        lines += ["```python", text, "```", ""]
    lines += ["## Files", ""] + [f"- `{name}`: {size:,} bytes" for name, size in files.items()] + [""]
    (args.out / "TRAINING.md").write_text("\n".join(lines))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
