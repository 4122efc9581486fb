"""Tensor parallelism: `from_pretrained(path, tp_plan="auto")` under torchrun on two CPU processes (gloo).

One launch of tests/tp_worker.py runs every case on both ranks and writes what each rank saw; these tests read the
two reports. The launch is `torchrun --standalone --nproc-per-node 2` (one node), and, marked slow, two torchrun
agents of one rank each meeting through the rendezvous as on two nodes. Each rank's paged generate() must give stock tensor-parallel generate()'s tokens, issue exactly
stock's collectives (the plugin adds no communication), keep block tables identical to the other rank's, and hold
only its own KV heads: half the single-process bytes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import tp_worker
from tiny_models import COMMON, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache
from paged_generate.patches.tensor_parallel import TensorParallel

RANKS = 2
LAUNCH_TIMEOUT_S = tp_worker.TIMEOUT_S + 40  # each rank gives up after TIMEOUT_S; this is the last resort
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend, which CPU tensor parallelism runs on",
)


def _launchers(form: str) -> list[list[str]]:
    """torchrun command lines (without the script): one agent running both ranks, or, as on two nodes, two agents
    of one rank each meeting through torchrun's rendezvous on this host."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if form == "one node":
        return [[*torchrun, "--standalone", f"--nproc-per-node={RANKS}"]]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rendezvous = [f"--nnodes={RANKS}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=paged-generate-test"]
    return [[*torchrun, *rendezvous] for _ in range(RANKS)]


def _launch(form: str, args: list[str], log_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "tp_worker.py")
    launchers = _launchers(form)
    logs = [log_dir / f"torchrun{index}.log" for index in range(len(launchers))]
    processes = []
    for launcher, log in zip(launchers, logs):
        with open(log, "w") as output:  # a file, not a pipe: an agent never blocks on a full pipe
            # A session of its own, so that a hung run's workers are killed with their torchrun, not orphaned.
            processes.append(subprocess.Popen([*launcher, worker, *args], env=env, stdout=output,
                                              stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    hung = False
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
            _stop(process)
    tail = "\n".join(log.read_text()[-4000:] for log in logs)
    if hung:
        pytest.fail(f"torchrun ({form}) did not finish within {LAUNCH_TIMEOUT_S} s:\n{tail}")
    codes = [process.returncode for process in processes]
    assert codes == [0] * len(processes), f"torchrun ({form}) exited with {codes}:\n{tail}"


def _stop(process: subprocess.Popen) -> None:
    # SIGTERM first: torchrun then stops its workers (they run in process groups of their own).
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    """A tiny Llama (4 heads, 2 KV heads) and one with a single KV head, saved as safetensors."""
    base = tmp_path_factory.mktemp("tp")
    tiny_model("llama").save_pretrained(base / "llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_key_value_heads": 1})).save_pretrained(base / "mqa")
    return base / "llama", base / "mqa"


@pytest.fixture(scope="module", params=["one node", pytest.param("two nodes", marks=pytest.mark.slow)])
def reports(request, saved_dirs, tmp_path_factory):
    """Each rank's report, launched as the README says: one node, or two nodes' rendezvous (here on one host)."""
    out_dir = tmp_path_factory.mktemp("tp_reports")
    _launch(request.param, [*map(str, saved_dirs), str(out_dir)], out_dir)
    reports = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(RANKS)]
    assert [report["rank"] for report in reports] == list(range(RANKS))
    assert all(report["tp_size"] == RANKS == report["world_size"] for report in reports)
    return reports


@pytest.fixture(scope="module")
def single_process_beams(saved_dirs):
    """`cache_stats` of the beams case in one process, the whole model loaded without tensor parallelism."""
    model = AutoModelForCausalLM.from_pretrained(saved_dirs[0]).eval()
    enable_paged_cache(model, block_size=tp_worker.BLOCK_SIZE)
    try:
        tokens = tp_worker.generate(model, "beams")
        return tokens.tolist(), cache_stats(model)
    finally:
        disable_paged_cache(model)


@pytest.mark.parametrize("case", list(tp_worker.CASES))
def test_every_rank_generates_stock_tensor_parallel_tokens(reports, case):
    for report in reports:
        result = report["cases"][case]
        assert result["paged"] == result["stock"], f"rank {report['rank']}, {case}: paged differs from stock"
    assert reports[0]["cases"][case]["paged"] == reports[1]["cases"][case]["paged"], f"{case}: ranks differ"


@pytest.mark.parametrize("case", list(tp_worker.CASES))
def test_block_tables_agree_across_ranks(reports, case):
    first, second = (report["cases"][case] for report in reports)
    assert first["steps"] == second["steps"] == tp_worker.COMMON["max_new_tokens"]
    assert first["tables_sha256"] == second["tables_sha256"], f"{case}: the ranks' block tables diverged"
    assert first["stats"] == second["stats"]
    if case != "greedy":
        assert first["max_ref_count"] > 1, f"{case}: no block was shared, so the check compares little"


@pytest.mark.parametrize("case", list(tp_worker.CASES))
def test_the_plugin_adds_no_communication(reports, case):
    for report in reports:
        result = report["cases"][case]
        assert result["paged_collectives"] == result["stock_collectives"], (
            f"rank {report['rank']}, {case}: the paged call's collectives differ from stock's")
        assert sum(result["paged_collectives"].values()) > 0, "no collective counted: the model is not sharded"


def test_each_rank_holds_its_own_kv_heads(reports, single_process_beams):
    single_tokens, single = single_process_beams
    config = LlamaConfig(**COMMON)
    head_dim = config.hidden_size // config.num_attention_heads
    local_heads = config.num_key_value_heads // RANKS
    for report in reports:
        result = report["cases"]["beams"]
        assert result["paged"] == single_tokens  # the same beams, so the same blocks, as in one process
        assert result["layer_bytes_per_token"] == [2 * local_heads * head_dim * 4] * config.num_hidden_layers
        stats = result["stats"]
        assert stats["peak_blocks"] == single.peak_blocks
        assert stats["peak_kv_bytes"] * RANKS == single.peak_kv_bytes
        assert stats["dense_kv_bytes"] * RANKS == single.dense_kv_bytes
        assert stats["saving"] == pytest.approx(single.saving)


def test_max_cache_bytes_counts_the_ranks_own_heads(reports):
    # Capped at exactly what the rank's pools needed: with the config's global head count, the cap would be half.
    for report in reports:
        capped = report["capped"]
        assert capped["error"] is None, f"rank {report['rank']}: {capped['error']}"
        assert capped["paged"] == report["cases"]["beams"]["stock"]


def test_kv_heads_split_unevenly_are_refused_model_unchanged(reports):
    for report in reports:
        uneven = report["uneven"]
        assert uneven["refusal"] is not None, f"rank {report['rank']}: a single KV head over 2 ranks was enabled"
        assert "KV heads (1) do not divide by 2" in uneven["refusal"]
        assert "k_proj" in uneven["refusal"] and "without tensor parallelism" in uneven["refusal"]
        assert not uneven["enabled_after"] and uneven["attention_after"] == uneven["attention_before"]
        assert uneven["stock_error"] is not None, "stock tensor-parallel generate() now runs this model: lift the refusal"


# --- the rule, on plans as transformers writes them (no processes needed) -----------------------------------------
@pytest.mark.parametrize(
    ("plan", "num_kv_heads", "expected"),
    [
        ({"model.layers.*.self_attn.k_proj": "colwise", "model.layers.*.self_attn.v_proj": "colwise"}, 8, 4),
        ({"model.layers.*.self_attn.k_proj": "colwise", "model.layers.*.self_attn.v_proj": "colwise"}, 3, None),
        ({"layers.*.self_attn.qkv_proj": "packed_colwise"}, 1, None),
        ({"layers.*.self_attn.k_proj": "colwise_gather_output", "layers.*.self_attn.v_proj": "colwise_gather_output"},
         3, 3),
        ({"model.layers.*.mlp.up_proj": "colwise"}, 3, 3),
    ],
    ids=["colwise-even", "colwise-uneven", "packed-mqa", "gathered", "attention-unsharded"],
)
def test_kv_heads_per_rank_from_the_plan(plan, num_kv_heads, expected):
    from paged_generate.patches.tensor_parallel import tensor_parallel_of

    # What `from_pretrained(..., tp_plan=...)` leaves on a rank's model (checked on a real one in test_seams.py)
    sharded = SimpleNamespace(_tp_size=2, tp_plan=plan)
    tensor_parallel = tensor_parallel_of(sharded)
    assert isinstance(tensor_parallel, TensorParallel) and tensor_parallel.size == 2
    assert tensor_parallel.kv_heads_per_rank(num_kv_heads) == expected


def test_a_model_on_one_rank_is_not_tensor_parallel():
    from paged_generate.patches.tensor_parallel import tensor_parallel_of

    model = tiny_model("llama")
    assert model.tp_plan, "the class plan is there even unsharded: only tp_size tells"
    assert tensor_parallel_of(model) is None
