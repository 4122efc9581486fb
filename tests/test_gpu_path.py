"""What the GPU path must not do on the PyTorch side, checked on CPU: read a tensor back to the host during attention
of a decode step (on CUDA each read is a sync, per layer and step)."""

import contextlib

import pytest
import torch

from paged_generate import disable_paged_cache, enable_paged_cache
from paged_generate.attention import dispatch
from tiny_models import left_padded_prompts, tiny_model

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@contextlib.contextmanager
def counting_host_reads():
    """Counts tensor reads to the host (what `torch.cuda.set_sync_debug_mode` flags on CUDA) while active."""
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("decoding", [dict(num_beams=3), dict(do_sample=True, num_return_sequences=3)],
                         ids=["beams", "samples"])
def test_attention_reads_nothing_back_on_the_pytorch_path(decoding, monkeypatch):
    # fp32 on CPU: the decode steps take the shared-prefix split (rows sharing nothing are handed to stock's attention
    # as views of the pools, without the paged path).
    model = tiny_model("mistral")
    ids, mask = left_padded_prompts((21, 12))
    reads, calls = [], []
    original = dispatch.paged_attention

    def watched(*args, **kwargs):
        with counting_host_reads() as inside:
            out = original(*args, **kwargs)
        calls.append(args[1].step.query_len)
        reads.extend(inside)
        return out

    monkeypatch.setattr(dispatch, "paged_attention", watched)
    enable_paged_cache(model, backend="torch")
    try:
        torch.manual_seed(0)
        model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, max_new_tokens=4, **decoding)
    finally:
        disable_paged_cache(model)
    assert calls.count(1) >= 2 * model.config.num_hidden_layers, calls  # decode steps went through the paged path
    assert not reads, reads
