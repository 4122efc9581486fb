"""Compile every kernel for an H100 (sm_90) with the real Triton compiler, no GPU needed.

The interpreter runs kernels as NumPy, so it accepts things the compiler rejects (and the
other way round). This test lowers each kernel, for the constexpr combinations the wrappers
produce, all the way to a cubin with Triton's bundled ptxas, and fails on spills. It runs in
a subprocess because this process decorates the kernels for the interpreter.
"""

import os
import subprocess

from sm90_compile import run_compile_script, sm90_target_and_ptxas


def test_kernels_compile_for_sm90(tmp_path):
    run_compile_script(__file__, tmp_path)


def _compile_all():
    import re
    import tempfile

    import torch
    import triton

    target, ptxas = sm90_target_and_ptxas()
    from triton.compiler import ASTSource

    from paged_generate.kernels.attention import _paged_attention_kernel, kernel_meta
    from paged_generate.kernels.block_copy import _copy_blocks_kernel
    from paged_generate.kernels.cache_write import _write_kv_kernel
    from paged_generate.kernels.split_reduce import _split_reduce_kernel

    ttype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

    def compile_kernel(kernel, pointers, meta, floats=()):
        meta = dict(meta)
        num_warps = meta.pop("num_warps", 4)
        # A real launch finds the constexprs from the annotations: they must be exactly these.
        annotated = {p.name for p in kernel.params if p.is_constexpr}
        assert annotated == set(meta), f"{kernel.__name__}: annotated {annotated} vs passed {set(meta)}"
        signature = {}
        for name in kernel.arg_names:
            if name in meta:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = pointers[name]
            else:
                signature[name] = "fp32" if name in floats else "i32"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=meta), target=target,
                                  options={"num_warps": num_warps})
        report = ""
        if ptxas is not None:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(compiled.asm["ptx"])
            res = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            os.unlink(f.name)
            report = res.stdout + res.stderr
            if res.returncode == 0:
                spills = [int(n) for n in re.findall(r"(\d+) bytes spill", report)]
                assert not any(spills), f"{kernel.__name__} {meta} spills: {report}"
                report = " ".join(re.findall(r"Used \d+ registers", report))
        print(kernel.__name__, {k: v for k, v in meta.items() if k != "DOT_PRECISION"}, report, flush=True)

    attention_cases = [
        # dtype, query_len, q heads, kv heads, head_dim, block_size, kv_start, window, softcap, split
        (torch.float16, 1, 32, 8, 128, 16, False, False, False, True),
        (torch.bfloat16, 1, 32, 8, 128, 16, True, True, True, False),
        (torch.bfloat16, 128, 32, 8, 128, 16, True, True, True, False),
        (torch.float32, 17, 8, 1, 80, 8, True, False, False, False),
        (torch.float16, 1, 16, 16, 96, 32, False, True, False, True),
        (torch.bfloat16, 64, 8, 4, 256, 256, False, True, True, False),
        (torch.float16, 1, 12, 2, 64, 64, False, False, False, True),
        (torch.bfloat16, 1, 64, 1, 128, 16, False, False, False, True),
    ]
    for dtype, query_len, heads, kv_heads, head_dim, block_size, kv_start, window, softcap, split in attention_cases:
        meta = kernel_meta(query_len=query_len, num_q_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                           block_size=block_size, dtype=dtype, has_kv_start=kv_start, sliding_window=window,
                           softcap=softcap, split=split)
        p = "*" + ttype[dtype]
        pointers = dict(out_ptr=p, part_max_ptr="*fp32", part_sum_ptr="*fp32", part_acc_ptr="*fp32", query_ptr=p,
                        key_cache_ptr=p, value_cache_ptr=p, block_tables_ptr="*i32", seq_lens_ptr="*i32",
                        kv_start_ptr="*i32")
        compile_kernel(_paged_attention_kernel, pointers, meta, floats=("scale", "softcap"))

    for dtype, head_dim, splits in [(torch.bfloat16, 128, 5), (torch.float32, 80, 64), (torch.float16, 256, 1024)]:
        pad = triton.next_power_of_2(head_dim)
        meta = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, SPLITS_PAD=triton.next_power_of_2(splits),
                    SPLIT_CHUNK=min(triton.next_power_of_2(splits), 16), EMULATE_BF16=False,
                    num_warps=4 if head_dim > 128 else 2)
        pointers = dict(out_ptr="*" + ttype[dtype], part_max_ptr="*fp32", part_sum_ptr="*fp32", part_acc_ptr="*fp32")
        compile_kernel(_split_reduce_kernel, pointers, meta)

    for dtype, head_dim in [(torch.bfloat16, 80), (torch.float16, 256)]:
        p = "*" + ttype[dtype]
        pointers = dict(key_ptr=p, value_ptr=p, key_cache_ptr=p, value_cache_ptr=p, slot_mapping_ptr="*i64")
        meta = dict(BLOCK_SIZE=16, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim))
        compile_kernel(_write_kv_kernel, pointers, meta)

    pointers = dict(key_cache_ptr="*fp16", value_cache_ptr="*fp16", src_ptr="*i64", dst_ptr="*i64")
    compile_kernel(_copy_blocks_kernel, pointers, dict(CHUNK=1024))


if __name__ == "__main__":
    _compile_all()
