"""Compiling the kernels for an H100 (sm_90) as real launches would, without a GPU.

The launch wrappers run on small CPU tensors shaped as generate() shapes them, with every kernel replaced by a recorder;
each recorded launch is then specialised by Triton's own launcher code (integers equal to 1 become constants, integers
and pointers divisible by 16 get the divisibility attribute, `do_not_specialize` honoured) and compiled to a cubin with
Triton's bundled ptxas and flags; Triton's bundled cuobjdump reports the cubin's registers and stack (spills). These
are the binaries a GPU would run, which the interpreter never builds. The scripts run in a subprocess, as the test
process decorated the kernels for the interpreter.
"""

import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_AOT_API = 77  # the script's exit code when this Triton lacks the launcher / ahead-of-time compile API used here
# sm_90's most dynamic shared memory per block (227 KiB); Triton asks for what `metadata.shared` says.
SM90_MAX_SHARED = 232448
MAX_REGISTERS = 255


def run_compile_script(script: str, tmp_path, *args: str) -> str:
    """Run `script` in a subprocess without TRITON_INTERPRET (this process decorated the kernels for the
    interpreter); skip where Triton has no NVIDIA backend or the API, fail with its output otherwise."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode == NO_AOT_API:
        pytest.skip("this Triton version lacks the compile API used here: " + proc.stderr[-300:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    return proc.stdout


class _Recorder:
    """Stands in for a kernel: records `kernel[grid](*args, **kwargs)` and warm-ups instead of launching."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append((self.kernel, grid, args, kwargs))


KERNELS = {
    "attention": ("_paged_attention_kernel",),
    "split_reduce": ("_split_reduce_kernel",),
    "shared_prefix": ("_prefix_kernel", "_suffix_kernel"),
    "cache_write": ("_write_kv_kernel",),
    "block_copy": ("_copy_blocks_kernel",),
}


@contextmanager
def recorded_launches():
    """Every kernel launch inside the block is recorded in the yielded list, none runs."""
    import importlib

    launches, saved = [], []
    for module_name, names in KERNELS.items():
        module = importlib.import_module(f"paged_generate.kernels.{module_name}")
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(getattr(module, name), launches))
    try:
        yield launches
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def compile_launch(kernel, args, kwargs):
    """Specialise one recorded launch as Triton's launcher does and compile it for sm_90: (compiled, key)."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:
        print(exc, file=sys.stderr)
        sys.exit(NO_AOT_API)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    if hasattr(kernel, "_get_config") or hasattr(backend, "get_attrs_descriptor"):  # the launcher of Triton 3.0 - 3.2
        return _compile_launch_3_0(kernel, args, kwargs, target, backend)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = (kernel.__name__, str(specialization), str(sorted(options.items())))
    if hasattr(kernel, "_pack_args"):
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    else:  # Triton 3.3 - 3.4 did the same inline in JITFunction.run
        from triton.runtime.jit import find_paths_if, get_iterable_path

        options = backend.parse_options(kwargs)
        sigvals = [x[0] for x in specialization]
        signature = {p.name: v for p, v in zip(kernel.params, sigvals)}
        constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
        constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
        attrvals = [x[1] for x in specialization]
        attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
        attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__), key


def _compile_launch_3_0(kernel, args, kwargs, target, backend):
    import inspect

    import triton
    from triton.compiler import ASTSource

    kernel.create_binder(*([backend] if inspect.signature(kernel.create_binder).parameters else []))
    bound_args, sig_and_spec, constexpr_vals, _, excess_kwargs = kernel.binder(*args, **kwargs)
    key = (kernel.__name__, "".join(sig_and_spec), str((constexpr_vals, excess_kwargs)))
    options = backend.parse_options(kwargs)
    bound_vals = tuple(bound_args.values())
    names = [kernel.params[i].name for i in kernel.non_constexpr_indices]
    signature = {k: ("*i8" if v == "none" else v) for k, v in zip(names, sig_and_spec[: len(names)])}
    if hasattr(kernel, "_get_config"):  # 3.0 - 3.1
        config = kernel._get_config(*bound_vals)
        ones = config.equal_to_1
    else:  # 3.2
        config = backend.get_attrs_descriptor(kernel.params, bound_vals)
        ones = config.get_constants()
    constants = {p.name: v for v, p in zip(bound_vals, kernel.params)
                 if p.is_constexpr or p.num in ones or v is None}  # fmt: skip
    source = ASTSource(kernel, signature, constants, config)
    return triton.compile(source, target=target, options=options.__dict__), key


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the cubin Triton built, from its bundled cuobjdump. Our kernels keep no local
    arrays, so any stack is spilled registers."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
    if res.returncode != 0 or found is None:
        raise SystemExit(res.stdout + res.stderr)
    return int(found.group(1)), int(found.group(2))


def check_launches(launches, label: str, seen: dict) -> list[str]:
    """Compile every distinct variant among `launches`; the problems found (spills, too much shared memory)."""
    problems = []
    for kernel, _grid, args, kwargs in launches:
        compiled, key = compile_launch(kernel, args, kwargs)
        if key in seen:
            continue
        registers, spills = resource_usage(compiled.asm["cubin"])
        shared = compiled.metadata.shared
        warps = compiled.metadata.num_warps
        seen[key] = (registers, spills, shared)
        shown = {k: v for k, v in kwargs.items() if k in ("HEAD_DIM", "BLOCK_M", "TILE_N", "GROUP")}
        print(f"{label:<34} {kernel.__name__:<24} {shown} warps={warps} regs={registers} stack={spills} "
              f"smem={shared}", flush=True)  # fmt: skip
        if spills or registers > MAX_REGISTERS:
            problems.append(f"{label} {kernel.__name__} {shown}: {registers} registers, {spills} bytes spilled")
        if shared > SM90_MAX_SHARED:
            problems.append(f"{label} {kernel.__name__} {shown}: {shared} bytes of shared memory")
    return problems
