import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: a second intra-op thread buys nothing and, on a shared 2-core machine, spin-waiting
# OpenMP threads make runs several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def page_every_call():
    """The tests' tiny models and prompts share too little for paging to pay, so by the measured rule (call_rule.py)
    their calls would run on stock's cache: here every call is paged, as the tests are about the paged path (session
    scope: module fixtures generate too). tests/test_call_rule.py restores the rule; subprocesses run with it."""
    from paged_generate import call_rule  # here, not at the top: tests/kernels/conftest.py first sets TRITON_INTERPRET

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(call_rule, "SHARED_TOKENS_PER_NEW_TOKEN", 0)
        yield
