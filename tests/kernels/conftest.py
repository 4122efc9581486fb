"""Kernel tests run under the Triton interpreter on CPU unless TRITON_INTERPRET=0 is set
explicitly (then they run compiled on CUDA).

The variable is read when a ``@triton.jit`` kernel is decorated, i.e. when a
``paged_generate.kernels`` submodule is first imported, so it is set here at module top,
before any test module imports the kernels.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

# Let ``pytest tests/kernels`` work from a checkout without installing the package.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    from paged_generate.kernels import is_interpreting, triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    from paged_generate.kernels._triton import kernel_is_interpreted
    from paged_generate.kernels.attention import _paged_attention_kernel

    # What counts is how the kernels were decorated, which happened at their first import.
    if kernel_is_interpreted(_paged_attention_kernel):
        return torch.device("cpu")
    if is_interpreting():
        pytest.fail("paged_generate.kernels was imported before TRITON_INTERPRET=1 was set; set it earlier")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 but no CUDA device")
    return torch.device("cuda")


LARGE_POOL_BLOCK_SIZE, LARGE_POOL_HEAD_DIM = 16, 64


@pytest.fixture()
def large_pools(device):
    """K and V pools [num_blocks, 16, 1, 64] fp16 of more than 2**31 elements each, to test int64 offsets.

    torch.empty only reserves address space: the few blocks a test writes and reads are the only pages ever touched,
    so this costs about 1 MB of RAM despite 2 x 4 GiB of caches.
    """
    if device.type == "cuda":
        pytest.skip("would really allocate 8 GiB on the GPU")
    num_blocks = 2**31 // (LARGE_POOL_BLOCK_SIZE * LARGE_POOL_HEAD_DIM) + 64
    key_cache = torch.empty(num_blocks, LARGE_POOL_BLOCK_SIZE, 1, LARGE_POOL_HEAD_DIM, dtype=torch.float16)
    assert key_cache.numel() > 2**31
    return key_cache, torch.empty_like(key_cache)

