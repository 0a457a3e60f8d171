import os
import sys

import pytest
import torch

# tests import the top-level scripts' modules (model.py, convert_weights.py, ...) from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing may be downloaded
os.environ.setdefault('OMP_NUM_THREADS', '1')  # subprocesses too (see one_thread below)


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    # tiny models on 2 shared cores: a second OpenMP thread only spins (measured 4x the CPU time, and 1 s -> 0.02 s
    # for a tiny 3-step sample); subprocesses get OMP_NUM_THREADS=1 for the same reason
    torch.set_num_threads(1)
    yield
