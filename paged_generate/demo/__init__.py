"""The demo behind `paged-generate demo` and the notebooks: the embedded model, measurements, figures."""

from .measure import KVTrace, MemoryProbe, compare, generate_kwargs, kv_snapshot, run_generate
from .model import DEFAULT_MODEL_DIR, PROMPTS, load_model

__all__ = [
    "DEFAULT_MODEL_DIR",
    "PROMPTS",
    "KVTrace",
    "MemoryProbe",
    "compare",
    "generate_kwargs",
    "kv_snapshot",
    "load_model",
    "run_generate",
]
