"""One rank of the tensor-parallel check that tests/test_tensor_parallel.py launches with torchrun:

    torchrun --standalone --nproc_per_node 2 tests/tp_worker.py MODEL_DIR UNEVEN_MODEL_DIR OUT_DIR

Loads MODEL_DIR with `tp_plan="auto"`, runs each of `CASES` with stock generate() and with the paged cache, and writes
what it saw to OUT_DIR/rank{RANK}.json: tokens, the collectives each call issued, `cache_stats`, a hash of every
step's block tables. UNEVEN_MODEL_DIR holds a model whose KV heads do not divide over the ranks: enabling it must be
refused, model unchanged. The test compares the ranks' files; ranks never exchange anything beyond what the model
itself does.
"""

from __future__ import annotations

import collections
import faulthandler
import hashlib
import json
import os
import sys
import warnings

import torch

BLOCK_SIZE = 4
TIMEOUT_S = 200  # a healthy run takes ~15 s on 2 loaded cores; past this a rank is stuck (in a collective?)
CASES = {
    "beams": dict(num_beams=4, num_return_sequences=2, do_sample=False),
    "sampling": dict(do_sample=True, num_return_sequences=3, top_k=0),
    "greedy": dict(do_sample=False),
}
COMMON = dict(max_new_tokens=10, pad_token_id=0)
SEED = 0


def prompts() -> dict:
    """Two left-padded prompts of 13 and 7 tokens, the same on every rank."""
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.zeros(2, 13, dtype=torch.long)
    attention_mask = torch.zeros(2, 13, dtype=torch.long)
    for row, length in enumerate((13, 7)):
        input_ids[row, 13 - length:] = torch.randint(3, 96, (length,), generator=generator)
        attention_mask[row, 13 - length:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def generate(model, case: str):
    torch.manual_seed(SEED)
    with torch.no_grad():
        return model.generate(**prompts(), **COMMON, **CASES[case])


def _collective_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CollectiveCounter(TorchDispatchMode):
        """Counts the c10d collectives (plain and functional) that run inside the block, by op."""

        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "c10d" in func.namespace:
                self.counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    return CollectiveCounter()


def _tables_digest(steps) -> str:
    digest = hashlib.sha256()
    for step in steps:
        for array in (step.block_tables, step.ref_counts, step.copied):
            digest.update(repr(array.shape).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def run_case(model, case: str) -> dict:
    from paged_generate import cache_stats, capture_caches, disable_paged_cache, enable_paged_cache

    disable_paged_cache(model)
    with _collective_counter() as stock_counter:
        stock = generate(model, case)
    enable_paged_cache(model, block_size=BLOCK_SIZE, min_shared_tokens=0)  # the paged path, as in conftest.py
    with capture_caches(model, record_steps=True) as captured, _collective_counter() as paged_counter:
        paged = generate(model, case)
    stats = cache_stats(model)
    disable_paged_cache(model)
    return {
        "stock": stock.tolist(),
        "paged": paged.tolist(),
        "stock_collectives": dict(stock_counter.counts),
        "paged_collectives": dict(paged_counter.counts),
        "stats": stats.as_dict(),
        "layer_bytes_per_token": [layer.bytes_per_token for layer in captured.caches[0].layers],
        "steps": len(captured.steps),
        "max_ref_count": max(int(step.ref_counts.max()) for step in captured.steps),
        "tables_sha256": _tables_digest(captured.steps),
    }


def run_capped(model, peak_kv_bytes: int) -> dict:
    """The beams case again, capped at exactly the bytes this rank's pools needed for it."""
    from paged_generate import disable_paged_cache, enable_paged_cache

    enable_paged_cache(model, block_size=BLOCK_SIZE, max_cache_bytes=peak_kv_bytes)
    try:
        return {"paged": generate(model, "beams").tolist(), "error": None}
    except Exception as error:  # reported to the test, which shows it
        return {"paged": None, "error": f"{type(error).__name__}: {error}"}
    finally:
        disable_paged_cache(model)


def run_uneven(model) -> dict:
    from paged_generate import UnsupportedModelError, enable_paged_cache, is_paged_cache_enabled
    from paged_generate.patches.attention_impl import implementation_of

    before = implementation_of(model.config)
    try:
        enable_paged_cache(model)
        refusal = None
    except UnsupportedModelError as error:
        refusal = str(error)
    result = {"refusal": refusal, "enabled_after": is_paged_cache_enabled(model),
              "attention_before": before, "attention_after": implementation_of(model.config)}
    try:  # what stock generate() makes of it
        generate(model, "greedy")
        result["stock_error"] = None
    except Exception as error:
        result["stock_error"] = f"{type(error).__name__}: {error}"
    return result


def main(model_dir: str, uneven_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    import transformers
    from transformers import AutoModelForCausalLM

    # A rank stuck past the deadline prints where every thread is and exits, so that torchrun stops the others.
    faulthandler.dump_traceback_later(TIMEOUT_S, exit=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # `tp_plan=` is to move into DistributedConfig
    transformers.logging.set_verbosity_error()
    rank = int(os.environ["RANK"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    report = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "tp_size": model.tp_size,
              "transformers": transformers.__version__, "cases": {}}
    for case in CASES:
        report["cases"][case] = run_case(model, case)
    report["capped"] = run_capped(model, report["cases"]["beams"]["stats"]["peak_kv_bytes"])
    uneven = AutoModelForCausalLM.from_pretrained(uneven_dir, tp_plan="auto").eval()
    report["uneven"] = run_uneven(uneven)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(report, file)
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main(*sys.argv[1:4])
