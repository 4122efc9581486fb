"""An enabled model trains as stock: the same loss and gradients in its training forwards.

RL trainers (TRL's GRPO) keep the plugin on for the whole run: the model generates its rollouts, then computes
log-probabilities and the loss with gradients, without a cache, with gradient checkpointing on or off, switching
between `train()` and `eval()`. Those forwards must be stock's, bit for bit, whatever attention the model was loaded
with, and a generate() call in between must leave nothing behind that changes them.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paged_generate import cache_stats, disable_paged_cache, enable_paged_cache
from tiny_models import COMMON, left_padded_prompts


def _build(attn_implementation: str, attention_dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON, attention_dropout=attention_dropout)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn_implementation)
    return model


def _batch():
    input_ids, attention_mask = left_padded_prompts((29, 17, 23), seed=4)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _loss_and_grads(model, seed: int = 11):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout draws
    loss = model(**_batch(), use_cache=False).loss
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(expected, actual):
    expected_loss, expected_grads = expected
    actual_loss, actual_grads = actual
    torch.testing.assert_close(actual_loss, expected_loss, rtol=0, atol=1e-6)
    assert expected_grads.keys() == actual_grads.keys() and len(expected_grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient checkpointing"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("attention_dropout", [0.0, 0.2], ids=["no dropout", "dropout"])
def test_loss_and_gradients_equal_stocks(attention, checkpointing, attention_dropout):
    model = _build(attention, attention_dropout)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for mode in ("train", "eval"):
        getattr(model, mode)()
        stock = _loss_and_grads(model)
        enable_paged_cache(model)
        try:
            paged = _loss_and_grads(model)
        finally:
            disable_paged_cache(model)
        _assert_same(stock, paged)
    if attention_dropout:  # the dropout case means something only if dropout changes the loss
        model.train()
        assert not torch.equal(_loss_and_grads(model, seed=1)[0], _loss_and_grads(model, seed=2)[0])


def test_an_rl_step_generate_then_train_equals_stock():
    """The order a GRPO step takes: gradient checkpointing switched off for generate(), rollouts of repeated prompts,
    checkpointing back on, then the loss in training mode; twice, with an optimizer step in between."""

    def run(enabled: bool):
        model = _build("sdpa")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if enabled:
            enable_paged_cache(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        input_ids, attention_mask = left_padded_prompts((29, 17), seed=2)
        prompts = dict(input_ids=input_ids.repeat_interleave(3, 0), attention_mask=attention_mask.repeat_interleave(3, 0))
        results = []
        for step in range(2):
            model.train()
            model.gradient_checkpointing_disable()
            torch.manual_seed(step)
            with torch.no_grad():
                rollouts = model.generate(**prompts, do_sample=True, max_new_tokens=6, pad_token_id=0)
            prefill_rows = cache_stats(model).prefill_rows if enabled else None
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            mask = torch.cat([prompts["attention_mask"], torch.ones_like(rollouts[:, input_ids.shape[1]:])], dim=1)
            loss = model(input_ids=rollouts, attention_mask=mask, labels=rollouts.masked_fill(mask == 0, -100)).loss
            loss.backward()
            grads = [param.grad.clone() for param in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            results.append((rollouts, loss.detach(), grads, prefill_rows))
        if enabled:
            disable_paged_cache(model)
        return results

    for (stock_rollouts, stock_loss, stock_grads, _), (rollouts, loss, grads, prefill_rows) in zip(
        run(False), run(True), strict=True
    ):
        assert torch.equal(stock_rollouts, rollouts)
        assert prefill_rows == 2  # two distinct prompts, each repeated 3 times
        torch.testing.assert_close(loss, stock_loss, rtol=0, atol=1e-6)
        for expected, actual in zip(stock_grads, grads, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
