"""Second pass of flash-decoding: merge the per-split partial softmax states of each query head."""

import torch

from ._triton import check_launchable, kernel_is_interpreted, next_power_of_2, on_tensors_device, tl, triton, warm_up
from .bf16 import round_to_bf16

# Splits whose partials one step of the merge loads: bounds registers, and keeps the compiled variant the same
# whatever the number of splits (which grows with the rows).
SPLIT_CHUNK = 16


@triton.jit(do_not_specialize=("num_splits",))
def _split_reduce_kernel(
    out_ptr,  # [num_rows * query_len * num_q_heads, head_dim], query dtype
    part_max_ptr,  # [num_rows * query_len * num_q_heads, num_splits] fp32, running max in log2 units
    part_sum_ptr,  # [num_rows * query_len * num_q_heads, num_splits] fp32, sum of exp2(s - max)
    part_acc_ptr,  # [num_rows * query_len * num_q_heads, num_splits, head_dim] fp32, unnormalised P @ V
    num_splits,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,  # interpreting a bf16 output: see bf16.py
):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * num_splits
    offs_c = tl.arange(0, SPLIT_CHUNK)
    m_max = tl.max(tl.full([SPLIT_CHUNK], float("-inf"), tl.float32), 0)
    for first in range(0, num_splits, SPLIT_CHUNK):
        c_valid = first + offs_c < num_splits
        m = tl.load(part_max_ptr + base + first + offs_c, mask=c_valid, other=float("-inf"))
        m_max = tl.maximum(m_max, tl.max(m, 0))
    # Every split saw no visible key: weights must be 0, not exp2(-inf - -inf) = NaN.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)

    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    out = tl.zeros([HEAD_DIM_PAD], tl.float32)
    total = tl.sum(tl.zeros([SPLIT_CHUNK], tl.float32), 0)
    for first in range(0, num_splits, SPLIT_CHUNK):
        c_valid = first + offs_c < num_splits
        w = tl.exp2(tl.load(part_max_ptr + base + first + offs_c, mask=c_valid, other=float("-inf")) - m_max)
        total += tl.sum(w * tl.load(part_sum_ptr + base + first + offs_c, mask=c_valid, other=0.0), 0)
        acc = tl.load(
            part_acc_ptr + (base + first + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=c_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        out += tl.sum(acc * w[:, None], 0)
    out = out / tl.where(total == 0.0, 1.0, total)
    if EMULATE_BF16:
        out = round_to_bf16(out)
    tl.store(out_ptr + pid * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_valid)


def reduce_meta(head_dim: int, emulate_bf16: bool = False) -> dict:
    """The merge kernel's constexprs and launch options (also used to AOT-compile it in tests)."""
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim), SPLIT_CHUNK=SPLIT_CHUNK,
                EMULATE_BF16=emulate_bf16, num_warps=4 if head_dim > 128 else 2)  # fmt: skip


def split_reduce(
    out: torch.Tensor,  # [num_rows, query_len, num_q_heads, head_dim], contiguous, written in place
    part_max: torch.Tensor,  # [num_rows, query_len, num_q_heads, num_splits] fp32
    part_sum: torch.Tensor,  # [num_rows, query_len, num_q_heads, num_splits] fp32
    part_acc: torch.Tensor,  # [num_rows, query_len, num_q_heads, num_splits, head_dim] fp32
) -> torch.Tensor:
    num_splits, head_dim = part_acc.shape[-2:]
    num_heads_total = out.numel() // head_dim
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    for name, t in (("part_max", part_max), ("part_sum", part_sum), ("part_acc", part_acc)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32")
        if t.numel() != num_heads_total * num_splits * (head_dim if name == "part_acc" else 1):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not match out")
    check_launchable(_split_reduce_kernel, out, part_max, part_sum, part_acc)
    return launch_split_reduce(out, part_max, part_sum, part_acc)


@on_tensors_device
def launch_split_reduce(out, part_max, part_sum, part_acc) -> torch.Tensor:
    """``split_reduce`` without its argument checks, for the kernels' wrappers."""
    num_splits, head_dim = part_acc.shape[-2:]
    num_heads_total = out.numel() // head_dim
    if num_heads_total == 0:
        return out
    emulate = out.dtype == torch.bfloat16 and kernel_is_interpreted(_split_reduce_kernel)
    _split_reduce_kernel[(num_heads_total,)](out, part_max, part_sum, part_acc, num_splits,
                                             **reduce_meta(head_dim, emulate))  # fmt: skip
    return out


_warmed: set = set()


def warm_up_split_reduce(out: torch.Tensor, head_dim: int) -> None:
    """Compile the merge kernel for ``out``'s device and dtype before it is first needed (once per process)."""
    key = (out.device, out.dtype, head_dim)
    if key in _warmed:
        return
    _warmed.add(key)
    part = torch.empty(0, dtype=torch.float32, device=out.device)
    emulate = out.dtype == torch.bfloat16 and kernel_is_interpreted(_split_reduce_kernel)
    warm_up(_split_reduce_kernel, out, part, part, part, 2, grid=(1,), **reduce_meta(head_dim, emulate))
