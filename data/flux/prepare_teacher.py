"""
Teacher data for SCFM on FLUX.1: prompts -> the teacher's samples -> train.py's shards (README, Data).

train_XXXXX.safetensors: prompts [XXXXX*chunk, (XXXXX+1)*chunk) as x0 (the teacher's final latent; --latent reencode:
through 8-bit pixels and back), txt, y, index. Prompt i uses noise seed --seed + i: the data depend neither on the
number of ranks nor on restarts. prepare_folder.py shares the chunk machinery below.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from checks import CLI, check_options  # noqa: E402
from convert_weights import load_ae, load_transformer, read_ae, read_flux, write_dict  # noqa: E402
from sample import (encode_prompts, generate, load_text_encoders, make_noise, parse_shift, parse_size,  # noqa: E402
                    read_prompts, run_cli, to_pil)
from scfm import get_schedule  # noqa: E402

def emb_path(out, c):
    return os.path.join(out, 'emb_tmp', f'emb_{c:05d}.safetensors')

def pending_chunks(args, meta, texts, output):
    """-> {c: range(c*chunk, (c+1)*chunk)} for this rank's chunks not done yet (at most --max_chunks), their text
    embedded into emb_path(args.out, c). Chunk c is done when output(c) exists (written atomically): a rerun loses and
    repeats nothing. Rank r of torchrun does chunks r, r+world, ... Sets args.rank, args.device; checks meta.json."""
    args.rank, world, n = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), len(texts)
    if args.device == 'cuda':  # one GPU per torchrun process
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    meta, path = {**meta, 'chunk': args.chunk, 'n_items': n}, Path(args.out, 'meta.json')
    old = json.loads(path.read_text()) if path.exists() else meta
    if diff := {k: (old.get(k), meta[k]) for k in ('chunk', 'n_items') if old.get(k) != meta[k]}:
        raise ValueError(f'{args.out} was started with other settings {diff} (old, new): resume with the same '
                         f'chunk size and inputs, or use a new --out')
    os.makedirs(os.path.join(args.out, 'emb_tmp'), exist_ok=True)
    Path(f'{path}.tmp{os.getpid()}').write_text(json.dumps(meta, indent=2))  # every rank writes it, atomically
    os.replace(f'{path}.tmp{os.getpid()}', path)
    pending = [c for c in range(args.rank, -(-n // args.chunk), world) if not os.path.exists(output(c))]
    pending = {c: range(c * args.chunk, min((c + 1) * args.chunk, n)) for c in pending[:args.max_chunks or None]}
    todo = [c for c in pending if not os.path.exists(emb_path(args.out, c))]
    enc = load_text_encoders(args.t5, args.clip, args.device, getattr(torch, args.dtype)) if todo else None
    for c in tqdm(todo, desc=f'encode text (rank {args.rank})', disable=args.quiet):
        txt, y = zip(*(encode_prompts([texts[j] for j in pending[c][i:i + args.batch]], enc, args.max_length)
                       for i in range(0, len(pending[c]), args.batch)))
        write_dict(emb_path(args.out, c), {'txt': torch.cat(txt).cpu(), 'y': torch.cat(y).cpu()})
    return pending

def add_common_args(ap):
    ap.add_argument('--out', required=True, help='output folder for the shards')
    ap.add_argument('--t5', required=True, help='local T5 encoder folder')
    ap.add_argument('--clip', required=True, help='local CLIP text encoder folder')
    ap.add_argument('--ae', required=True, help='autoencoder: ae.safetensors or a diffusers vae folder')
    ap.add_argument('--max_length', type=int, default=512, help='T5 tokens: 512 dev, 256 schnell')
    ap.add_argument('--chunk', type=int, default=64, help='items per shard (fixed for the life of --out)')
    ap.add_argument('--batch', type=int, default=4, help='items per forward pass')
    ap.add_argument('--txt_dtype', default='bfloat16', choices=['bfloat16', 'float32'], help='stored T5 embeddings')
    ap.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'], help='compute dtype')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--max_chunks', type=int, default=0, help='stop after this many new chunks (0 = all)')
    ap.add_argument('--quiet', action='store_true', help='no progress bars')

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
    add_common_args(ap)
    args = ap.parse_args(argv)
    check_options(vars(args), CLI, '--{} {!r}')
    read_flux(args.ckpt), read_ae(args.ae)  # their headers: a wrong or broken file fails before any work
    (H, W), shift, prompts = parse_size(args.size), parse_shift(args.shift), read_prompts(args.prompts)
    settings = {k: v for k, v in vars(args).items() if k not in ('device', 'quiet', 'max_chunks')}
    schedule = get_schedule(args.steps, shift, (H // 16) * (W // 16)).tolist()
    shard = lambda c: os.path.join(args.out, f'train_{c:05d}.safetensors')  # noqa: E731
    pending = pending_chunks(args, {**settings, 'height': H, 'width': W, 'schedule': schedule}, prompts, shard)
    dtype = getattr(torch, args.dtype)
    if pending:
        net, ae = load_transformer(args.ckpt, args.device, dtype), load_ae(args.ae, args.device, dtype)
    for c, idx in tqdm(pending.items(), desc=f'teacher (rank {args.rank})', disable=args.quiet):
        emb, x0 = load_file(emb_path(args.out, c)), []
        for b in (slice(i, i + args.batch) for i in range(0, len(idx), args.batch)):
            noise = make_noise([args.seed + j for j in idx[b]], net.config.in_channels // 4, H // 8, W // 8)
            txt, y = emb['txt'][b].to(args.device), emb['y'][b].to(args.device)
            img, z = generate(net, ae, txt, y, noise, args.steps, shift, args.guidance, return_latents=True)
            if args.latent == 'reencode':  # through 8-bit pixels and back (to_pil's rounding)
                z = ae.encode((img * 255).round().to(dtype) / 127.5 - 1)
            if args.png:
                os.makedirs(os.path.join(args.out, 'png'), exist_ok=True)
                for j, pil in zip(idx[b], to_pil(img)):
                    pil.save(os.path.join(args.out, 'png', f'{j:08d}.png'))
            x0.append(z.float().cpu())
        write_dict(shard(c), {'x0': torch.cat(x0), 'txt': emb['txt'].to(getattr(torch, args.txt_dtype)),
                              'y': emb['y'].float(), 'index': torch.tensor(idx)},
                   metadata={'format': 'scfm-shard-v1', 'source': 'teacher', 'settings': json.dumps(settings)})
        os.remove(emb_path(args.out, c))
    print(f'rank {args.rank}: wrote {len(pending)} shard(s) to {args.out}')

if __name__ == '__main__':
    run_cli(main)
