"""
Your own images + captions -> Flux training shards in aspect-ratio buckets (README, Data).

    python data/flux/prepare_folder.py --images my_images/ --out data/my_set --resolution 512 \
        --t5 FLUX.1-dev/text_encoder_2 --clip FLUX.1-dev/text_encoder --ae ae.safetensors

Captions: name.txt next to each name.png/.jpg/..., or captions.jsonl lines {"file": "name.png", "text": "..."}.
Each image is resized to cover and center-cropped to the bucket nearest in log aspect ratio (sides multiples of 16,
area ~resolution^2): out/{H}x{W}/train_XXXXX.safetensors. Chunk c is done when out/done/XXXXX.json exists.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

# prepare_teacher first: it puts the repo root (sample.py) on sys.path
from prepare_teacher import add_common_args, chunk_range, emb_path, encode_pass, pending_chunks, save_atomic
from convert_weights import load_ae
from sample import run_cli

EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')

def make_buckets(resolution, max_ratio=2.0):
    """(H, W) pairs, multiples of 16, area ~ resolution^2, aspect ratio within [1/max_ratio, max_ratio]."""
    heights = range(16, int(resolution * math.sqrt(max_ratio)) + 16, 16)
    sides = {(h, max(16, round(resolution * resolution / h / 16) * 16)) for h in heights}
    return sorted((h, w) for h, w in sides if 1 / max_ratio <= w / h <= max_ratio)

def nearest_bucket(h, w, buckets):
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - math.log(w / h)), -b[0] * b[1]))

def read_image(path, size_only=False):
    """-> (h, w) from the header alone, or the RGB image; a file PIL cannot read is a ValueError naming it."""
    try:
        with Image.open(path) as im:
            return (im.height, im.width) if size_only else im.convert('RGB')
    except Exception as e:
        raise ValueError(f'{path}: cannot read image ({type(e).__name__}: {e})') from None

def load_image(path, bucket):
    """-> uint8 (3, H, W): cover-resize (bicubic) then center crop to the bucket."""
    im, (H, W) = read_image(path), bucket
    s = max(H / im.height, W / im.width)
    rh, rw = max(H, round(im.height * s)), max(W, round(im.width * s))
    top, left = (rh - H) // 2, (rw - W) // 2
    im = im.resize((rw, rh), Image.BICUBIC).crop((left, top, left + W, top + H))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

def list_items(folder, captions=None):
    """-> sorted list of (image path, caption)."""
    captions = captions or os.path.join(folder, 'captions.jsonl')
    if os.path.exists(captions):
        with open(captions, encoding='utf-8') as f:
            table = {(r := json.loads(line))['file']: r['text'] for line in f if line.strip()}
    else:
        table = {}
        for name in sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTS)):
            with open(os.path.join(folder, os.path.splitext(name)[0] + '.txt'), encoding='utf-8') as f:
                table[name] = f.read().strip()
    if not table:
        raise ValueError(f'{folder}: no images ({"/".join(EXTS)}) found')
    return [(os.path.join(folder, name), table[name]) for name in sorted(table)]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--images', required=True, help='folder of images with captions')
    ap.add_argument('--captions', help='captions.jsonl (default: IMAGES/captions.jsonl, else name.txt files)')
    ap.add_argument('--resolution', type=int, default=512, help='bucket area ~ resolution^2')
    ap.add_argument('--max_ratio', type=float, default=2.0, help='most extreme bucket aspect ratio')
    add_common_args(ap)
    args = ap.parse_args(argv)
    items = list_items(args.images, args.captions)
    buckets = make_buckets(args.resolution, args.max_ratio)
    done = lambda c: os.path.join(args.out, 'done', f'{c:05d}.json')  # noqa: E731
    meta = {'resolution': args.resolution, 'buckets': buckets, 'images': os.path.abspath(args.images)}
    pending = pending_chunks(args, meta, len(items), done)
    if not pending:
        return
    # every pending image is read once up front: an unreadable file fails the run before any GPU work
    bucket = {i: nearest_bucket(*read_image(items[i][0], size_only=True), buckets)
              for c in pending for i in chunk_range(c, args.chunk, len(items))}
    encode_pass([text for _, text in items], pending, args)

    dtype = getattr(torch, args.dtype)
    ae = load_ae(args.ae, args.device, dtype)
    os.makedirs(os.path.join(args.out, 'done'), exist_ok=True)
    for c in tqdm(pending, desc=f'encode images (rank {args.rank})', disable=args.quiet):
        emb, idx, written = load_file(emb_path(args.out, c)), chunk_range(c, args.chunk, len(items)), {}
        for H, W in sorted({bucket[i] for i in idx}):
            ks = [k for k, i in enumerate(idx) if bucket[i] == (H, W)]  # positions within the chunk
            x0 = []
            for j in range(0, len(ks), args.batch):
                pix = torch.stack([load_image(items[idx[k]][0], (H, W)) for k in ks[j:j + args.batch]])
                x0.append(ae.encode(pix.to(args.device, dtype) / 127.5 - 1).float().cpu())
            os.makedirs(os.path.join(args.out, f'{H}x{W}'), exist_ok=True)
            save_atomic({'x0': torch.cat(x0), 'txt': emb['txt'][ks].to(getattr(torch, args.txt_dtype)),
                         'y': emb['y'][ks].float(), 'index': torch.tensor([idx[k] for k in ks])},
                        os.path.join(args.out, f'{H}x{W}', f'train_{c:05d}.safetensors'),
                        metadata={'format': 'scfm-shard-v1', 'source': 'folder'})
            written[f'{H}x{W}'] = len(ks)
        with open(done(c) + '.tmp', 'w') as f:
            json.dump(written, f)
        os.replace(done(c) + '.tmp', done(c))
        os.remove(emb_path(args.out, c))
    print(f'rank {args.rank}: {len(pending)} chunk(s) done in {args.out}')

if __name__ == '__main__':
    run_cli(main)
