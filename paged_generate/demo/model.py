"""The embedded default model (a tiny Llama of Python code) and the demo's prompts."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_DIR", "PROMPTS", "load_model"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-python-llama"

# Python-code prompts of a few lines each: the beams and samples of a prompt share its blocks.
PROMPTS = (
    "import os\nimport sys\n\n\ndef read_config(path, defaults=None):\n"
    '    """Read a key = value configuration file and return a dict."""\n'
    "    config = dict(defaults or {})\n"
    '    with open(path, encoding="utf-8") as f:\n'
    "        for line in f:\n"
    "            line = line.strip()\n"
    '            if not line or line.startswith("#"):\n'
    "                continue\n",
    'class Stack:\n    """A last-in, first-out stack of items."""\n\n'
    "    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n\n"
    "    def pop(self):\n",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    "    if n < 0:\n        raise ValueError(\"n must be >= 0\")\n"
    "    a, b = 0, 1\n    for _ in range(n):\n",
)


def load_model(name_or_path: str | Path | None = None, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu"):
    """(model, tokenizer) from a local directory or hub id; the embedded tiny-python-llama when None.

    The tokenizer pads on the left (decoder-only batches) and gets a pad token (its EOS) if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(DEFAULT_MODEL_DIR if name_or_path is None else name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
