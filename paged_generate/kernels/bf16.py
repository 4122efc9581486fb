"""bf16 rounding that behaves the same under TRITON_INTERPRET as on the GPU.

The interpreter stores bf16 as uint16, so ``tl.dot`` on bf16 operands multiplies bit
patterns, and its fp32 -> bf16 cast truncates where the GPU rounds to nearest even. Kernels
take an ``EMULATE_BF16`` flag (set by the wrappers only when interpreting bf16) and then
do their bf16 dots in fp32 on values passed through ``round_to_bf16``: the same numbers the
GPU's bf16 tensor-core path sees.
"""

from ._triton import tl, triton


@triton.jit
def round_to_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)
