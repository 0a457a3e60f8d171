"""The testbed's tables and figures from the runs of `bash ablations.sh` (which then runs this): five few-step
methods at equal distillation compute (docs/few_step.png, docs/straightness.png), few-shot vs full-data distillation,
SCFM during pretraining, the official run's choices, the EMA strategies as quality-vs-step curves. Every model is scored
by eval_digits.score on the same noise and prompts (--eval_seeds seed sets of 20 samples per digit): per training seed
the mean over eval sets, then mean ± std over --seeds_train."""
import argparse
import glob
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import model
from eval_clip import md_table, write_report
from eval_digits import fmt, int_list, load_model, mean_std, score, testbed
from sample import denoise
from scfm import get_schedule

def mean_score(bed, net, steps, refs):  # fid, acc (%) and rmse to refs, each the mean over the eval seed sets
    scores = [{**r, 'acc': 100 * r['acc']} for r in score(bed, net, steps, refs)[1]]
    return {m: float(np.mean([r[m] for r in scores])) for m in ('fid', 'acc', 'rmse')}

@torch.no_grad()
def straightness(bed, net, steps=32):
    """Along the model's own `steps`-step path: the RMSE from its endpoint of the one-step prediction x_t - t v(x_t, t)
    (a shortcut model is told the step d = t), per grid time t. Zero everywhere for a straight path."""
    noise, txt, y, embed = bed['noise'][0], bed['txt'], bed['y'], net.config.step_embed
    ids = model.make_img_ids(*noise.shape[-2:]), model.make_txt_ids(txt.shape[1])
    ts, path = get_schedule(steps).tolist(), [model.pack(noise)]
    for a, b in zip(ts[:-1], ts[1:]):
        path.append(denoise(net, path[-1], ids[0], txt, ids[1], y, [a, b], step_embed=embed))
    jump = lambda x, t: denoise(net, x, ids[0], txt, ids[1], y, [t, 0.0], step_embed=embed)
    return ts[:-1], [(jump(x, t) - path[-1]).pow(2).mean().sqrt().item() for x, t in zip(path, ts[:-1])]

def line_plot(path, panels, xlabel='training step', width=520, height=360):  # PIL only
    # panels [(title, {label: (xs, ys)}[, True: log y axis])] side by side; x ticks at the data's xs if at most 8
    colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f']
    img = Image.new('RGB', (width * len(panels), height), 'white')
    draw, top, bottom = ImageDraw.Draw(img), 30, height - 40
    for p, (title, series, *log) in enumerate(panels):
        f, inv = (math.log, math.exp) if log and log[0] else (float, float)
        left, right = p * width + 60, (p + 1) * width - 150  # the legend sits in the right margin
        xs, ys = [x for s in series.values() for x in s[0]], [f(y) for s in series.values() for y in s[1]]
        x0, x1, pad = min(xs), max(xs), 0.05 * (max(ys) - min(ys) + 1e-9)
        y0, y1 = min(ys) - pad, max(ys) + pad
        px = lambda x: left + (x - x0) / (x1 - x0 + 1e-9) * (right - left)
        py = lambda y: top + (y1 - f(y)) / (y1 - y0) * (bottom - top)
        draw.rectangle([left, top, right, bottom], outline='black')
        draw.text((left, 8), title, fill='black')
        draw.text(((left + right) // 2 - 20, height - 18), xlabel, fill='black')
        xticks = sorted(set(xs)) if len(set(xs)) <= 8 else [x0 + i * (x1 - x0) / 4 for i in range(5)]
        for yv in [inv(y0 + i * (y1 - y0) / 4) for i in range(5)]:
            draw.text((left - 56, py(yv) - 6), f'{yv:.3g}', fill='black')
        for xv in xticks:
            draw.text((px(xv) - 8, bottom + 4), f'{xv:.4g}', fill='black')
        for i, (label, (sx, sy)) in enumerate(series.items()):
            color, points = colors[i % len(colors)], [(px(x), py(y)) for x, y in zip(sx, sy)]
            draw.line(points, fill=color, width=2)
            for x, y in points:  # markers: a series may be a few points
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.line([(right + 8, top + 10 + 16 * i), (right + 28, top + 10 + 16 * i)], fill=color, width=3)
            draw.text((right + 32, top + 4 + 16 * i), label, fill='black')
    img.save(path)

def ema_section(bed, teacher, root, seeds, start, out, name, title, results):
    """Score every snapshot of root/<strategy>_s<seed>/ at 3 steps -> markdown, <name>_curves.png, results[name]."""
    curves = {}
    for run in sorted(glob.glob(f'{root}/*_s*')):
        strategy, seed = os.path.basename(run).rsplit('_s', 1)
        finished = seed in seeds and os.path.exists(f'{run}/model.safetensors')  # a run still training: not yet
        for path in sorted(glob.glob(f'{run}/snapshots/model_*.safetensors')) if finished else []:
            if (step := int(path.rsplit('_', 1)[1].split('.')[0])) == 0:
                continue  # the teacher itself: the curves start at `start`
            net = load_model(path, teacher)
            curves.setdefault(strategy, {}).setdefault(step, []).append(mean_score(bed, net, 3, bed['ref']))
    if not curves:
        return []
    summary = results[name] = {n: {st: mean_std(v) for st, v in sorted(c.items())} for n, c in curves.items()}
    series = lambda m: {n: ([0, *c], [start[m]] + [v[m][0] for v in c.values()]) for n, c in summary.items()}
    line_plot(os.path.join(out, f'{name}_curves.png'), [('student 3-step FID (mean over training seeds)',
              series('fid')), ('student 3-step RMSE to teacher-32', series('rmse'))])
    steps = sorted(next(iter(summary.values())))
    shown, last = steps[1::2] if len(steps) <= 12 else steps[2::3], steps[-1]
    best = {n: min(c, key=lambda st: c[st]['fid'][0]) for n, c in summary.items()}
    md = [f'### {title}\n\nStudent 3-step FID during training (teacher 3-step: {start["fid"]:.2f}), mean ± std over '
          f'{max(len(v) for c in curves.values() for v in c.values())} training seed(s).', '']
    md += md_table(['strategy'] + [f'step {st}' for st in shown],
                   [[n] + [fmt(c[st]['fid'], 1) for st in shown] for n, c in summary.items()])
    md += ['', f'At step {last} (FID, and the paired RMSE of the 3-step sample to the teacher\'s 32-step one):', '']
    md += md_table(['strategy', 'FID ↓', 'RMSE to teacher-32 ↓', 'best FID (step)'], [[n, fmt(c[last]['fid']),
                   fmt(c[last]['rmse'], 4), f'{c[best[n]]["fid"][0]:.2f} ({best[n]})'] for n, c in summary.items()])
    return md + ['', f'![{title}]({name}_curves.png)', '']

def lab_figures(bed, results, first_runs, teacher, out):
    """few_step.png: FID and accuracy against NFE per method, the real images' floor as a line; straightness.png: the
    one-step prediction's distance from the 32-step endpoint along t, for the first training seed's models."""
    rows, floor = results['lab'], mean_std([{**m, 'acc': 100 * m['acc']} for m in bed['floor']])
    methods = dict.fromkeys(r[0] for r in rows)
    series = lambda metric: {'real images (floor)': ([1, 8], [floor[metric][0]] * 2), **{name: tuple(zip(*sorted(
        (n, r[metric][0]) for nm, n, r in rows if nm == name and n <= 8))) for name in methods}}
    line_plot(os.path.join(out, 'few_step.png'), [('FID, log scale (mean over training seeds)', series('fid'), True),
              ('accuracy % (the prompted digit)', series('acc'))], xlabel='steps (NFE)')
    curves = results['straightness'] = {name: straightness(bed, load_model(path, teacher)) for name, path in tqdm(
        first_runs, desc='straightness') if os.path.exists(path)}
    line_plot(os.path.join(out, 'straightness.png'), [('RMSE of x_t - t v(x_t, t) to the 32-step endpoint',
              curves)], xlabel='t (1 = noise)')

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--root', default='out/ablations', help='where ablations.sh put the runs')
    p.add_argument('--teacher', default='out/digits_teacher/model_ema.safetensors')
    p.add_argument('--data_dir', default='data/digits')
    p.add_argument('--seeds_train', default='1337 2', help='training seeds (run-to-run spread)')
    p.add_argument('--eval_seeds', type=int_list, default=[0, 1, 2])
    p.add_argument('--out', default='docs/ablations', help='where ablations.md, results.json and the curves go')
    p.add_argument('--figures', default='docs', help='where few_step.png and straightness.png go')
    args = p.parse_args(argv)
    seeds, root, results, md = args.seeds_train.split(), args.root, {}, []
    os.makedirs(args.out, exist_ok=True)
    teacher, bed = load_model(args.teacher), testbed(args.data_dir, args.eval_seeds)
    bed['ref'] = score(bed, teacher, 32)[0]  # the paired-RMSE reference: the teacher's 32-step samples
    have, counts = (lambda path: [s for s in seeds if os.path.exists(path.format(s=s))]), (1, 2, 3, 4, 8)
    full, ten = (f'{root}/fewshot/{k}_s{{s}}/model.safetensors' for k in ('full', 'ten'))
    rounds = {n: f'{root}/progressive/s{{s}}/r{n}/model.safetensors' for n in (16, 8, 4, 2)}  # r<n>: n -> n/2 steps
    pretrain = {k: f'{root}/pretrain/{k}_s{{s}}/model_ema.safetensors' for k in ('fm', 'scfm', 'scfm-warm')}
    lab = {k: f'{root}/lab/{k}_s{{s}}/model{"_ema" * (k == "shortcut")}.safetensors' for k in (
        'scfm-step', 'shortcut-distill', 'shortcut')}
    official = lambda k: f'{root}/official/{k}_s{{s}}/{"lora" if k.startswith("lora") else "model"}.safetensors'
    sections = [  # results key, markdown title, the runs it needs, its rows: [(name, runs or None: the teacher, steps)]
        ('lab', '### Few-step methods at equal distillation compute\n\nTeacher: plain FM (its training seeds). Each '
         'distillation starts from the seed-1337 teacher: 290 steps of 1.7 teacher steps (25% of the teacher). '
         'Progressive: 5 rounds of 58 steps (32->1), the round\'s student for each count (3 steps: the 4-step one). '
         'Shortcut from scratch: the teacher\'s compute, EMA weights.', lab['shortcut-distill'],
         [('teacher', pretrain['fm'], (*counts, 32)), ('SCFM', full, counts)]
         + [('progressive', rounds[2 * n], (3, 4) if n == 4 else (n,)) for n in (1, 2, 4, 8)]
         + [('SCFM + step input', lab['scfm-step'], counts), ('shortcut, distilled', lab['shortcut-distill'], counts),
            ('shortcut, from scratch', lab['shortcut'], counts)]),
        ('fewshot', f'### Few-shot distillation\n\nTraining seeds {have(ten)}; 290 SCFM steps each.', ten,
         [('teacher', None, (3, 32)), ('SCFM, all 1500 pairs', full, counts),
          ('SCFM, 10 pairs (one per digit)', ten, counts)]),
        ('pretrain', '### SCFM during pretraining\n\nBoth from scratch, equal compute (1714 x 224 = 2000 x 192 '
         'sample-passes); the EMA weights are scored. Self slice: 25% of each batch, fast/slow EMA targets on '
         '2/4/8/16-step windows.', pretrain['scfm'],
         [(name, pretrain[k], (*counts, 32)) for k, name in zip(pretrain, ['plain FM (2000 steps)',
          'FM + SCFM self slice (1714 steps)', '800 FM steps, then FM + SCFM self slice (1829 steps)'])]),
        ('official', '### The official FLUX run\'s choices, one at a time\n\n290 SCFM steps; LoRA rank 16 on every '
         'linear (lr 1e-3) or all weights (lr 3e-4).', official('lora'),
         [(k, official(k), (2, 3, 4)) for k in ('lora', 'lora-ema-zero', 'lora-bf16', 'lora-gaussian',
          'lora-split', 'lora-clip10', 'lora-official', 'full', 'full-bf16', 'full-clip10')])]
    for key, title, needs, groups in [section for section in sections if have(section[2])]:
        results[key] = []
        for name, runs, steps in tqdm(groups, desc=key):  # one model per training seed
            models = [teacher] if runs is None else [load_model(runs.format(s=s), args.teacher) for s in have(runs)]
            # pretraining has no teacher to compare with: RMSE to each model's own 32-step samples
            pairs = [(m, score(bed, m, 32)[0] if key == 'pretrain' else bed['ref']) for m in models]
            results[key] += [(name, n, mean_std([mean_score(bed, m, n, r) for m, r in pairs])) for n in steps if pairs]
        rmse = 'RMSE to own 32-step' if key == 'pretrain' else 'RMSE to teacher-32'
        md += [title, ''] + md_table(['model', 'steps', 'FID ↓', 'acc % ↑', f'{rmse} ↓'], [
            [name, n, fmt(r['fid']), fmt(r['acc'], 1), fmt(r['rmse'], 4)] for name, n, r in results[key]]) + ['']
    start = mean_score(bed, teacher, 3, bed['ref'])  # EMA curves (ema/: 300 steps; ema_long/: 900) start at the teacher
    for sub, title in (('ema', 'EMA strategies'), ('ema_long', 'EMA strategies, 900 steps')):
        md += ema_section(bed, args.teacher, f'{root}/{sub}', seeds, start, args.out, sub, title, results)
    if 'lab' in results:
        lab_figures(bed, results, [(name, runs.format(s=seeds[0])) for name, runs, _ in sections[0][3][:2]
                                   + sections[0][3][-3:]], args.teacher, args.figures)
    write_report(args.out, 'ablations.md', md, results)

if __name__ == '__main__':
    main()
