import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import eval_digits
import model as flux_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_prepare():
    spec = importlib.util.spec_from_file_location('digits_prepare', os.path.join(ROOT, 'data', 'digits', 'prepare.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

# ----- Fréchet distance against closed forms -----


def test_frechet_1d():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert eval_digits.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, abs=1e-10)
    assert eval_digits.frechet_distance(0.5, 2.0, 0.5, 2.0) == pytest.approx(0, abs=1e-10)


def test_frechet_diagonal():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=7), rng.normal(size=7)
    v1, v2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert eval_digits.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)


def test_frechet_full_covariance_and_rotation():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = A @ A.T + 0.1 * np.eye(6), B @ B.T  # general (non-commuting) covariances
    m = rng.normal(size=6)
    import scipy.linalg
    ref = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert eval_digits.frechet_distance(m, s1, m, s2) == pytest.approx(ref, rel=1e-8)
    # invariance under a common rotation, and symmetry
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d = eval_digits.frechet_distance(m, s1, 0 * m, s2)
    assert eval_digits.frechet_distance(Q @ m, Q @ s1 @ Q.T, 0 * m, Q @ s2 @ Q.T) == pytest.approx(d, rel=1e-8)
    assert eval_digits.frechet_distance(0 * m, s2, m, s1) == pytest.approx(d, rel=1e-8)
    # rank-deficient covariances (e.g. fewer samples than feature dims) must not produce NaN
    assert np.isfinite(eval_digits.frechet_distance(m, np.outer(m, m), m, np.zeros((6, 6))))

# ----- data preparation and the end-to-end evaluation -----


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('digits'))
    # the random text encoder: no 90 MB weight load in the tests (prepare.py itself runs the real one)
    load_prepare().main(['--out_dir', out, '--limit', '120', '--txt_len', '8', '--text_encoder', 'random'])
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
    load_prepare().main(['--out_dir', digits_dir, '--limit', '120', '--txt_len', '8', '--text_encoder', 'random'])
    assert os.path.getmtime(os.path.join(digits_dir, 'train_000.safetensors')) == mtime


def tiny_digits_model(path, seed):
    cfg = flux_model.FluxConfig(in_channels=4, out_channels=4, vec_in_dim=384, context_in_dim=384, hidden_size=32,
                                num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=False)
    torch.manual_seed(seed)
    m = flux_model.Flux(cfg)
    m.init_weights()
    with torch.no_grad():  # non-zero output layer, so the samples are not just the noise
        m.final_layer.linear.weight.normal_(std=0.1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path,
              metadata={'config': json.dumps(dataclasses.asdict(cfg))})
    return m


def test_load_model_roundtrip(tmp_path):
    m = tiny_digits_model(str(tmp_path / 'm.safetensors'), 0)
    m2 = eval_digits.load_model(str(tmp_path / 'm.safetensors'))
    assert m2.config == m.config
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # a LoRA student file (train.py with lora_rank > 0) is merged into the base at the given scale
    flux_model.apply_lora(m, rank=2)
    with torch.no_grad():
        for lm in flux_model.lora_modules(m).values():
            lm.lora_B.normal_(std=0.05)
    save_file({k: v.contiguous() for k, v in flux_model.lora_state_dict(m).items()}, str(tmp_path / 'lora.safetensors'))
    with pytest.raises(ValueError, match='LoRA'):
        eval_digits.load_model(str(tmp_path / 'lora.safetensors'))
    merged = eval_digits.load_model(str(tmp_path / 'lora.safetensors'), base=str(tmp_path / 'm.safetensors'), lora_scale=1.5)
    flux_model.set_lora_scale(m, 1.5)
    args = (torch.randn(2, 16, 4), flux_model.make_img_ids(8, 8), torch.randn(2, 3, 384), flux_model.make_txt_ids(3),
            torch.rand(2), torch.randn(2, 384))
    with torch.no_grad():
        assert torch.allclose(merged(*args), m(*args), atol=1e-5)


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
    assert [(r['model'], r['steps']) for r in saved['rows']] == [('teacher', 1), ('teacher', 3), ('student', 1), ('student', 2)]
    ref = saved['rows'][1]
    assert ref['rmse_to_ref'][0] == 0.0 and ref['nfe'] == 3
    for r in saved['rows']:
        assert np.isfinite(r['fid'][0]) and len(r['per_seed']['fid']) == 2 and 0 <= r['acc'][0] <= 1
    assert saved['settings']['shift'] == 3.0 and saved['settings']['student_shift'] == 2.0
    table = open(os.path.join(out, 'table.md')).read()
    assert 'student' in table and 'real (train)' in table
    from PIL import Image
    w, h = Image.open(os.path.join(out, 'grid.png')).size
    assert w > 10 * 8 * 4 and h > 5 * 8 * 4  # 10 digit columns, real + 4 sampler rows, upsampled 4x
    # the cached classifier is reused on a second call (same settings)
    assert os.path.exists(tmp_path / 'clf.safetensors')
    assert res['classifier_test_acc'] == saved['classifier_test_acc']


def test_prepare_few_shot(tmp_path):
    out = str(tmp_path / 'd10')
    load_prepare().main(['--out_dir', out, '--limit', '200', '--txt_len', '8', '--text_encoder', 'random',
                         '--per_class', '1'])
    with open(os.path.join(out, 'meta.json')) as f:
        meta = json.load(f)
    assert sorted(meta['labels']['train']) == list(range(10)) and meta['splits']['test'] > 10


def test_ablations_tables_match_eval_digits(digits_dir, tmp_path):
    """ablations.py on fake runs of tiny models: every section is written, and its scores are eval_digits' scores
    (same noise, prompts and classifier), so the ablation tables sit on the testbed table's scale."""
    import ablations
    root, m = tmp_path / 'abl', {}
    paths = ['fewshot/full_s1/model', 'fewshot/ten_s1/model', 'pretrain/fm_s1/model_ema', 'pretrain/scfm_s1/model_ema',
             *[f'progressive/s1/r{n}/model' for n in (32, 16, 8, 4)],
             'ema/dual_s1/snapshots/model_0000005', 'ema/dual_s1/snapshots/model_0000010']
    for i, p in enumerate(paths):
        os.makedirs(os.path.dirname(root / p), exist_ok=True)
        m[p] = tiny_digits_model(str(root / p) + '.safetensors', i)
    teacher = str(tmp_path / 'teacher.safetensors')
    tiny_digits_model(teacher, 99)
    out = str(tmp_path / 'out')
    ablations.main(['--root', str(root), '--teacher', teacher, '--data_dir', digits_dir, '--seeds_train', '1',
                    '--eval_seeds', '0', '--out', out])
    md = open(os.path.join(out, 'ablations.md')).read()
    for section in ('Few-shot', 'Progressive', 'pretraining', 'EMA strategies'):
        assert section in md
    assert os.path.getsize(os.path.join(out, 'ema_curves.png')) > 0
    res = json.load(open(os.path.join(out, 'results.json')))
    fid_abl = {(name, steps): r['fid'][0] for name, steps, r in res['fewshot']}
    ref = eval_digits.main(['--teacher', str(root / 'fewshot/ten_s1/model.safetensors'), '--teacher_steps', '2,3',
                            '--seeds', '0', '--data_dir', digits_dir, '--out', str(tmp_path / 'ev')])
    for row in ref['rows']:
        assert fid_abl[('SCFM, 10 pairs (one per digit)', row['steps'])] == pytest.approx(row['fid'][0], rel=1e-9)
    assert set(res['ema']['dual']) == {'5', '10'} or set(res['ema']['dual']) == {5, 10}
