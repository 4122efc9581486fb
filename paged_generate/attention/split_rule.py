"""When splitting a shared prefix off pays: the dispatch rule, from measurements.

Splitting reads each group's shared blocks once instead of once per row, but costs a second attention pass and a
merge. What it saves grows with the tokens the unsplit attention reads again for every extra row of a group,
`(rows - groups) x shared tokens` ("redundant tokens"); its fixed cost grows with the heads like the work saved does,
so the crossover is about the same number of redundant tokens across head shapes (benchmarks/split_threshold.py).
Below the threshold the unsplit path (every row's K/V, read in place or gathered, through stock's attention or the plain
paged kernel) is faster.
"""

from __future__ import annotations

__all__ = ["SPLIT_MIN_REDUNDANT_TOKENS", "split_pays"]

# Per path. "torch" (the PyTorch path on CPU): the largest crossover `python benchmarks/split_threshold.py` measured
# over both benchmark models' head shapes and 4-32 rows in groups of 4-8. "triton" (the kernels on CUDA): provisional
# until scripts/gpu_check.py measures it on a GPU (cascade attention for beam search lost below ~256 shared tokens at
# 128 beams in TensorRT-LLM's measurements).
SPLIT_MIN_REDUNDANT_TOKENS = {"torch": 1536, "triton": 32768}


def split_pays(redundant_tokens: int, path: str) -> bool:
    """Whether splitting the shared prefix off is the faster exact path for a decode step on `path`."""
    return redundant_tokens >= SPLIT_MIN_REDUNDANT_TOKENS[path]
