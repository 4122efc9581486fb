"""Compile the shared-prefix kernels for an H100 (sm_90) with the real Triton compiler, no GPU needed.

Like test_kernel_gpu_compile.py: the interpreter accepts things the compiler rejects, so each
kernel is lowered to a cubin with Triton's bundled ptxas for the constexpr combinations the
wrapper produces, failing on register spills. Runs in a subprocess, since this process
decorates the kernels for the interpreter.
"""

import os
import subprocess

from sm90_compile import run_compile_script, sm90_target_and_ptxas


def test_shared_prefix_kernels_compile_for_sm90(tmp_path):
    run_compile_script(__file__, tmp_path)


_UNIT_STRIDES = ("stride_q_dim",)
_STRIDES_DIVISIBLE_BY_16 = ("stride_q_row", "stride_q_head", "stride_c_block", "stride_c_slot", "stride_c_head")


def _compile(kernel, pointers, meta, floats, target, ptxas):
    import re
    import tempfile

    import triton
    from triton.compiler import ASTSource

    meta = dict(meta)
    num_warps = meta.pop("num_warps", 4)
    annotated = {p.name for p in kernel.params if p.is_constexpr}
    assert annotated == set(meta), f"{kernel.__name__}: annotated {annotated} vs passed {set(meta)}"
    # What a launch specialises on for the shapes the wrapper gets: 16-byte aligned pointers, unit head_dim
    # strides (constants) and cache/query strides that are multiples of 16 elements.
    meta.update({name: 1 for name in _UNIT_STRIDES if name in kernel.arg_names})
    signature = {
        name: "constexpr" if name in meta else pointers.get(name, "fp32" if name in floats else "i32")
        for name in kernel.arg_names
    }
    divisible = [name for name in kernel.arg_names if name in pointers or name in _STRIDES_DIVISIBLE_BY_16]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=meta, attrs=attrs), target=target,
                              options={"num_warps": num_warps})  # fmt: skip
    report = ""
    if ptxas is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
        os.unlink(f.name)
        report = res.stdout + res.stderr
        assert res.returncode == 0, report
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill", report)]
        assert not any(spills), f"{kernel.__name__} {meta} spills: {report}"
        report = " ".join(re.findall(r"Used \d+ registers", report))
    shown = {k: v for k, v in meta.items() if k in ("HEAD_DIM", "GROUP", "BLOCK_M", "TILE_N", "MERGE")}
    print(kernel.__name__, shown, f"warps={num_warps}", report, flush=True)


def _compile_all():
    import torch

    target, ptxas = sm90_target_and_ptxas()

    from paged_generate.kernels.shared_prefix import _prefix_kernel, _suffix_kernel, prefix_meta, suffix_meta

    ttype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    floats = ("scale", "softcap")
    cases = [
        # dtype, q heads, kv heads, head_dim, block_size, max group size, kv_start, window, softcap, table dtype
        (torch.bfloat16, 32, 8, 128, 16, 64, False, False, False, "*i32"),  # the benchmark's shape
        (torch.bfloat16, 32, 8, 128, 16, 8, True, True, True, "*i64"),  # generate(): int64 tables
        (torch.float16, 32, 32, 128, 16, 4, True, False, False, "*i64"),
        (torch.float16, 8, 1, 256, 32, 16, False, True, True, "*i32"),
        (torch.float32, 12, 2, 80, 8, 3, True, False, False, "*i32"),
        (torch.bfloat16, 16, 2, 96, 64, 1, False, True, False, "*i64"),
        (torch.float16, 64, 1, 64, 16, 16, False, False, False, "*i32"),
    ]
    for dtype, heads, kv_heads, head_dim, block_size, max_group, kv_start, window, softcap, table in cases:
        shape = dict(num_q_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
                     has_kv_start=kv_start, sliding_window=window, softcap=softcap)  # fmt: skip
        p = "*" + ttype[dtype]
        common = dict(part_max_ptr="*fp32", part_sum_ptr="*fp32", part_acc_ptr="*fp32", query_ptr=p, key_cache_ptr=p,
                      value_cache_ptr=p, prefix_len_ptr="*i32", seq_lens_ptr="*i32", kv_start_ptr="*i32")  # fmt: skip
        prefix_pointers = dict(common, prefix_tables_ptr=table, group_start_ptr="*i32", member_rows_ptr="*i32")
        _compile(_prefix_kernel, prefix_pointers, prefix_meta(max_group_size=max_group, **shape), floats, target, ptxas)
        suffix_pointers = dict(common, out_ptr=p, suffix_tables_ptr=table, row_group_ptr="*i64")
        for merge in (True, False):
            _compile(_suffix_kernel, suffix_pointers, suffix_meta(merge=merge, **shape), floats, target, ptxas)


if __name__ == "__main__":
    _compile_all()
