"""When a model's cached K/V go stale: its weights changed (torch's per-tensor version counters, a private attribute),
or it switched attention implementation or train / eval mode."""

from __future__ import annotations

from .attention_impl import decoder_implementation

__all__ = ["weights_fingerprint"]


def weights_fingerprint(model) -> int:
    """Changes when a parameter of `model` is replaced or written in place (an optimizer step, `load_state_dict`), or
    the model switches attention implementation or train/eval mode: cached K/V computed before are then stale.
    Writes through `.data` escape torch's version counters: call `KVPool.clear()` after those."""
    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    return hash((params, model.training, str(decoder_implementation(model))))
