"""
Issue 6's tables and curves from the runs of ablations.sh (CPU testbed): SCFM during pretraining vs plain flow
matching, few-shot (10 pairs) vs full-data distillation, progressive distillation at equal compute, and the EMA
strategies as quality-vs-step curves.

    bash ablations.sh all        # trains everything, then runs: python ablations.py --out docs/ablations

Every model is scored exactly as eval_digits.py scores it (classifier-feature FID against the 297 test images,
classifier accuracy on the prompted digit, paired RMSE) on the same noise and prompts: --eval_seeds seed sets of
20 samples per digit. Spread: each number is the mean over training seeds (--seeds_train) of the mean over eval
seed sets; ± is the std over training seeds (the run-to-run spread).
Writes ablations.md, results.json and ema_curves.png to --out.
"""
import argparse
import glob
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file

import eval_digits as E


class Scorer:
    """The test set's feature statistics, the prompts, the noise per eval seed and the teacher's reference samples."""

    def __init__(self, data_dir, eval_seeds, teacher, samples_per_class=20):
        train, test = E.load_split(data_dir, 'train'), E.load_split(data_dir, 'test')
        self.clf, _ = E.get_classifier(os.path.join(data_dir, 'classifier.safetensors'), train, test)
        self.mu, self.sig = E.feature_stats(E.classify(self.clf, test['x0'])[0])
        prompts = load_file(os.path.join(data_dir, 'prompts.safetensors'))
        self.labels = torch.arange(10).repeat(samples_per_class)
        self.txt, self.y = prompts['txt'][self.labels], prompts['y'][self.labels]
        shape = (len(self.labels), *test['x0'].shape[1:])
        self.noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in eval_seeds]
        self.ref = [self.sample(teacher, 32, k) for k in range(len(eval_seeds))]  # paired-RMSE reference

    def sample(self, model, steps, k):
        return E.generate(model, self.noise[k], self.txt, self.y, steps, 1.0, 1.0).clamp(-1, 1)

    def score(self, model, steps, ref=None):
        """-> dict fid, acc, rmse (to ref, a list of per-seed samples; default the teacher's 32-step ones), means
        over the eval seed sets."""
        out = {'fid': [], 'acc': [], 'rmse': []}
        for k in range(len(self.noise)):
            x = self.sample(model, steps, k)
            f, pred = E.classify(self.clf, x)
            out['fid'].append(E.frechet_distance(*E.feature_stats(f), self.mu, self.sig))
            out['acc'].append(100 * (pred == self.labels).float().mean().item())
            out['rmse'].append((x - (ref or self.ref)[k]).pow(2).mean().sqrt().item())
        return {m: float(np.mean(v)) for m, v in out.items()}


def over_seeds(rows):
    """[{metric: value} per training seed] -> {metric: (mean, std over training seeds)}"""
    return {m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows], ddof=1)) if len(rows) > 1
                else 0.0) for m in rows[0]}


def fmt(ms, digits=2):
    return f'{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}'


def table(title, rows, rmse_name='RMSE to teacher-32'):
    """rows: (name, steps, {metric: (mean, std)}) -> markdown lines"""
    lines = [title, '', f'| model | steps | FID ↓ | acc % ↑ | {rmse_name} ↓ |', '|---|---|---|---|---|']
    for name, steps, r in rows:
        lines.append(f'| {name} | {steps} | {fmt(r["fid"])} | {fmt(r["acc"], 1)} | {fmt(r["rmse"], 4)} |')
    return lines + ['']


def line_plot(path, panels, width=520, height=360):
    """panels: [(title, {label: (xs, ys)})] -> one PNG, panels side by side; PIL only (no plotting dependency)."""
    from PIL import Image, ImageDraw
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    img = Image.new('RGB', (width * len(panels), height), 'white')
    d = ImageDraw.Draw(img)
    L, R, T, B = 60, 150, 30, 40  # margins; the legend sits in the right margin
    for p, (title, series) in enumerate(panels):
        ox = p * width
        xs = [x for s in series.values() for x in s[0]]
        ys = [y for s in series.values() for y in s[1]]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        y0, y1 = y0 - 0.05 * (y1 - y0 + 1e-9), y1 + 0.05 * (y1 - y0 + 1e-9)
        px = lambda x: ox + L + (x - x0) / (x1 - x0 + 1e-9) * (width - L - R)
        py = lambda y: T + (y1 - y) / (y1 - y0) * (height - T - B)
        d.rectangle([ox + L, T, ox + width - R, height - B], outline='black')
        d.text((ox + L, 8), title, fill='black')
        for i in range(5):  # ticks
            yv, xv = y0 + i * (y1 - y0) / 4, x0 + i * (x1 - x0) / 4
            d.text((ox + 4, py(yv) - 6), f'{yv:.3g}', fill='black')
            d.text((px(xv) - 8, height - B + 4), f'{xv:.0f}', fill='black')
        d.text((ox + L + (width - L - R) // 2 - 20, height - 18), 'training step', fill='black')
        for i, (label, (sx, sy)) in enumerate(series.items()):
            c = colors[i % len(colors)]
            d.line([(px(a), py(b)) for a, b in zip(sx, sy)], fill=c, width=2)
            for a, b in zip(sx, sy):
                d.ellipse([px(a) - 2, py(b) - 2, px(a) + 2, py(b) + 2], fill=c)
            d.line([(ox + width - R + 8, T + 10 + 16 * i), (ox + width - R + 28, T + 10 + 16 * i)], fill=c, width=3)
            d.text((ox + width - R + 32, T + 4 + 16 * i), label, fill='black')
    img.save(path)


def ema_section(S, load, root, seeds, start, out, name, title, results):
    """Score every snapshot of root/<strategy>_s<seed>/ at 3 steps -> markdown lines, <name>_curves.png, results[name]."""
    curves = {}
    for run in sorted(glob.glob(f'{root}/*_s*')):
        strategy, s = os.path.basename(run).rsplit('_s', 1)
        if s not in seeds:
            continue
        for path in sorted(glob.glob(f'{run}/snapshots/model_*.safetensors')):
            step = int(path.rsplit('_', 1)[1].split('.')[0])
            curves.setdefault(strategy, {}).setdefault(step, []).append(S.score(load(path), 3))
        print(f'scored {run}', flush=True)
    if not curves:
        return []
    summary = {n: {st: over_seeds(v) for st, v in sorted(c.items())} for n, c in curves.items()}
    results[name] = summary
    series = lambda metric: {n: ([0] + list(c), [start[metric]] + [v[metric][0] for v in c.values()])
                             for n, c in summary.items()}
    line_plot(os.path.join(out, f'{name}_curves.png'), [('student 3-step FID (mean over training seeds)', series('fid')),
                                                        ('student 3-step RMSE to teacher-32', series('rmse'))])
    steps = sorted(next(iter(summary.values())))
    shown = steps[1::2] if len(steps) <= 12 else steps[2::3]
    n_seeds = max(len(v) for c in curves.values() for v in c.values())
    md = [f'### {title}\n\nStudent 3-step FID during training (teacher 3-step: {start["fid"]:.2f}), mean ± std over '
          f'{n_seeds} training seed(s).', '', '| strategy | ' + ' | '.join(f'step {st}' for st in shown) + ' |',
          '|---|' + '---|' * len(shown)]
    md += [f'| {n} | ' + ' | '.join(fmt(c[st]['fid'], 1) for st in shown) + ' |' for n, c in summary.items()]
    last = steps[-1]
    md += ['', f'At step {last} (FID, and the paired RMSE of the 3-step sample to the teacher\'s 32-step one):', '',
           '| strategy | FID ↓ | RMSE to teacher-32 ↓ | best FID (step) |', '|---|---|---|---|']
    for n, c in summary.items():
        best = min(c, key=lambda st: c[st]['fid'][0])
        md.append(f'| {n} | {fmt(c[last]["fid"])} | {fmt(c[last]["rmse"], 4)} | {c[best]["fid"][0]:.2f} ({best}) |')
    return md + ['', f'![{title}]({name}_curves.png)', '']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--root', default='out/ablations', help='where ablations.sh put the runs')
    p.add_argument('--teacher', default='out/digits_teacher/model_ema.safetensors')
    p.add_argument('--data_dir', default='data/digits')
    p.add_argument('--seeds_train', default='1337 2', help='training seeds (run-to-run spread)')
    p.add_argument('--eval_seeds', type=E.int_list, default=[0, 1, 2])
    p.add_argument('--out', default='docs/ablations')
    args = p.parse_args(argv)
    seeds = args.seeds_train.split()
    os.makedirs(args.out, exist_ok=True)
    teacher = E.load_model(args.teacher)
    S = Scorer(args.data_dir, args.eval_seeds, teacher)
    results, md = {}, []
    have = lambda path: [s for s in seeds if os.path.exists(path.format(s=s))]
    load = lambda path: E.load_model(path, base=args.teacher)

    # 1. few-shot vs full data (the testbed's SCFM config, 170 steps)
    full, ten = (f'{args.root}/fewshot/{k}_s{{s}}/model.safetensors' for k in ('full', 'ten'))
    if have(ten):
        rows = [('teacher', n, over_seeds([S.score(teacher, n)])) for n in (3, 32)]
        for name, path in (('SCFM, all 1500 pairs', full), ('SCFM, 10 pairs (one per digit)', ten)):
            models = [load(path.format(s=s)) for s in have(path)]
            rows += [(name, n, over_seeds([S.score(m, n) for m in models])) for n in (1, 2, 3, 4, 8)]
        results['fewshot'] = rows
        md += table(f'### Few-shot distillation\n\nTraining seeds {have(ten)}; 170 SCFM steps each.', rows)

    # 2. progressive distillation vs SCFM at equal distillation compute (168 vs 170 steps of the same cost)
    pd = f'{args.root}/progressive/s{{s}}/r{{n}}/model.safetensors'
    if have(pd.replace('{n}', '4')):
        rows = []
        for n in (32, 16, 8, 4):
            models = [load(pd.format(s=s, n=n)) for s in have(pd.replace('{n}', '4'))]
            rows += [(f'progressive, after round {n}->{n // 2} ({42 * (7 - n.bit_length())} steps)', k,
                      over_seeds([S.score(m, k) for m in models])) for k in sorted({n // 2, 3} if n <= 8 else {n // 2})]
        models = [load(full.format(s=s)) for s in have(full)]
        rows += [('SCFM (170 steps)', k, over_seeds([S.score(m, k) for m in models])) for k in (2, 3, 4, 8, 16)]
        results['progressive'] = rows
        md += table('### Progressive distillation at equal compute\n\nRounds of 42 steps (32->16->8->4->2 steps), '
                    'every sample a teacher window on the previous round\'s grid; SCFM: the testbed config.', rows)

    # 3. SCFM during pretraining vs plain flow matching at equal compute; RMSE to each model's own 32-step sample
    fm, pre, warm = (f'{args.root}/pretrain/{k}_s{{s}}/model_ema.safetensors' for k in ('fm', 'scfm', 'scfm-warm'))
    if have(pre):
        rows = []
        for name, path in (('plain FM (1200 steps)', fm), ('FM + SCFM self slice (1030 steps)', pre),
                           ('500 FM steps, then FM + SCFM self slice (1100 steps)', warm)):
            if not have(path):
                continue
            per_seed = []
            for s in have(path):
                m = load(path.format(s=s))
                own = [S.sample(m, 32, k) for k in range(len(args.eval_seeds))]
                per_seed.append({n: S.score(m, n, ref=own) for n in (1, 2, 3, 4, 8, 32)})
            rows += [(name, n, over_seeds([r[n] for r in per_seed])) for n in (1, 2, 3, 4, 8, 32)]
        results['pretrain'] = rows
        md += table('### SCFM during pretraining\n\nBoth from scratch, equal compute (1030 x 224 = 1200 x 192 '
                    'sample-passes); the EMA weights are scored. Self slice: 25% of each batch, fast/slow EMA targets on '
                    '2/4/8/16-step windows.', rows, rmse_name='RMSE to own 32-step')

    # 4. EMA strategies: the student's 3-step FID and paired RMSE against the training step (ema/: 300 steps, all
    # training seeds; ema_long/: 900 steps)
    start = S.score(teacher, 3)  # every run starts at the teacher
    for sub, title in (('ema', 'EMA strategies'), ('ema_long', 'EMA strategies, 900 steps')):
        md += ema_section(S, load, f'{args.root}/{sub}', seeds, start, args.out, sub, title, results)
    text = '\n'.join(md) + '\n'
    print(text)
    with open(os.path.join(args.out, 'ablations.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
