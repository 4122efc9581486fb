"""A real client: TRL's `GRPOTrainer` (no vLLM) training with the plugin on gives what it gives without it.

GRPO repeats every prompt `num_generations` times as rows of one batch (its `RepeatSampler`) and calls plain
`unwrapped_model.generate(input_ids, attention_mask, generation_config=...)` on the model in training mode, with
gradient checkpointing switched off around the call. With `enable_paged_cache` each distinct prompt is computed once
and its rows share its blocks; the completions, the logged loss and gradient norm, and the trained weights equal
those of the same seeded run without the plugin, for full fine-tuning and for a LoRA adapter (`peft_config`).

Everything is local: a word-level tokenizer trained here, a tiny Llama saved with `save_pretrained`, an in-memory
dataset, no reporting.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from family_models import BY_NAME
from paged_generate import cache_stats, capture_caches, enable_paged_cache
from test_ecosystem import SENTENCES, _train_tokenizer

trl = pytest.importorskip("trl", reason="the `rl` extra installs trl; CI runs these tests")
datasets = pytest.importorskip("datasets", reason="trl depends on datasets")

NUM_GENERATIONS = 4
PROMPTS_PER_STEP = 2
# Two sentences each (17-23 words): every prompt fills at least one 16-token block, which its rows share.
PROMPTS = [f"{SENTENCES[i]} {SENTENCES[i + 4]}" for i in range(4)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo-llama")
    tokenizer = _train_tokenizer()
    llama = BY_NAME["Llama"]
    family = dataclasses.replace(llama, config_kwargs={**llama.config_kwargs, "vocab_size": len(tokenizer)})
    model = family.build()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _distinct_words(completions, **kwargs) -> list[float]:
    return [float(len(set(completion.split()))) for completion in completions]


def _train(path, output_dir, enabled: bool, peft_config=None, **config) -> dict:
    """One seeded GRPO run of two steps; what it generated, logged and learned."""
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if enabled:
        enable_paged_cache(model)
    rollouts = []

    def reward(prompts, completions, **kwargs):
        stats = cache_stats(model) if enabled else None
        rollouts.append((list(prompts), list(completions), stats))
        return _distinct_words(completions)

    args = trl.GRPOConfig(
        output_dir=str(output_dir), use_vllm=False, num_generations=NUM_GENERATIONS, max_steps=2,
        per_device_train_batch_size=NUM_GENERATIONS * PROMPTS_PER_STEP, max_completion_length=8,
        learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, **config,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
    )
    with capture_caches(model) if enabled else nullcontext() as captured:
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return dict(
        rollouts=rollouts,
        losses=[entry["loss"] for entry in logs],
        grad_norms=[entry["grad_norm"] for entry in logs],
        weights={name: param.detach().clone() for name, param in trainer.model.named_parameters()},
        caches=captured.caches if enabled else None,
    )


def _assert_same_run(stock: dict, paged: dict, prompt_forward_rows: int = PROMPTS_PER_STEP) -> None:
    assert len(stock["rollouts"]) == len(paged["rollouts"]) == 2
    for (stock_prompts, stock_completions, _), (prompts, completions, stats) in zip(
        stock["rollouts"], paged["rollouts"], strict=True
    ):
        assert prompts == stock_prompts
        assert completions == stock_completions
        assert len(prompts) == NUM_GENERATIONS * PROMPTS_PER_STEP
        # The prompt forward ran once per distinct prompt; the rows of each prompt shared its full blocks (one or
        # two of the three or four blocks each row holds by the end).
        assert stats.rows == len(prompts)
        assert len(set(prompts)) == PROMPTS_PER_STEP and stats.prefill_rows == prompt_forward_rows
        if prompt_forward_rows == PROMPTS_PER_STEP:
            assert stats.saving > 0.2
    assert len(set(stock["rollouts"][0][1])) > 1, "sampling should give different completions"
    assert paged["losses"] == stock["losses"] and len(stock["losses"]) == 2
    assert paged["grad_norms"] == stock["grad_norms"] and all(norm > 0 for norm in stock["grad_norms"])
    assert stock["weights"].keys() == paged["weights"].keys()
    for name, weight in stock["weights"].items():
        torch.testing.assert_close(paged["weights"][name], weight, rtol=0, atol=1e-6, msg=name)
    assert len(paged["caches"]) == 2 and all(cache.allocator.num_used == 0 for cache in paged["caches"])


def test_grpo_with_the_plugin_equals_grpo_without(saved, tmp_path):
    stock = _train(saved, tmp_path / "stock", enabled=False)
    paged = _train(saved, tmp_path / "paged", enabled=True)
    _assert_same_run(stock, paged)


def _lora(dropout: float = 0.0):
    peft = pytest.importorskip("peft", reason="the `rl` extra installs peft; CI runs these tests")
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=dropout)


def test_grpo_with_a_lora_adapter(saved, tmp_path):
    stock = _train(saved, tmp_path / "stock", enabled=False, peft_config=_lora())
    paged = _train(saved, tmp_path / "paged", enabled=True, peft_config=_lora())
    _assert_same_run(stock, paged)
    assert any("lora_" in name for name in paged["weights"])


def test_grpo_with_lora_dropout(saved, tmp_path):
    """GRPO generates in training mode: with LoRA dropout, stock's prompt forward draws a mask per row, so every row
    is computed, as stock does; `disable_dropout=True` brings back the prompt computed once."""
    stock = _train(saved, tmp_path / "stock", enabled=False, peft_config=_lora(dropout=0.1))
    paged = _train(saved, tmp_path / "paged", enabled=True, peft_config=_lora(dropout=0.1))
    _assert_same_run(stock, paged, prompt_forward_rows=NUM_GENERATIONS * PROMPTS_PER_STEP)
    stock = _train(saved, tmp_path / "stock", enabled=False, peft_config=_lora(dropout=0.1), disable_dropout=True)
    paged = _train(saved, tmp_path / "paged", enabled=True, peft_config=_lora(dropout=0.1), disable_dropout=True)
    _assert_same_run(stock, paged)
