"""What the benchmark scripts share: the benchmark models and the JSON writer.

Imported by the scripts as `bench_utils` (run as `python benchmarks/NAME.py`, this folder is on sys.path). torch and
transformers are imported where used: benchmarks/memory.py's parent process only starts children.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

__all__ = ["MODELS", "RESULTS_DIR", "build_model", "run_info", "write_json"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The 4-layer GQA Llama every CPU benchmark uses, and a ~100M-parameter Llama shape (GPT-2 small's size).
MODELS = {
    "4-layer": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2),
    "100M": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
}


def build_model(name: str = "4-layer", *, seed: int = 0, head_scale: float | None = None, max_positions: int = 4096,
                device: str = "cpu", dtype=None):
    """A random-weight Llama of the `MODELS` shape `name`, the same weights for the same seed.

    head_scale: multiply the output head by this: random weights give near-uniform next-token distributions, where
    beams tie and samples are noise; a scaled-up head makes them peaked, as a trained model's are.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**MODELS[name], max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype or torch.float32).eval()
    if head_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def run_info() -> dict:
    """The command line and what ran it, for the JSON files."""
    import torch
    import transformers

    return {
        "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
    }


def write_json(path: str | Path, payload: dict) -> None:
    """Write `payload` as JSON at `path` (through a temporary file: an interrupted run never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
