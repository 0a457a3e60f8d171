"""
train.py's data, train*.safetensors shards (data/*/prepare*.py): x0 (N, C, H, W) latents or pixels, txt (N, Lt, D) and
y (N, Dv) text embeddings, one sample shape (a bucket) per folder: data_dir and each sub-folder (prepare_folder.py: one
per aspect ratio). Rows are read memory-mapped; the batch order is a function of seed and step: runs resume from a step.
"""
import os

import numpy as np
import torch
from safetensors import safe_open

def open_buckets(data_dir, cfg):
    """-> a bucket (a list of (shard, size), checked against the model config cfg) per folder holding shards."""
    subdirs = sorted(os.path.join(data_dir, d) for d in os.listdir(data_dir)) if os.path.isdir(data_dir) else []
    buckets = []
    for d in filter(os.path.isdir, [data_dir, *subdirs]):
        names = sorted(f for f in os.listdir(d) if f.startswith('train') and f.endswith('.safetensors'))
        shards = [open_shard(os.path.join(d, f), cfg) for f in names]
        if len({tuple(f.get_slice('x0').get_shape()[1:]) for f, _ in shards}) > 1:
            raise ValueError(f'{d}: its shards hold samples of different shapes (one shape per folder)')
        buckets += [shards] if shards else []
    if not buckets:
        raise FileNotFoundError(f'no train*.safetensors in {data_dir!r} or its sub-folders (run data/*/prepare*.py)')
    return buckets

def open_shard(path, cfg):
    try:
        f = safe_open(path, 'pt')
    except Exception as e:  # random bytes, a pickle, an empty or a truncated file
        raise ValueError(f'{path}: not a safetensors shard ({e})') from None
    if missing := {'x0', 'txt', 'y'} - set(f.keys()):
        raise KeyError(f'{path}: missing tensors {sorted(missing)} (a shard holds x0, txt, y)')
    x, t, y = (f.get_slice(k).get_shape() for k in ('x0', 'txt', 'y'))
    if len(x) != 4 or not x[0] or x[1] * 4 != cfg.in_channels or x[2] % 2 or x[3] % 2:
        raise ValueError(f'{path}: x0 has shape {tuple(x)}; the model needs (N > 0, {cfg.in_channels // 4}, H, W) '
                         f'with even H, W (2x2 patches of in_channels={cfg.in_channels})')
    if t[-1] != cfg.context_in_dim or y[-1] != cfg.vec_in_dim or not x[0] == t[0] == y[0]:
        raise ValueError(f'{path}: txt {tuple(t)} / y {tuple(y)} do not fit the model (context_in_dim='
                         f'{cfg.context_in_dim}, vec_in_dim={cfg.vec_in_dim}) or x0 {tuple(x)}')
    return f, x[0]

def read_samples(bucket, indices):
    """Sample indices within a bucket -> stacked (x0, txt, y), fp32 on the CPU."""
    starts = np.cumsum([0] + [n for _, n in bucket])
    rows = [(bucket[j][0], i - starts[j]) for i in indices.tolist() for j in [np.searchsorted(starts, i, 'right') - 1]]
    return [torch.cat([f.get_slice(k)[r:r + 1] for f, r in rows]).float() for k in ('x0', 'txt', 'y')]

def batch_indices(n_data, pos, batch_size, seed):
    """The pos-th batch of a bucket of n_data samples: a walk through per-epoch permutations seeded by seed + epoch."""
    pos, idx = pos * batch_size, torch.empty(0, dtype=torch.long)
    while len(idx) < batch_size:
        epoch, off = divmod(pos, n_data)
        perm = torch.randperm(n_data, generator=torch.Generator().manual_seed(seed + epoch))
        idx = torch.cat([idx, perm[off:off + batch_size - len(idx)]])
        pos = (epoch + 1) * n_data  # the next permutation, if the batch needs more
    return idx

def bucket_schedule(sizes, steps, seed):
    """-> (bucket_of, pos_of): step s trains on batch pos_of[s] of bucket bucket_of[s], drawn in proportion to size."""
    u = np.random.default_rng(seed).random(steps)  # numpy's stream is prefix-stable: more steps keep the past ones
    bucket_of = np.searchsorted(np.cumsum(sizes) / sum(sizes), u, side='right').clip(max=len(sizes) - 1)
    onehot = bucket_of[:, None] == np.arange(len(sizes))
    return bucket_of, (np.cumsum(onehot, 0) - onehot)[np.arange(steps), bucket_of]  # earlier steps on the bucket
