"""Interrupted calls, long life, threads, disable/re-enable: the cache never leaks and never mixes calls."""

import gc
import resource
import threading

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from paged_generate import cache_stats, capture_caches, disable_paged_cache, enable_paged_cache
from paged_generate.cache import PagedCache
from tiny_models import left_padded_prompts, tiny_model


@pytest.fixture()
def model():
    model = tiny_model("llama")
    yield model
    disable_paged_cache(model)


class Boom(Exception):
    pass


class RaiseAtStep(StoppingCriteria):
    def __init__(self, step, error):
        self.step, self.error, self.calls = step, error, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            raise self.error
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class RaisingProcessor(LogitsProcessor):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            raise Boom("from a logits processor")
        return scores


@pytest.mark.parametrize(
    "make_kwargs, error",
    [
        (lambda: dict(stopping_criteria=StoppingCriteriaList([RaiseAtStep(4, Boom("stop"))])), Boom),
        (lambda: dict(logits_processor=LogitsProcessorList([RaisingProcessor(3)])), Boom),
        (lambda: dict(stopping_criteria=StoppingCriteriaList([RaiseAtStep(5, KeyboardInterrupt())])), KeyboardInterrupt),
    ],
)
def test_interrupted_call_frees_everything_and_model_works(model, make_kwargs, error):
    enable_paged_cache(model)
    input_ids, attention_mask = left_padded_prompts((12, 8))
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=12, num_beams=4)
    with capture_caches(model) as captured, pytest.raises(error):
        model.generate(**kwargs, **make_kwargs())
    created = captured.caches
    assert created and all(cache.allocator.num_used == 0 for cache in created)
    assert all(layer.keys is None for cache in created for layer in cache.layers)
    paged = model.generate(**kwargs)
    disable_paged_cache(model)
    assert torch.equal(paged, model.generate(**kwargs))


def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def _plugin_objects():
    gc.collect()
    return sum(type(obj) is PagedCache for obj in gc.get_objects())


def test_long_life_returns_to_baseline(model):
    enable_paged_cache(model)
    configs = [dict(num_beams=4), dict(do_sample=True, num_return_sequences=3), dict(), dict(num_beams=2,
               num_return_sequences=2), dict(do_sample=True, num_return_sequences=6, top_k=10)]

    def call(i):
        input_ids, attention_mask = left_padded_prompts((5 + i % 23, 3 + i % 7), seed=i)
        model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0,
                       max_new_tokens=2 + i % 9, **configs[i % len(configs)])

    for i in range(20):  # warm up allocator arenas before taking the baseline
        call(i)
    baseline_rss, baseline_objects = _rss_kib(), _plugin_objects()
    with capture_caches(model) as captured:
        for i in range(200):
            call(i)
            assert captured.caches[-1].allocator.num_used == 0
            assert all(layer.keys is None for layer in captured.caches[-1].layers)
    captured.caches.clear()
    assert _plugin_objects() <= baseline_objects
    grown_mib = (_rss_kib() - baseline_rss) / 1024
    assert grown_mib < 20, f"process memory grew by {grown_mib:.1f} MiB over 200 calls"


def test_threads_get_the_same_outputs_as_alone(model):
    jobs = [
        dict(lengths=(9, 4), max_new_tokens=10, num_beams=4),
        dict(lengths=(15,), max_new_tokens=12, num_beams=2, num_return_sequences=2),
        dict(lengths=(6, 6, 3), max_new_tokens=8),
        dict(lengths=(20, 11), max_new_tokens=9, num_beams=3),
    ]

    def run(job, seed):
        job = dict(job)
        input_ids, attention_mask = left_padded_prompts(job.pop("lengths"), seed=seed)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, **job)

    enable_paged_cache(model)
    alone = [run(job, i) for i, job in enumerate(jobs)]
    results, errors = [None] * len(jobs), []

    def worker(i):
        try:
            for _ in range(3):
                results[i] = run(jobs[i], i)
                assert torch.equal(results[i], alone[i])
        except Exception as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(torch.equal(result, expected) for result, expected in zip(results, alone))


def test_disable_after_use_is_stock_and_reenable_works(model):
    input_ids, attention_mask = left_padded_prompts((10, 6))
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, max_new_tokens=10, num_beams=3)
    stock = model.generate(**kwargs)
    enable_paged_cache(model)
    paged = model.generate(**kwargs)
    disable_paged_cache(model)
    assert torch.equal(model.generate(**kwargs), stock)
    enable_paged_cache(model)
    assert torch.equal(model.generate(**kwargs), paged)
    assert cache_stats(model).prefill_rows == 2
    assert torch.equal(paged, stock)
