"""scripts/gpu_check.py --dry-run: the GPU check's wiring (parts in processes under time limits, every step, the
results files) on CPU with tiny shapes and the Triton interpreter, so the one real run on a GPU does not fail on a
typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_part_and_writes_the_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {name: part["status"] for name, part in results["parts"].items()} == dict.fromkeys(
        ("kernel_tests", "kernels", "model"), "ok")
    assert results["parts"]["kernel_tests"]["counts"]["passed"] > 0
    kernels, model = results["parts"]["kernels"], results["parts"]["model"]
    assert len(kernels["bf16_dot_vs_float64"]["max_errors"]) == 5
    assert kernels["two_devices"]["status"] == "skipped"
    assert kernels["kernel_speed"]["threshold"]["per_rows"]
    # On CPU every path is token-identical to stock.
    assert all(r[b]["tokens_equal"] for r in model["parity"].values() for b in ("triton", "torch")), model["parity"]
    assert len(model["parity"]) == 4 and model["speed_and_memory"]
    assert model["host_syncs"]["no_extra_sync"], model["host_syncs"]
    assert len(model["call_rule"]) == 2 and all(r["speedup"] > 0 for r in model["call_rule"].values())
    report = (tmp_path / "results.md").read_text()
    assert "generate() against stock" in report and "Host syncs" in report and "Call rule" in report
