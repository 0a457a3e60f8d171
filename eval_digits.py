"""The CPU digits testbed's quality table, teacher vs few-step student (run by testbed.sh): every row samples the
same noise and prompts ("a handwritten digit {c}"): FID against the test images in the feature space of a small
digit classifier (trained once, cached; "real (train)" is the floor), how often it reads the prompted digit, the
RMSE to the teacher's most-step sample from the same noise, and the wall time; mean ± std over --seeds."""
import argparse
import glob
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert_weights import load_transformer
from eval_clip import fid, md_table, write_report
from sample import generate, make_grid, to_pil

def load_model(path, teacher=None, lora_scale=1.0):  # a full model, or a LoRA merged into the teacher
    if os.path.isfile(path) and any('.lora_' in k for k in safe_open(path, 'pt').keys()):  # a file: not diffusers
        return load_transformer(teacher, lora=path, lora_scale=lora_scale, merge=True)
    return load_transformer(path)

def load_split(data_dir, split):
    parts = [load_file(p) for p in sorted(glob.glob(os.path.join(data_dir, f'{split}_*.safetensors')))]
    if not parts:
        raise FileNotFoundError(f'no {split}_*.safetensors in {data_dir}; run python data/digits/prepare.py')
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

@torch.no_grad()
def classify(clf, x):  # -> (the (N, 64) activations before the last layer as float64 numpy, predicted labels (N,))
    feats = clf[:-1](x)
    return feats.double().numpy(), clf[-1](feats).argmax(-1)

def get_classifier(path, train, test, epochs=15, batch_size=64, lr=2e-3, seed=0):
    """The FID feature network (a small CNN standing in for Inception), cached at path with its training settings."""
    torch.manual_seed(seed)
    clf = nn.Sequential(nn.Conv2d(train['x0'].shape[1], 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, padding=1),
                        nn.SiLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4),
                        nn.Flatten(), nn.Linear(64 * 16, 64), nn.SiLU(), nn.Linear(64, 10))  # SiLU: no dead features
    x, labels, g = train['x0'], train['label'], torch.Generator().manual_seed(seed)
    settings = {'image_shape': list(x.shape[1:]), 'n_train': len(x), 'epochs': epochs, 'seed': seed, 'net': repr(clf)}
    meta = (safe_open(path, 'pt').metadata() or {}) if os.path.exists(path) else {}
    if json.loads(meta.get('settings', '{}')) == settings:
        clf.load_state_dict(load_file(path))
        return clf.eval().requires_grad_(False), float(meta['test_acc'])
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(x) // batch_size))
    for idx in (batch for _ in range(epochs) for batch in torch.randperm(len(x), generator=g).split(batch_size)):
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()  # +-1 pixel rolls (the border is background)
        nn.functional.cross_entropy(clf(torch.roll(x[idx], (dy, dx), (2, 3))), labels[idx]).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    acc = (classify(clf.eval().requires_grad_(False), test['x0'])[1] == test['label']).float().mean().item()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(clf.state_dict(), path, metadata={'settings': json.dumps(settings), 'test_acc': str(acc)})
    print(f'trained the digit classifier: test accuracy {100 * acc:.2f}% (cached to {path})')
    return clf, acc

def testbed(data_dir, seeds, samples_per_class=20, classifier=None, epochs=15):  # noise, prompts shared by all models
    train, test = load_split(data_dir, 'train'), load_split(data_dir, 'test')
    clf, clf_acc = get_classifier(classifier or os.path.join(data_dir, 'classifier.safetensors'), train, test, epochs)
    prompts = load_file(os.path.join(data_dir, 'prompts.safetensors'))
    labels = torch.arange(10).repeat(samples_per_class)
    noise = [torch.randn(len(labels), *test['x0'].shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    bed = dict(train=train, test=test, clf=clf, clf_acc=clf_acc, test_feats=classify(clf, test['x0'])[0],
               labels=labels, txt=prompts['txt'][labels], y=prompts['y'][labels], noise=noise)
    picks = [torch.randperm(len(train['x0']), generator=torch.Generator().manual_seed(10_000 + s))[:len(labels)]
             for s in seeds]  # the floor: as many real train images as samples, a fixed subset per seed
    return {**bed, 'floor': [measure(bed, train['x0'][i], train['label'][i]) for i in picks]}

def measure(bed, x, labels):  # images (N, C, H, W) in [-1, 1] and the digits they should show -> {fid, acc}
    feats, pred = classify(bed['clf'], x)
    return {'fid': fid(feats, bed['test_feats']), 'acc': (pred == labels).float().mean().item()}

def score(bed, net, steps, refs=None, shift=1.0, batch_size=500):  # -> (samples, scores) per seed set
    samples, scores, txt, y = [], [], bed['txt'], bed['y']
    for k, noise in enumerate(bed['noise']):
        t0 = time.time()
        x = torch.cat([generate(net, None, txt[i:i + batch_size], y[i:i + batch_size], noise[i:i + batch_size], steps,
                                shift).cpu() for i in range(0, len(noise), batch_size)])
        dt, x = time.time() - t0, x.clamp(-1, 1)  # the classifier saw only [-1, 1] images
        rmse = (x - (x if refs is None else refs[k])).pow(2).mean().sqrt().item()
        scores.append({**measure(bed, x, bed['labels']), 'rmse': rmse, 'time': dt})
        samples.append(x)
    return samples, scores

def mean_std(scores):  # [{metric: value}] per seed -> {metric: (mean, std with ddof=1)} over the seeds that have it
    values = {m: np.asarray([r[m] for r in scores if m in r], np.float64) for m in scores[0]}
    return {m: (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) for m, v in values.items()}

def fmt(mean_and_std, digits=2):
    return f'{mean_and_std[0]:.{digits}f} ± {mean_and_std[1]:.{digits}f}'

def int_list(s):
    return [int(v) for v in s.split(',') if v]

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--teacher', required=True, help='teacher model (a train.py export, BFL file or diffusers folder)')
    p.add_argument('--student', help='a full model or a LoRA on the teacher; omit to evaluate only the teacher')
    p.add_argument('--lora_scale', type=float, default=1.0, help='merge scale of a LoRA student (SCFM Flux UI: 1.6)')
    p.add_argument('--out', default='out/digits_eval', help='where table.md, results.json and grid.png go')
    p.add_argument('--data_dir', default='data/digits')
    p.add_argument('--teacher_steps', type=int_list, default=[1, 2, 3, 4, 8, 32])
    p.add_argument('--student_steps', type=int_list, default=[1, 2, 3, 4, 8])
    p.add_argument('--samples_per_class', type=int, default=20)
    p.add_argument('--seeds', type=int_list, default=[0, 1, 2], help='one seed set per value; mean ± std over them')
    p.add_argument('--shift', type=float, default=1.0, help='timestep shift of the Euler grid (1 = uniform, best for '
                   'the 8x8 teacher at few steps; SCFM trains students on s ~ U[2.5, 4.5), Flux samples at ~3)')
    p.add_argument('--student_shift', type=float, help='shift for the student rows (default: --shift)')
    p.add_argument('--classifier', help='classifier cache (default: <data_dir>/classifier.safetensors)')
    p.add_argument('--classifier_epochs', type=int, default=15)
    args = p.parse_args(argv)
    bed = testbed(args.data_dir, args.seeds, args.samples_per_class, args.classifier, args.classifier_epochs)
    print(f'classifier test accuracy on real test images: {100 * bed["clf_acc"]:.2f}%')
    samplers = [('teacher', n) for n in args.teacher_steps] + [('student', n) for n in args.student_steps
                                                                if args.student]
    real, n_test = ('real (train)', '–'), len(bed['test']['x0'])
    per_seed, first = {real: bed['floor'], **dict.fromkeys(samplers)}, {}  # rows: the floor first; first: the grid
    models = {'teacher': load_model(args.teacher),
              'student': load_model(args.student, args.teacher, args.lora_scale) if args.student else None}
    ref, refs = ('teacher', max(args.teacher_steps)), None
    for name, steps in [ref] + [s for s in samplers if s != ref]:  # the paired-RMSE reference first
        shift = args.student_shift if name == 'student' and args.student_shift is not None else args.shift
        samples, per_seed[name, steps] = score(bed, models[name], steps, refs, shift)
        refs, first[name, steps] = refs or samples, samples[0]
        for seed, r in zip(args.seeds, per_seed[name, steps]):
            print(f'seed {seed} {name:7s} {steps:2d} steps: FID {r["fid"]:7.2f}  acc {100 * r["acc"]:5.1f}%  '
                  f'RMSE {r["rmse"]:.4f}  {r["time"]:.1f}s', flush=True)
    rows = [{'sampler': name, 'steps': steps, **mean_std(rs),
             'per_seed': {m: [r[m] for r in rs if m in r] for m in rs[0]}} for (name, steps), rs in per_seed.items()]
    student_shift = '' if args.student_shift is None else f' (student {args.student_shift})'
    lines = [f'digits eval: {args.samples_per_class} samples/class x {len(args.seeds)} seed sets, shift {args.shift}'
             f'{student_shift}, FID vs {n_test} test images in the classifier\'s feature space (classifier test acc '
             f'{100 * bed["clf_acc"]:.2f}%); mean ± std over seed sets; RMSE is paired, to {ref[0]}-{ref[1]}', '']
    lines += md_table(['sampler', 'steps (NFE)', 'FID ↓', 'acc % ↑', 'RMSE to ref ↓', 'wall s per seed set'], [
        [r['sampler'], r['steps'], fmt(r['fid']), fmt([100 * v for v in r['acc']], 1)]
        + ([f'{r["rmse"][0]:.4f}', f'{r["time"][0]:.1f}'] if 'rmse' in r else ['–', '–']) for r in rows])
    results = {'settings': {**vars(args), 'reference': ref, 'n_test': n_test, 'threads': torch.get_num_threads()},
               'classifier_test_acc': bed['clf_acc'], 'rows': rows}
    write_report(args.out, 'table.md', lines, results)
    test, samplers = bed['test'], list(per_seed)[1:]  # grid rows: a real test image per digit, then each sampler
    x = torch.cat([test['x0'][test['label'] == c][:1] for c in range(10)] + [first[s][:10] for s in samplers])
    images = [ImageOps.expand(im.resize((4 * im.width, 4 * im.height), Image.NEAREST), 1, 'white')  # 4x, unsmoothed
              for im in to_pil((1 - x.expand(-1, 3, -1, -1)) / 2)]  # ink dark on white, framed
    labels = ['real (test)'] + [f'{name} {steps}' for name, steps in samplers]
    make_grid(images, cols=10, row_labels=labels).save(os.path.join(args.out, 'grid.png'))
    return results

if __name__ == '__main__':
    main()
