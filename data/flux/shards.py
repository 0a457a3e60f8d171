"""
What data/flux/prepare_teacher.py and prepare_folder.py share: rank/chunk bookkeeping, atomic shard writes, and
the text-encoding pass.

Resumability: the items (prompts, or images) are cut into fixed chunks of `chunk` consecutive indices; chunk c is
done exactly when its output exists, and outputs are written to a temporary name and os.replace'd, so a killed run
leaves either a whole chunk or nothing. A rerun skips done chunks: no sample is lost or written twice. The chunk
size is recorded in meta.json and must not change between runs. Rank r of a torchrun job does chunks r, r+world,
... (plain `python` is rank 0 of 1; no process group is needed: ranks never talk to each other).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # sample.py, model.py, convert_weights.py live at the repo root

from sample import encode_prompts, load_text_encoders  # noqa: E402


def dist_info(device):
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    if device.startswith('cuda') and ':' not in device:
        device = f'cuda:{local}'
    return rank, world, device


def my_chunks(n_items, chunk, rank, world):
    return list(range(rank, (n_items + chunk - 1) // chunk, world))


def chunk_range(c, chunk, n_items):
    return range(c * chunk, min((c + 1) * chunk, n_items))


def save_atomic(tensors, path, metadata=None):
    tmp = path + f'.tmp{os.getpid()}'
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one


def check_meta(out_dir, meta):
    """Write meta.json on the first run; on a rerun, refuse settings that would change the chunking."""
    path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(path):
        old = json.load(open(path))
        diff = {k: (old.get(k), v) for k, v in meta.items() if k in ('chunk', 'n_items') and old.get(k) != v}
        if diff:
            raise ValueError(f'{out_dir} was started with other settings {diff} (old, new): resume with the same '
                             f'chunk size and inputs, or use a new --out')
    tmp = path + f'.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, path)


def encode_pass(texts, chunks, chunk, emb_dir, a):
    """Text embeddings of every pending chunk -> emb_dir/emb_XXXXX.safetensors. The encoders are loaded only if
    something is missing and freed before the caller loads the DiT / AE."""
    todo = [c for c in chunks if not os.path.exists(os.path.join(emb_dir, f'emb_{c:05d}.safetensors'))]
    if not todo:
        return
    os.makedirs(emb_dir, exist_ok=True)
    dtype = getattr(torch, a.dtype)
    enc = load_text_encoders(a.t5, a.clip, a.device, dtype)
    from tqdm import tqdm
    for c in tqdm(todo, desc=f'encode (rank {a.rank})', disable=a.quiet):
        idx = list(chunk_range(c, chunk, len(texts)))
        txt, y = [], []
        for i in range(0, len(idx), a.batch):
            t, v = encode_prompts([texts[j] for j in idx[i:i + a.batch]], enc, a.max_length)
            txt.append(t.cpu()), y.append(v.cpu())
        save_atomic({'txt': torch.cat(txt), 'y': torch.cat(y)}, os.path.join(emb_dir, f'emb_{c:05d}.safetensors'))
    del enc
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_emb(emb_dir, c):
    return load_file(os.path.join(emb_dir, f'emb_{c:05d}.safetensors'))


def add_common_args(ap):
    ap.add_argument('--out', required=True, help='output folder for the shards')
    ap.add_argument('--t5', required=True, help='local T5 encoder folder')
    ap.add_argument('--clip', required=True, help='local CLIP text encoder folder')
    ap.add_argument('--ae', required=True, help='autoencoder: ae.safetensors or a diffusers vae folder')
    ap.add_argument('--max_length', type=int, default=512, help='T5 tokens: 512 dev, 256 schnell')
    ap.add_argument('--chunk', type=int, default=64, help='items per shard (fixed for the life of --out)')
    ap.add_argument('--batch', type=int, default=4, help='items per forward pass')
    ap.add_argument('--txt_dtype', default='bfloat16', choices=['bfloat16', 'float32'],
                    help='stored dtype of the T5 embeddings (512x4096 per sample: bf16 halves the disk)')
    ap.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'], help='compute dtype')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--max_chunks', type=int, default=0, help='stop after this many new chunks (0 = all)')
    ap.add_argument('--quiet', action='store_true', help='no progress bars')
