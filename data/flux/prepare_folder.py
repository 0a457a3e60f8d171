"""
Your own images + captions -> Flux training shards in aspect-ratio buckets (README, Data).

Captions: name.txt next to each name.png/.jpg/..., or captions.jsonl lines {"file": "name.png", "text": "..."}.
Each image is resized to cover and center-cropped to the bucket nearest in log aspect ratio (sides multiples of 16,
area ~resolution^2): out/{H}x{W}/train_XXXXX.safetensors holds chunk XXXXX's images of that bucket. A chunk's shards
are written in bucket order: it is done when the one of its last bucket exists.
"""
import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

# prepare_teacher first: it puts the repo root on sys.path
from prepare_teacher import add_common_args, emb_path, pending_chunks
from checks import CLI, check_options
from convert_weights import load_ae, read_ae, write_dict
from sample import run_cli

EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')

def load_image(path, bucket=None):
    """-> uint8 (3, H, W): cover-resized (bicubic), then center-cropped to the bucket (H, W); no bucket: (h, w) from
    the header alone. A file PIL cannot read is a ValueError naming it."""
    try:
        with Image.open(path) as im:
            if bucket is None:
                return im.height, im.width
            H, W = bucket
            s = max(H / im.height, W / im.width)
            im = im.convert('RGB').resize((max(W, round(im.width * s)), max(H, round(im.height * s))), Image.BICUBIC)
    except Exception as e:
        raise ValueError(f'{path}: cannot read image ({type(e).__name__}: {e})') from None
    top, left = (im.height - H) // 2, (im.width - W) // 2
    return torch.from_numpy(np.asarray(im.crop((left, top, left + W, top + H))).copy()).permute(2, 0, 1)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--images', required=True, help='folder of images with captions')
    ap.add_argument('--captions', help='captions.jsonl (default: IMAGES/captions.jsonl, else name.txt files)')
    ap.add_argument('--resolution', type=int, default=512, help='bucket area ~ resolution^2')
    ap.add_argument('--max_ratio', type=float, default=2.0, help='most extreme bucket aspect ratio')
    add_common_args(ap)
    args = ap.parse_args(argv)
    check_options(vars(args), CLI, '--{} {!r}')
    read_ae(args.ae)  # its header: a wrong or broken file fails before any work
    if os.path.exists(captions := args.captions or os.path.join(args.images, 'captions.jsonl')):
        with open(captions, encoding='utf-8') as f:
            table = {(r := json.loads(line))['file']: r['text'] for line in f if line.strip()}
    else:  # name.txt next to each image
        table = {name: Path(args.images, os.path.splitext(name)[0] + '.txt').read_text(encoding='utf-8').strip()
                 for name in sorted(os.listdir(args.images)) if name.lower().endswith(EXTS)}
    if not table:
        raise ValueError(f'{args.images}: no images ({"/".join(EXTS)}) found')
    paths, texts = [os.path.join(args.images, name) for name in sorted(table)], [table[name] for name in sorted(table)]
    # buckets: (H, W) multiples of 16, area ~ resolution^2, aspect ratio within [1/max_ratio, max_ratio]
    sides = {(h, max(16, round(args.resolution ** 2 / h / 16) * 16))
             for h in range(16, int(args.resolution * math.sqrt(args.max_ratio)) + 16, 16)}
    buckets = sorted((h, w) for h, w in sides if 1 / args.max_ratio <= w / h <= args.max_ratio)
    # every header is read up front: an unreadable file fails the run before any other work; ties go to larger buckets
    bucket = [min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - math.log(w / h)), -b[0] * b[1]))
              for h, w in map(load_image, paths)]
    shard = lambda c, H, W: os.path.join(args.out, f'{H}x{W}', f'train_{c:05d}.safetensors')  # noqa: E731
    done = lambda c: shard(c, *max(bucket[c * args.chunk:(c + 1) * args.chunk]))  # noqa: E731
    meta = {'resolution': args.resolution, 'buckets': buckets, 'images': os.path.abspath(args.images)}
    pending = pending_chunks(args, meta, texts, done)
    dtype = getattr(torch, args.dtype)
    ae = load_ae(args.ae, args.device, dtype) if pending else None
    for c, idx in tqdm(pending.items(), desc=f'encode images (rank {args.rank})', disable=args.quiet):
        emb = load_file(emb_path(args.out, c))
        for H, W in sorted({bucket[i] for i in idx}):
            ks = [k for k, i in enumerate(idx) if bucket[i] == (H, W)]  # positions within the chunk
            pix = (torch.stack([load_image(paths[idx[k]], (H, W)) for k in ks[j:j + args.batch]])
                   for j in range(0, len(ks), args.batch))
            x0 = [ae.encode(p.to(args.device, dtype) / 127.5 - 1).float().cpu() for p in pix]
            os.makedirs(os.path.join(args.out, f'{H}x{W}'), exist_ok=True)
            write_dict(shard(c, H, W), {'x0': torch.cat(x0), 'txt': emb['txt'][ks].to(getattr(torch, args.txt_dtype)),
                                        'y': emb['y'][ks].float(), 'index': torch.tensor([idx[k] for k in ks])},
                       metadata={'format': 'scfm-shard-v1', 'source': 'folder'})
        os.remove(emb_path(args.out, c))
    print(f'rank {args.rank}: {len(pending)} chunk(s) done in {args.out}')

if __name__ == '__main__':
    run_cli(main)
