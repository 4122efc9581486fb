"""Compile the attention kernels' compressed-cache variants (QUANTIZED: int8 / fp8 blocks dequantized in registers,
partial blocks from a side pool) for an H100 (sm_90) with the real Triton compiler, no GPU needed.

As test_kernel_gpu_compile.py: the interpreter accepts things the compiler rejects, so each kernel is lowered to a
cubin with Triton's bundled ptxas, failing on register spills. Runs in a subprocess, since this process decorates the
kernels for the interpreter.
"""

import os
import subprocess

from sm90_compile import run_compile_script, sm90_target_and_ptxas


def test_quantized_kernels_compile_for_sm90(tmp_path):
    run_compile_script(__file__, tmp_path)


_UNIT_STRIDES = ("stride_q_dim",)
_STRIDES_DIVISIBLE_BY_16 = ("stride_q_row", "stride_q_head", "stride_c_block", "stride_c_slot", "stride_c_head")


def _compile(kernel, pointers, meta, target, ptxas):
    import re
    import tempfile

    import triton
    from triton.compiler import ASTSource

    meta = dict(meta)
    num_warps = meta.pop("num_warps", 4)
    annotated = {p.name for p in kernel.params if p.is_constexpr}
    assert annotated == set(meta), f"{kernel.__name__}: annotated {annotated} vs passed {set(meta)}"
    assert meta["QUANTIZED"], "only the compressed variants are compiled here"
    # What a launch specialises on, as in test_kernel_shared_prefix_compile.py: 16-byte aligned pointers, unit head_dim
    # strides and cache / query strides that are multiples of 16 elements (the scales' block stride need not be).
    meta.update({name: 1 for name in _UNIT_STRIDES if name in kernel.arg_names})
    signature = {name: "constexpr" if name in meta else pointers.get(name, "fp32" if name in ("scale", "softcap")
                                                                        else "i32")
                 for name in kernel.arg_names}
    divisible = [name for name in kernel.arg_names if name in pointers or name in _STRIDES_DIVISIBLE_BY_16]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=meta, attrs=attrs), target=target,
                              options={"num_warps": num_warps})
    report = ""
    if ptxas is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        report = res.stdout + res.stderr
        assert res.returncode == 0, report
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill", report)]
        assert not any(spills), f"{kernel.__name__} {meta} spills: {report}"
        report = " ".join(re.findall(r"Used \d+ registers", report))
    shown = {k: v for k, v in meta.items() if k in ("HEAD_DIM", "GROUP", "BLOCK_M", "TILE_N", "BLOCK_SIZE")}
    print(kernel.__name__, shown, report, flush=True)


def _compile_all():
    import torch

    target, ptxas = sm90_target_and_ptxas()
    from paged_generate.kernels.attention import _paged_attention_kernel, kernel_meta
    from paged_generate.kernels.shared_prefix import _prefix_kernel, _suffix_kernel, prefix_meta, suffix_meta

    ttype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    stored = {"int8": "*i8", "fp8": "*fp8e4nv"}
    cases = [
        # query dtype, storage, query_len, q heads, kv heads, head_dim, block_size, kv_start, window, split
        (torch.bfloat16, "int8", 1, 32, 8, 128, 16, False, False, True),  # the kernel benchmark's decode
        (torch.bfloat16, "fp8", 1, 32, 8, 128, 16, True, True, False),
        (torch.float16, "int8", 128, 32, 8, 128, 16, True, False, False),  # a prompt step
        (torch.bfloat16, "fp8", 64, 8, 4, 256, 64, False, True, False),
        (torch.float16, "int8", 1, 12, 2, 64, 8, False, False, True),  # blocks smaller than a key tile
    ]
    for dtype, storage, query_len, heads, kv_heads, head_dim, block_size, kv_start, window, split in cases:
        shape = dict(num_q_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
                     has_kv_start=kv_start, sliding_window=window, softcap=False)
        p, q = "*" + ttype[dtype], stored[storage]
        caches = dict(key_cache_ptr=q, value_cache_ptr=q, key_scales_ptr="*fp32", value_scales_ptr="*fp32",
                      partial_key_ptr=p, partial_value_ptr=p, partial_slots_ptr="*i32", query_ptr=p,
                      seq_lens_ptr="*i32", kv_start_ptr="*i32", part_max_ptr="*fp32", part_sum_ptr="*fp32",
                      part_acc_ptr="*fp32")
        meta = kernel_meta(query_len=query_len, split=split, quantized=True, **shape)
        _compile(_paged_attention_kernel, dict(caches, out_ptr=p, block_tables_ptr="*i32"), meta, target, ptxas)
        if query_len == 1:
            _compile(_prefix_kernel, dict(caches, prefix_tables_ptr="*i64", prefix_len_ptr="*i32",
                                          group_start_ptr="*i32", member_rows_ptr="*i32"),
                     prefix_meta(max_group_size=8, quantized=True, **shape), target, ptxas)
            _compile(_suffix_kernel, dict(caches, out_ptr=p, suffix_tables_ptr="*i64", row_group_ptr="*i64",
                                          prefix_len_ptr="*i32"),
                     suffix_meta(merge=not split, quantized=True, **shape), target, ptxas)


if __name__ == "__main__":
    _compile_all()
