"""
Your own images + captions -> Flux training shards, with aspect-ratio buckets.

    python data/flux/prepare_folder.py --images my_images/ --out data/my_set --resolution 512 \
        --t5 FLUX.1-dev/text_encoder_2 --clip FLUX.1-dev/text_encoder --ae ae.safetensors
    torchrun --standalone --nproc_per_node=8 data/flux/prepare_folder.py ...

Captions: one `name.txt` next to every `name.png/.jpg/...`, or a captions.jsonl in the folder (or --captions) with
lines {"file": "name.png", "text": "..."}. Every image is resized (to cover) and center-cropped to the bucket of
about resolution^2 pixels, sides multiples of 16, whose aspect ratio is nearest in log space. Buckets go to
separate folders, out/{H}x{W}/train_XXXXX.safetensors (x0, txt, y, index = the image's position in the sorted file
list); train.py --data_dir=out trains on all of them, one bucket per batch. Chunk c = sorted images [c*chunk, (c+1)*chunk) is
done when out/done/XXXXX.json exists (written last), so a killed run redoes at most the chunks in flight.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shards as S  # noqa: E402
from sample import cli_error, load_ae  # noqa: E402

EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def make_buckets(resolution, max_ratio=2.0):
    """(H, W) pairs, multiples of 16, area ~ resolution^2, aspect ratio within [1/max_ratio, max_ratio]."""
    area, out = resolution * resolution, set()
    for h in range(16, int(resolution * math.sqrt(max_ratio)) + 16, 16):
        w = max(16, round(area / h / 16) * 16)
        if 1 / max_ratio <= w / h <= max_ratio:
            out.add((h, w))
    return sorted(out)


def nearest_bucket(h, w, buckets):
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - math.log(w / h)), -b[0] * b[1]))


def load_image(path, bucket):
    """-> uint8 (3, H, W): cover-resize (bicubic) then center crop to the bucket."""
    try:
        im = Image.open(path)
        im.load()
        im = im.convert('RGB')
    except Exception as e:
        raise ValueError(f'{path}: cannot read image ({type(e).__name__}: {e})') from None
    H, W = bucket
    s = max(H / im.height, W / im.width)
    rh, rw = max(H, round(im.height * s)), max(W, round(im.width * s))
    im = im.resize((rw, rh), Image.BICUBIC)
    top, left = (rh - H) // 2, (rw - W) // 2
    im = im.crop((left, top, left + W, top + H))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def list_items(folder, captions=None):
    """-> sorted list of (image path, caption)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'image folder {folder!r} does not exist')
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTS))
    captions = captions or os.path.join(folder, 'captions.jsonl')
    if os.path.exists(captions):
        with open(captions, encoding='utf-8') as f:
            table = {(r := json.loads(line))['file']: r['text'] for line in f if line.strip()}
        files = sorted(table)
        items = [(os.path.join(folder, f), table[f]) for f in files]
    else:
        items = []
        for f in files:
            cap = os.path.join(folder, os.path.splitext(f)[0] + '.txt')
            if not os.path.exists(cap):
                raise FileNotFoundError(f'{os.path.join(folder, f)}: no caption ({cap} or {captions})')
            items.append((os.path.join(folder, f), open(cap, encoding='utf-8').read().strip()))
    if not items:
        raise ValueError(f'{folder}: no images ({"/".join(EXTS)}) found')
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--images', required=True, help='folder of images with captions')
    ap.add_argument('--captions', help='captions.jsonl (default: IMAGES/captions.jsonl, else name.txt files)')
    ap.add_argument('--resolution', type=int, default=512, help='bucket area ~ resolution^2')
    ap.add_argument('--max_ratio', type=float, default=2.0, help='most extreme bucket aspect ratio')
    S.add_common_args(ap)
    a = ap.parse_args(argv)
    items = list_items(a.images, a.captions)
    buckets = make_buckets(a.resolution, a.max_ratio)
    a.rank, world, a.device = S.dist_info(a.device)
    done_dir = os.path.join(a.out, 'done')
    os.makedirs(done_dir, exist_ok=True)
    S.check_meta(a.out, {'chunk': a.chunk, 'n_items': len(items), 'resolution': a.resolution,
                         'buckets': buckets, 'images': os.path.abspath(a.images)})
    done = lambda c: os.path.join(done_dir, f'{c:05d}.json')  # noqa: E731
    pending = [c for c in S.my_chunks(len(items), a.chunk, a.rank, world) if not os.path.exists(done(c))]
    if a.max_chunks:
        pending = pending[:a.max_chunks]
    if not pending:
        print(f'rank {a.rank}: nothing to do, all chunks of {a.out} are done')
        return
    # read every pending image header once up front: an unreadable file fails the run before any GPU work
    sizes = {}
    for c in pending:
        for i in S.chunk_range(c, a.chunk, len(items)):
            try:
                with Image.open(items[i][0]) as im:
                    sizes[i] = (im.height, im.width)
            except Exception as e:
                raise ValueError(f'{items[i][0]}: cannot read image ({type(e).__name__}: {e})') from None
    emb_dir = os.path.join(a.out, 'emb_tmp')
    S.encode_pass([t for _, t in items], pending, a.chunk, emb_dir, a)

    dtype = getattr(torch, a.dtype)
    ae = load_ae(a.ae, a.device, dtype)
    for c in tqdm(pending, desc=f'encode images (rank {a.rank})', disable=a.quiet):
        emb = S.load_emb(emb_dir, c)
        idx = list(S.chunk_range(c, a.chunk, len(items)))
        groups = {}  # bucket -> positions within the chunk
        for k, i in enumerate(idx):
            groups.setdefault(nearest_bucket(*sizes[i], buckets), []).append(k)
        written = {}
        for (H, W), ks in groups.items():
            x0 = []
            for j in range(0, len(ks), a.batch):
                pix = torch.stack([load_image(items[idx[k]][0], (H, W)) for k in ks[j:j + a.batch]])
                with torch.no_grad():
                    x0.append(ae.encode(pix.to(a.device, dtype) / 127.5 - 1).float().cpu())
            sel = torch.tensor(ks)
            folder = os.path.join(a.out, f'{H}x{W}')
            os.makedirs(folder, exist_ok=True)
            S.save_atomic({'x0': torch.cat(x0), 'txt': emb['txt'][sel].to(getattr(torch, a.txt_dtype)),
                           'y': emb['y'][sel].float(), 'index': torch.tensor([idx[k] for k in ks])},
                          os.path.join(folder, f'train_{c:05d}.safetensors'),
                          metadata={'format': 'scfm-shard-v1', 'source': 'folder'})
            written[f'{H}x{W}'] = len(ks)
        with open(done(c) + '.tmp', 'w') as f:
            json.dump(written, f)
        os.replace(done(c) + '.tmp', done(c))
        os.remove(os.path.join(emb_dir, f'emb_{c:05d}.safetensors'))
    print(f'rank {a.rank}: {len(pending)} chunk(s) done in {a.out}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(cli_error(e))
