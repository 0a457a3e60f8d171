"""
Teacher data for SCFM on FLUX.1: prompts -> teacher samples -> shards in train.py's format.

    python data/flux/prepare_teacher.py --prompts prompts.txt --out data/flux_teacher \
        --ckpt checkpoints/flux1-dev.safetensors --t5 FLUX.1-dev/text_encoder_2 --clip FLUX.1-dev/text_encoder \
        --ae ae.safetensors --size 512x512 --steps 32 --guidance 3.5 --png
    torchrun --standalone --nproc_per_node=8 data/flux/prepare_teacher.py ...   # rank r does chunks r, r+8, ...

Shard train_XXXXX.safetensors = prompts [XXXXX*chunk, (XXXXX+1)*chunk): x0 (N, 16, H/8, W/8) the teacher's
sample as AE-scaled latent, txt (N, Lt, 4096), y (N, 768), index (N,) the prompt line numbers. Prompt i uses noise
seed `seed + i`, so the data do not depend on the number of ranks or on restarts.
--latent final keeps the teacher's last latent; --latent reencode decodes it to an 8-bit image and encodes that
again, as the official SCFM data pipeline (which stores images) effectively does.
Two passes, each resumable: text embeddings for the pending chunks (then the encoders are freed), then sampling.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shards as S  # noqa: E402  (also puts the repo root on sys.path)
from sample import (cli_error, generate, get_schedule, load_ae, load_transformer, make_noise,  # noqa: E402
                    parse_shift, parse_size, read_prompts, to_pil)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--prompts', required=True, help='text file, one prompt per line')
    ap.add_argument('--ckpt', required=True, help='teacher transformer (our/BFL file or diffusers folder)')
    ap.add_argument('--size', default='512x512')
    ap.add_argument('--steps', type=int, default=32)
    ap.add_argument('--shift', default='dynamic', help="'dynamic' (FLUX.1-dev) or a float")
    ap.add_argument('--guidance', type=float, default=3.5)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--latent', default='final', choices=['final', 'reencode'])
    ap.add_argument('--png', action='store_true', help='also save the teacher images (png/XXXXXXXX.png)')
    S.add_common_args(ap)
    a = ap.parse_args(argv)
    H, W = parse_size(a.size)
    prompts = read_prompts(a.prompts)
    shift = parse_shift(a.shift)
    a.rank, world, a.device = S.dist_info(a.device)
    os.makedirs(a.out, exist_ok=True)
    meta = {k: v for k, v in vars(a).items() if k not in ('rank', 'device', 'quiet', 'max_chunks')}
    S.check_meta(a.out, {**meta, 'n_items': len(prompts), 'height': H, 'width': W,
                         'schedule': get_schedule(a.steps, shift, (H // 16) * (W // 16)).tolist()})
    shard = lambda c: os.path.join(a.out, f'train_{c:05d}.safetensors')  # noqa: E731
    pending = [c for c in S.my_chunks(len(prompts), a.chunk, a.rank, world) if not os.path.exists(shard(c))]
    if a.max_chunks:
        pending = pending[:a.max_chunks]
    if not pending:
        print(f'rank {a.rank}: nothing to do, all chunks of {a.out} exist')
        return
    emb_dir = os.path.join(a.out, 'emb_tmp')
    S.encode_pass(prompts, pending, a.chunk, emb_dir, a)

    dtype = getattr(torch, a.dtype)
    model = load_transformer(a.ckpt, a.device, dtype)
    ae = load_ae(a.ae, a.device, dtype)
    C = model.config.in_channels // 4
    if a.png:
        os.makedirs(os.path.join(a.out, 'png'), exist_ok=True)
    for c in tqdm(pending, desc=f'teacher (rank {a.rank})', disable=a.quiet):
        emb = S.load_emb(emb_dir, c)
        idx = list(S.chunk_range(c, a.chunk, len(prompts)))
        x0 = []
        for i in range(0, len(idx), a.batch):
            ids = idx[i:i + a.batch]
            noise = make_noise([a.seed + j for j in ids], C, H // 8, W // 8)
            t, y = emb['txt'][i:i + a.batch].to(a.device), emb['y'][i:i + a.batch].to(a.device)
            img, z = generate(model, ae, t, y, noise, a.steps, shift, a.guidance, return_latents=True)
            pils = to_pil(img)
            if a.latent == 'reencode':  # through 8-bit pixels and back, like training on saved images
                pix = torch.from_numpy(np.stack([np.asarray(p) for p in pils])).permute(0, 3, 1, 2)
                z = ae.encode((pix.to(a.device, dtype) / 127.5 - 1)).float()
            if a.png:
                for j, p in zip(ids, pils):
                    p.save(os.path.join(a.out, 'png', f'{j:08d}.png'))
            x0.append(z.float().cpu())
        S.save_atomic({'x0': torch.cat(x0), 'txt': emb['txt'].to(getattr(torch, a.txt_dtype)), 'y': emb['y'].float(),
                       'index': torch.tensor(idx, dtype=torch.int64)}, shard(c),
                      metadata={'format': 'scfm-shard-v1', 'source': 'teacher', 'settings': json.dumps(meta)})
        os.remove(os.path.join(emb_dir, f'emb_{c:05d}.safetensors'))
    print(f'rank {a.rank}: wrote {len(pending)} shard(s) to {a.out}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(cli_error(e))
