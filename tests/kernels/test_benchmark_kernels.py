"""benchmarks/kernel_speed.py without a GPU: the CPU exit, the peak lookup, and its inputs, baselines and --check run
under the Triton interpreter (the timing itself needs CUDA)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
_PATH = _BENCHMARKS / "kernel_speed.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(_BENCHMARKS))  # as when run as a script: its shared helper module sits beside it
    try:
        spec = importlib.util.spec_from_file_location("benchmark_kernels", _PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_BENCHMARKS))
    return module


def test_without_cuda_says_so_and_exits_0(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out


def test_peak_bandwidth(bench):
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3", None) == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H100 PCIe", None) == 2.0e12
    assert bench.peak_bandwidth("NVIDIA H200", None) == 4.8e12
    assert bench.peak_bandwidth("NVIDIA A100-SXM4-80GB", None) == 2.0e12
    assert bench.peak_bandwidth("NVIDIA A100 80GB PCIe", None) == 2.0e12
    assert bench.peak_bandwidth("NVIDIA L4", None) is None
    assert bench.peak_bandwidth("NVIDIA L4", 3e11) == 3e11


def test_sdpa_baseline_computes_the_same_attention(bench, device):
    case = bench.decode_case(2, 40, device)
    key, value = bench.contiguous_kv(case)
    assert key.shape == (2, bench.NUM_KV_HEADS, 40, bench.HEAD_DIM) and key.is_contiguous()
    sdpa = bench.run_sdpa(case["query"].cpu().double(), key.cpu().double(), value.cpu().double())
    reference = bench.kernels.paged_attention_reference(
        case["query"].cpu().double(), case["key_cache"].cpu(), case["value_cache"].cpu(), case["block_tables"].cpu(),
        case["seq_lens"].cpu(), scale=bench.SCALE)
    torch.testing.assert_close(sdpa.transpose(1, 2), reference, rtol=1e-9, atol=1e-9)


def test_shared_case_tables(bench, device):
    case = bench.shared_case(3, 32, 20, device)
    prefix, own = case["prefix_tables"][0].tolist(), case["suffix_tables"].tolist()
    assert case["full_tables"].tolist() == [prefix + row for row in own]
    assert case["seq_lens"].tolist() == [52] * 3 and case["members"].max_group_size == 3
    # Every block is used once: the prefix by all rows, the own blocks by one row each.
    assert sorted(prefix + sum(own, [])) == list(range(case["key_cache"].shape[0]))


def test_check_passes_under_the_interpreter(bench, device):
    errors = bench.check_kernels(device)
    assert len(errors) == 5


def test_shared_prefix_threshold(bench):
    speedups = {8: {128: 0.5, 512: 1.2, 2048: 0.9, 8192: 2.0}, 64: {128: 1.1, 512: 1.5, 2048: 3.0, 8192: 6.0}}
    results = [dict(rows=r, prompt=p, speedup=s) for r, row in speedups.items() for p, s in row.items()]
    # 8 rows: 512 pays but 2048 does not, so it pays only from 8192 on; 64 rows pay everywhere measured.
    assert bench.shared_prefix_threshold(results) == {"per_rows": {8: 8192, 64: 128}, "shared_prefix_min_prompt": 8192}
    results.append(dict(rows=16, prompt=8192, speedup=0.8))
    assert bench.shared_prefix_threshold(results)["shared_prefix_min_prompt"] is None  # 16 rows never pay


def test_benchmarks_run_on_cpu_with_the_wall_clock(bench, device):
    # The wiring scripts/gpu_check.py --dry-run exercises: tiny shapes, interpreted kernels, wall-clock times.
    assert bench.timer(device) is (bench.gpu_time if device.type == "cuda" else bench.wall_time)
    shared = bench.run_all(bench.bench_shared, [(2, 32)], None, 1, device, own=8)
    decode = bench.run_all(bench.bench_decode, [(1, 32)], None, 1, device)
    assert shared[0]["speedup"] > 0 and decode[0]["vs_sdpa"] > 0


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_compressed_check_passes_under_the_interpreter(bench, device, kv_cache_dtype):
    errors = bench.check_compressed(device, kv_cache_dtype)
    assert len(errors) == 3


def test_compressed_case_holds_the_rows_partial_blocks(bench, device):
    case = bench.decode_case(3, 40, device)
    case["seq_lens"] = torch.tensor([40, 32, 17], dtype=torch.int32, device=device)
    compressed = bench.compressed_case(case, "int8")
    assert compressed["key_cache"].dtype == torch.int8 and compressed["key_scales"].shape == (case["key_cache"].shape[0],
                                                                                               bench.NUM_KV_HEADS)
    assert compressed["partial_slots"].tolist() == [0, -1, 1]  # rows of 32 tokens end on a block boundary
    last = case["block_tables"][[0, 2], [2, 1]].long()
    assert torch.equal(compressed["partial_key_cache"], case["key_cache"][last])
