"""What the Triton kernels accept: checked by their wrappers, and read by the dispatch to send anything else to the
PyTorch path. (No kernel code here, so reading these decides nothing about how kernels are compiled.)"""

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Compressed caches: full blocks in these, dequantized in registers to the query's dtype (one of the above).
QUANTIZED_DTYPES = (torch.int8,) + ((torch.float8_e4m3fn,) if hasattr(torch, "float8_e4m3fn") else ())
MAX_HEAD_DIM = 256
MIN_BLOCK_SIZE = 8
MAX_BLOCK_SIZE = 256


def kernels_serve(*, dtype: torch.dtype, head_dim: int, value_head_dim: int, block_size: int) -> bool:
    """Whether the kernels can read and write pools of this kind (else the PyTorch path serves them exactly)."""
    return (dtype in SUPPORTED_DTYPES and 1 <= head_dim <= MAX_HEAD_DIM and value_head_dim == head_dim
            and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and not block_size & (block_size - 1))


def kernels_load(storage_dtype: torch.dtype, device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether the kernels can read compressed blocks of `storage_dtype` on `device` for a model computing in
    `compute_dtype` (else the PyTorch path serves them): Triton converts float8 e4m3 only from sm_89 (Ada, Hopper)
    on, and the fp32 variants, whose tiles and scales take twice the registers, spill on sm_90."""
    if storage_dtype not in QUANTIZED_DTYPES or compute_dtype == torch.float32:
        return False
    if storage_dtype == torch.int8 or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)
