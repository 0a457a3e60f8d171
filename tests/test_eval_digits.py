import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import eval_clip
import eval_digits
import model
import scfm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_prepare():
    spec = importlib.util.spec_from_file_location('digits_prepare', os.path.join(ROOT, 'data', 'digits', 'prepare.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

# ----- FID (eval_clip.fid, the testbed's Frechet distance) against closed forms -----


def frechet_reference(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2}) from the sample moments (ddof=1), two eigh."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    w, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(w.clip(min=0))) @ V.T
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


def test_fid_1d_and_identical():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(1, 2, (50, 1)), rng.normal(-2, 3, (70, 1))
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2, with the sample moments
    closed = (f1.mean() - f2.mean()) ** 2 + (f1.std(ddof=1) - f2.std(ddof=1)) ** 2
    assert eval_clip.fid(f1, f2) == pytest.approx(closed, rel=1e-10)
    f = rng.normal(size=(40, 5))
    assert eval_clip.fid(f, f) == pytest.approx(0, abs=1e-9)


def test_fid_full_covariance_rotation_and_few_samples():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    f1, f2 = rng.normal(size=(300, 6)) @ A + 1.0, rng.normal(size=(200, 6)) @ B  # general, non-commuting covariances
    import scipy.linalg
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ref = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    d = eval_clip.fid(f1, f2)
    assert d == pytest.approx(ref, rel=1e-8) and d == pytest.approx(frechet_reference(f1, f2), rel=1e-8)
    # invariance under a common rotation, and symmetry
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert eval_clip.fid(f1 @ Q.T, f2 @ Q.T) == pytest.approx(d, rel=1e-8)
    assert eval_clip.fid(f2, f1) == pytest.approx(d, rel=1e-8)
    # fewer samples than feature dims (rank-deficient covariances): no NaN; the two-eigh form is off by the square
    # roots of its round-off eigenvalues (~1e-7 each)
    g1, g2 = rng.normal(size=(5, 64)), rng.normal(size=(9, 64)) + 0.3
    assert eval_clip.fid(g1, g2) == pytest.approx(frechet_reference(g1, g2), abs=1e-4)

# ----- data preparation and the end-to-end evaluation -----


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('digits'))
    load_prepare().main(['--out_dir', out, '--limit', '120', '--txt_len', '8'])
    return out


def test_prepare_shard_format(digits_dir):
    with open(os.path.join(digits_dir, 'meta.json')) as f:
        meta = json.load(f)
    n_train, n_test = meta['splits']['train'], meta['splits']['test']
    assert n_train + n_test == 120 and n_test > 0
    assert meta['format'] == 'scfm-shard-v1' and meta['image_shape'] == [1, 8, 8]
    assert len(meta['captions']['train']) == n_train and len(meta['labels']['test']) == n_test
    for split, n in [('train', n_train), ('test', n_test)]:
        with safe_open(os.path.join(digits_dir, f'{split}_000.safetensors'), 'pt') as f:
            assert f.metadata() == {'format': 'scfm-shard-v1'}
            t = {k: f.get_tensor(k) for k in f.keys()}
        assert set(t) == {'x0', 'txt', 'y', 'label'}
        assert t['x0'].shape == (n, 1, 8, 8) and t['x0'].dtype == torch.float32
        assert t['x0'].min() >= -1 and t['x0'].max() <= 1 and t['x0'].min() == -1
        assert t['txt'].shape == (n, 8, 384) and t['txt'].dtype == torch.float32
        assert t['y'].shape == (n, 384) and t['y'].dtype == torch.float32
        assert torch.allclose(t['y'].norm(dim=-1), torch.ones(n), atol=1e-5)  # sentence-transformers normalises
        assert t['label'].dtype == torch.int64 and t['label'].tolist() == meta['labels'][split]
        # same caption -> same embedding (captions are embedded once, then gathered)
        caps = meta['captions'][split]
        j = next(j for j in range(1, n) if caps[j] == caps[0]) if caps.count(caps[0]) > 1 else None
        if j is not None:
            assert torch.equal(t['txt'][0], t['txt'][j])
    with safe_open(os.path.join(digits_dir, 'prompts.safetensors'), 'pt') as f:
        p = {k: f.get_tensor(k) for k in f.keys()}
    assert p['txt'].shape == (10, 8, 384) and p['y'].shape == (10, 384) and p['label'].tolist() == list(range(10))
    # idempotent: a second run only reports and keeps the files
    mtime = os.path.getmtime(os.path.join(digits_dir, 'train_000.safetensors'))
    load_prepare().main(['--out_dir', digits_dir, '--limit', '120', '--txt_len', '8'])
    assert os.path.getmtime(os.path.join(digits_dir, 'train_000.safetensors')) == mtime


def tiny_digits_model(path, seed, step_embed=False):
    cfg = model.FluxConfig(in_channels=4, out_channels=4, vec_in_dim=384, context_in_dim=384, hidden_size=32,
                           num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=False,
                           step_embed=step_embed)
    torch.manual_seed(seed)
    m = model.Flux(cfg)
    m.init_weights()
    with torch.no_grad():  # non-zero output layer, so the samples are not just the noise
        m.final_layer.linear.weight.normal_(std=0.1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path,
              metadata={'config': json.dumps(dataclasses.asdict(cfg))})
    return m


def test_load_model_full_and_lora(tmp_path):
    net = tiny_digits_model(str(tmp_path / 'm.safetensors'), 0)
    loaded = eval_digits.load_model(str(tmp_path / 'm.safetensors'))
    assert loaded.config == net.config
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # a LoRA student file (train.py with lora_rank > 0) is merged into the teacher at the given scale
    model.apply_lora(net, rank=2)
    with torch.no_grad():
        for lm in model.lora_modules(net).values():
            lm.lora_B.normal_(std=0.05)
    save_file({k: v.contiguous() for k, v in model.lora_state_dict(net).items()}, str(tmp_path / 'lora.safetensors'))
    merged = eval_digits.load_model(str(tmp_path / 'lora.safetensors'), str(tmp_path / 'm.safetensors'), lora_scale=1.5)
    assert all(m.scale == 0 for m in model.lora_modules(merged).values())  # merged: the branch is off
    model.set_lora_scale(net, 1.5)
    args = (torch.randn(2, 16, 4), model.make_img_ids(8, 8), torch.randn(2, 3, 384), model.make_txt_ids(3),
            torch.rand(2), torch.randn(2, 384))
    with torch.no_grad():
        assert torch.allclose(merged(*args), net(*args), atol=1e-5)


def test_score_is_the_plain_euler_loop(digits_dir, tmp_path):
    """The scorer samples with sample.generate; in float32 that is exactly x <- x + (t_next - t) v(x, t) on the
    shifted grid, in any batch size, and its metrics match the samples."""
    net = tiny_digits_model(str(tmp_path / 'm.safetensors'), 0).eval()
    bed = eval_digits.testbed(digits_dir, [0, 5], samples_per_class=3, classifier=str(tmp_path / 'clf.safetensors'),
                              epochs=1)
    samples, scores = eval_digits.score(bed, net, 3, shift=2.0)
    again, _ = eval_digits.score(bed, net, 3, refs=samples, shift=2.0, batch_size=7)
    ts = [float(t) for t in scfm.get_schedule(3, shift=2.0)]
    for k, noise in enumerate(bed['noise']):
        x = model.pack(noise)
        img_ids, txt_ids = model.make_img_ids(8, 8), model.make_txt_ids(bed['txt'].shape[1])
        with torch.no_grad():
            for t, t_next in zip(ts[:-1], ts[1:]):
                x = x + (t_next - t) * net(x, img_ids, bed['txt'], txt_ids, torch.full((len(x),), t), bed['y'])
        x = model.unpack(x, 8, 8).clamp(-1, 1)
        assert torch.equal(samples[k], x) and torch.allclose(again[k], x, atol=1e-6)
        feats, pred = eval_digits.classify(bed['clf'], x)
        assert scores[k]['fid'] == eval_clip.fid(feats, bed['test_feats']) and scores[k]['rmse'] == 0
        assert scores[k]['acc'] == (pred == bed['labels']).float().mean().item()


def test_eval_end_to_end(digits_dir, tmp_path):
    teacher, student = str(tmp_path / 'teacher.safetensors'), str(tmp_path / 'student.safetensors')
    tiny_digits_model(teacher, 0)
    tiny_digits_model(student, 1)
    out = str(tmp_path / 'eval')
    res = eval_digits.main(['--teacher', teacher, '--student', student, '--out', out, '--data_dir', digits_dir,
                            '--teacher_steps', '1,3', '--student_steps', '1,2', '--samples_per_class', '2',
                            '--seeds', '0,1', '--classifier_epochs', '1', '--shift', '3.0', '--student_shift', '2.0',
                            '--classifier', str(tmp_path / 'clf.safetensors')])
    for f in ['table.md', 'results.json', 'grid.png']:
        assert os.path.getsize(os.path.join(out, f)) > 0
    with open(os.path.join(out, 'results.json')) as f:
        saved = json.load(f)
    assert [(r['sampler'], r['steps']) for r in saved['rows']] == [
        ('real (train)', '–'), ('teacher', 1), ('teacher', 3), ('student', 1), ('student', 2)]
    ref = saved['rows'][2]
    assert ref['rmse'][0] == 0.0 and saved['settings']['reference'] == ['teacher', 3]
    for r in saved['rows']:
        assert np.isfinite(r['fid'][0]) and len(r['per_seed']['fid']) == 2 and 0 <= r['acc'][0] <= 1
    assert saved['settings']['shift'] == 3.0 and saved['settings']['student_shift'] == 2.0
    table = open(os.path.join(out, 'table.md')).read()
    assert 'student' in table and 'real (train)' in table and len(table.splitlines()) == 4 + 5
    from PIL import Image
    w, h = Image.open(os.path.join(out, 'grid.png')).size
    assert w > 10 * (8 * 4 + 2) and h == 5 * (8 * 4 + 2)  # 10 digit columns, real + 4 sampler rows, 4x and a frame
    # the cached classifier is reused on a second call (same settings)
    assert os.path.exists(tmp_path / 'clf.safetensors')
    assert res['classifier_test_acc'] == saved['classifier_test_acc']


def test_prepare_few_shot(tmp_path):
    out = str(tmp_path / 'd10')
    load_prepare().main(['--out_dir', out, '--limit', '200', '--txt_len', '8',
                         '--per_class', '1'])
    with open(os.path.join(out, 'meta.json')) as f:
        meta = json.load(f)
    assert sorted(meta['labels']['train']) == list(range(10)) and meta['splits']['test'] > 10


def test_ablations_sections(digits_dir, tmp_path):
    """ablations.py on fake runs of tiny models: every section and figure is written, on eval_digits' scale."""
    import ablations
    root = tmp_path / 'abl'
    paths = ['fewshot/full_s1/model', 'fewshot/ten_s1/model', 'pretrain/fm_s1/model_ema', 'pretrain/scfm_s1/model_ema',
             *[f'progressive/s1/r{n}/model' for n in (32, 16, 8, 4, 2)],
             'ema/dual_s1/snapshots/model_0000005', 'ema/dual_s1/snapshots/model_0000010', 'ema/dual_s1/model',
             'ema/vanilla_s1/snapshots/model_0000005',  # still training (no export): not scored
             'lab/scfm-step_s1/model', 'lab/shortcut-distill_s1/model', 'lab/shortcut_s1/model_ema']
    for i, p in enumerate(paths):
        os.makedirs(os.path.dirname(root / p), exist_ok=True)
        tiny_digits_model(str(root / p) + '.safetensors', i, step_embed=p.startswith('lab/'))
    teacher = str(tmp_path / 'teacher.safetensors')
    tiny_digits_model(teacher, 99)
    out = str(tmp_path / 'out')
    ablations.main(['--root', str(root), '--teacher', teacher, '--data_dir', digits_dir, '--seeds_train', '1',
                    '--eval_seeds', '0', '--out', out, '--figures', out])
    md = open(os.path.join(out, 'ablations.md')).read()
    for section in ('Few-step methods', 'Few-shot', 'pretraining', 'EMA strategies'):
        assert section in md
    for figure in ('ema_curves', 'few_step', 'straightness'):
        assert os.path.getsize(os.path.join(out, f'{figure}.png')) > 0
    res = json.load(open(os.path.join(out, 'results.json')))
    assert [(name, n) for name, n, _ in res['fewshot']][:3] == [
        ('teacher', 3), ('teacher', 32), ('SCFM, all 1500 pairs', 1)]
    assert res['fewshot'][1][2]['rmse'] == [0.0, 0.0]  # the RMSE reference is the teacher's 32-step samples
    assert [r[2]['rmse'][0] for r in res['pretrain'] if r[1] == 32] == [0.0, 0.0]  # pretraining: each model's own
    assert {name for name, _, _ in res['pretrain']} == {'plain FM (2000 steps)', 'FM + SCFM self slice (1714 steps)'}
    assert [(name, n) for name, n, _ in res['lab'] if name == 'progressive'] == [('progressive', n) for n in (1, 2, 3, 4, 8)]
    assert len(res['lab']) == 6 + 5 * 5
    assert set(res['ema']['dual']) == {'5', '10'} and 'vanilla' not in res['ema']


def test_straightness(digits_dir, tmp_path):
    """The last grid point's one-step prediction is the path's own last Euler step: distance exactly 0."""
    import ablations
    bed = eval_digits.testbed(digits_dir, [0], samples_per_class=2)
    for step_embed in (False, True):
        net = tiny_digits_model(str(tmp_path / 'm.safetensors'), 0, step_embed).eval()
        ts, dist = ablations.straightness(bed, net, steps=4)
        assert ts == [1.0, 0.75, 0.5, 0.25] and dist[-1] == 0.0 and min(dist[:-1]) > 0, dist
