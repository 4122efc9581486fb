"""What the sm_90 compile tests share: running their file as a script outside the interpreter, and the target."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_AOT_API = 77  # the script's exit code when this Triton lacks the ahead-of-time compile API


def run_compile_script(script: str, tmp_path) -> None:
    """Run `script` in a subprocess without TRITON_INTERPRET (this process decorated the kernels for the
    interpreter); skip where Triton has no NVIDIA backend or AOT API, fail with its output otherwise."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == NO_AOT_API:
        pytest.skip("this Triton version lacks the ahead-of-time compile API used here: " + proc.stderr[-300:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def sm90_target_and_ptxas():
    """(GPUTarget for an H100, Triton's bundled ptxas or None); exits with NO_AOT_API where the API is missing."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource  # noqa: F401  (the compile step needs it)
    except ImportError as exc:
        print(exc, file=sys.stderr)
        sys.exit(NO_AOT_API)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)
    return GPUTarget("cuda", 90, 32), ptxas
