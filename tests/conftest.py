import hashlib
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

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


def snapshot(folder):
    """relative path -> (mtime_ns, sha256) of every file under folder: 'nothing changed' is an equality."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, 'rb').read()).hexdigest())
    return out


def write_shards(folder, n=(20, 12), channels=4, fill=None, seed=0, hw=(8, 8)):
    """Two train*.safetensors shards of x0 (N, C, 8, 8), txt (N, 5, 32), y (N, 32): the 'tiny' preset's shapes."""
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i, k in enumerate(n):
        x0 = torch.randn(k, channels, *hw, generator=gen)
        if fill is not None:
            x0.fill_(fill)
        save_file({'x0': x0, 'txt': torch.randn(k, 5, 32, generator=gen), 'y': torch.randn(k, 32, generator=gen)},
                  os.path.join(folder, f'train_{i:03d}.safetensors'))
    return str(folder)


def random_tiny_flux(path=None):
    """The 'tiny' preset with large random weights (so a LoRA has something to distil), saved to path if given."""
    import model
    torch.manual_seed(0)
    net = model.Flux(model.PRESETS['tiny'])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    if path:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return net
