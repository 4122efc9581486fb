"""Tensor parallelism as `from_pretrained(..., tp_plan=...)` applies it: how many ranks share the model, and how
many KV heads each rank's attention receives.

transformers shards a model by a plan of style names (`model.tp_plan`, e.g. `"layers.*.self_attn.k_proj":
"colwise"`) over `model.tp_size` ranks (`_tp_size`, set by `from_pretrained`; None when not sharded). A "colwise"
key/value projection hands each rank's attention a contiguous slice of its output features, so whole heads only where
`num_key_value_heads` divides by the number of ranks; a "colwise_gather_output" one gathers every head on every rank.
`config.num_key_value_heads` keeps the global count either way.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEAD_SPLITTING_STYLES", "KV_PROJECTIONS", "TensorParallel", "tensor_parallel_of"]

# Modules whose output holds the keys or values, fused or not (the names transformers' own head count reads).
KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "query_key_value")
# Styles whose output each rank keeps as its own slice of the features (no gather).
HEAD_SPLITTING_STYLES = frozenset({"colwise", "packed_colwise"})


@dataclass(frozen=True)
class TensorParallel:
    """A model sharded over `size` ranks; `kv_splits`: the plan's key/value projection entries that split heads."""

    size: int
    kv_splits: dict[str, str]

    def kv_heads_per_rank(self, num_kv_heads: int) -> int | None:
        """The KV heads each rank's attention receives, or None where they do not split into whole heads."""
        if not self.kv_splits:
            return num_kv_heads
        return num_kv_heads // self.size if num_kv_heads % self.size == 0 else None


def tensor_parallel_of(model) -> TensorParallel | None:
    """How `model` is sharded by transformers' tensor parallelism, or None when it is not (one rank)."""
    size = getattr(model, "_tp_size", None) or 1
    if size <= 1:
        return None
    plan = getattr(model, "tp_plan", None) or {}
    kv_splits = {
        name: style for name, style in plan.items()
        if name.rsplit(".", 1)[-1] in KV_PROJECTIONS and style in HEAD_SPLITTING_STYLES
    }
    return TensorParallel(size=size, kv_splits=kv_splits)
