import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: a second intra-op thread buys nothing and, on a shared 2-core machine, spin-waiting
# OpenMP threads make runs several times slower.
torch.set_num_threads(1)
