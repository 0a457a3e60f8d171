"""
Shortcut models (Frans et al., ICLR 2025) as an option: the step-size input of model.Flux (off: the Flux model,
unchanged), the shortcut objective through scfm.step_sizes + scfm.target against a closed form, and train.py /
sample.generate end to end on the tiny model.
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_tiny_flux, write_shards
import convert_weights
import model as M
import sample
import scfm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = (2, 4, 8, 16, 32, 64, 128)  # the shortcut configs' self grids: d = 1/n, the student's step 2d

# -----------------------------------------------------------------------------------------------------------------
# the objective in closed form: the exact shortcut of a linear ODE dx/dt = LAM x + C is s(x, d) = (x - x(t - d)) / d
# with x(t - d) = e^(-LAM d) (x + C / LAM) - C / LAM. It is self-consistent for any split of a step, d0 + d1:
# (d0 s(x, d0) + d1 s(x - d0 s(x, d0), d1)) / (d0 + d1) = s(x, d0 + d1), so the window target of a model that *is*
# this shortcut must be its own output at the student's step, and only if every pass got its own step size.
LAM, C = 0.9, 0.4


def exact_shortcut(x, d):
    d = d.view(-1, *[1] * (x.ndim - 1))
    return (x + C / LAM) * -torch.expm1(-LAM * d) / d


@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_shortcut_target_closed_form(shift):
    gen = torch.Generator().manual_seed(0)
    p = scfm.plan(gen, 512, 16, fm_ratio=0.3, teacher_ratio=0.4, teacher_steps=256, self_steps=GRIDS,
                  shift_range=(shift, shift))
    role, (t, d0, d1) = p['role'], (p[k].double() for k in ('t', 'd0', 'd1'))
    x0, eps = (torch.randn(512, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    calls = []

    def velocity(which, x, tt, d):  # the exact shortcut, whatever weight set; tt is unused: the ODE is autonomous
        calls.append(which)
        return exact_shortcut(x, d)

    steps = scfm.step_sizes(role, d0, d1, 1 / 128)
    x_t, tgt = scfm.target(velocity, x0, eps, role, t, d0, d1, {1: 'teacher', 2: 'fast'}, {1: 'slow', 2: 'slow'},
                           steps=steps)
    assert sorted(calls) == ['fast', 'slow', 'teacher']  # near: teacher and fast EMA; far: the slow EMA for both
    win, fm = role != scfm.FM, role == scfm.FM
    assert set(role.tolist()) == {0, 1, 2}
    assert torch.equal(steps[0], d0) and torch.equal(steps[1], d1)  # V_near steps d0 from t, V_far d1 from t - d0
    assert torch.equal(steps[2][win], (d0 + d1)[win]) and (steps[2][fm] == 1 / 128).all()  # the student: the window
    assert torch.allclose(tgt[win], exact_shortcut(x_t, steps[2])[win], rtol=1e-12, atol=1e-12)
    assert torch.equal(tgt[fm], (eps - x0)[fm])  # flow matching: the velocity, at the smallest step
    if shift == 1.0:  # the shortcut model's dyadic bootstrap: d0 = d1 = d = 1/n, t on multiples of 2d, student 2d
        n, inner = p['n'].double(), win & (t < 1 - 1e-3)  # (a window at the start begins at 1 - 1e-5, not 1)
        assert torch.equal(d0[inner], 1 / n[inner]) and torch.equal(d1[inner], 1 / n[inner])
        assert torch.equal(torch.frac(t[inner] * n[inner] / 2), torch.zeros(int(inner.sum()), dtype=torch.float64))
        assert (steps[2][role == scfm.TEACHER] == 1 / 128).all()  # teacher windows on 256 steps: the smallest step
        # and the paper's equation, written out: s(x_t, t, 2d) = 1/2 s(x_t, t, d) + 1/2 s(x'_{t-d}, t - d, d)
        s1 = exact_shortcut(x_t, d0)
        s2 = exact_shortcut(x_t - d0.view(-1, 1, 1, 1) * s1, d0)
        assert torch.allclose(tgt[inner], (s1 / 2 + s2 / 2)[inner], rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------------------------------------------
# the step-size input: off, the model is the Flux model (same keys, same output as before the option existed)

CFG = M.FluxConfig(in_channels=8, out_channels=8, vec_in_dim=16, context_in_dim=16, hidden_size=32, num_heads=2,
                   depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=True)
# the output of this model on these inputs (fp64), recorded with model.py before it had a step-size input
BEFORE = [4.037772911434162, 2.3267394981816114, -1.4097735545339347, 3.96608003687869, -3.7206891923271392,
          -1.615546049379677]


def fixed_flux(cfg):
    net = M.Flux(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net.double().eval()


def fixed_inputs():
    g = torch.Generator().manual_seed(1)
    B, H, W, Lt = 2, 4, 4, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return (M.pack(r(B, 2, H, W)), M.make_img_ids(H, W), r(B, Lt, 16), M.make_txt_ids(Lt),
            torch.rand(B, generator=g, dtype=torch.float64), r(B, 16), torch.tensor([1.0, 4.0], dtype=torch.float64))


@torch.no_grad()
def test_step_embed_off_is_flux():
    off, x = fixed_flux(CFG), fixed_inputs()
    out = off(*x)
    assert torch.allclose(out[:, ::5, ::3].flatten(), torch.tensor(BEFORE, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(off(*x, step=torch.rand(2, dtype=torch.float64)), out)  # no step input: a step is ignored
    on = M.Flux(dataclasses.replace(CFG, step_embed=True)).double()
    assert set(on.state_dict()) - set(off.state_dict()) == {f'step_in.{a}.{b}' for a in ('in_layer', 'out_layer')
                                                            for b in ('weight', 'bias')}
    assert set(off.state_dict()) <= set(on.state_dict())
    torch.manual_seed(0)
    on.init_weights()  # the new input starts at zero output: with the Flux weights it is that model, bit for bit
    on.load_state_dict(off.state_dict(), strict=False)
    for d in (0.5, 1 / 128):
        assert torch.equal(on(*x, step=torch.full((2,), d, dtype=torch.float64)), out)
    with pytest.raises(ValueError, match='pass step'):
        on(*x)
    torch.nn.init.normal_(on.step_in.out_layer.weight)
    assert not torch.allclose(on(*x, step=torch.full((2,), 0.5, dtype=torch.float64)),
                              on(*x, step=torch.full((2,), 0.25, dtype=torch.float64)))
    # the checkpoint format: the config is read back from the tensors; diffusers has no such input
    shapes = lambda net: {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert convert_weights.infer_flux_config(shapes(on)) == dataclasses.replace(CFG, step_embed=True)
    assert convert_weights.infer_flux_config(shapes(off)) == CFG
    with pytest.raises(convert_weights.ConvertError, match='step_embed'):
        convert_weights._diffusers_config(on.config)


# -----------------------------------------------------------------------------------------------------------------
# train.py with the two shortcut configs on the tiny model, then sample.generate on the exports

@pytest.fixture(scope='module')
def shortcut_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('shortcut')
    teacher, data = str(tmp / 'teacher.safetensors'), write_shards(tmp / 'data')
    random_tiny_flux(teacher)
    env = {**{k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                                                                  'MASTER_PORT')}, 'OMP_NUM_THREADS': '1'}
    common = ['--model=tiny', f'--data_dir={data}', '--batch_size=8', '--max_iters=2', '--log_interval=1',
              '--device=cpu', '--dtype=float32']
    runs = {'distill': ['config/digits_shortcut_distill.py', f'--init_from={teacher}', '--snapshot_interval=2'],
            'scratch': ['config/digits_shortcut.py']}
    procs = {name: subprocess.Popen([sys.executable, 'train.py', *args, *common, f'--out_dir={tmp / name}'], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f'{name}: {err[-3000:]}'
    return tmp, teacher


def tiny_inputs(B=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 5, 32, generator=g), torch.randn(B, 32, generator=g), sample.make_noise(range(B), 4, 8, 8)


def test_train_shortcut_distill_starts_as_teacher(shortcut_runs):
    tmp, teacher_path = shortcut_runs
    teacher = convert_weights.load_transformer(teacher_path)
    start = convert_weights.load_transformer(str(tmp / 'distill' / 'snapshots' / 'model_0000000.safetensors'))
    assert start.config.step_embed and not teacher.config.step_embed
    txt, y, noise = tiny_inputs()
    # the initial student (the teacher + a step-size input with zero output) samples exactly as the teacher
    sampled = [sample.generate(net, None, txt, y, noise, 3, 1.0) for net in (start, teacher)]
    assert torch.equal(*sampled)
    assert not load_file(str(tmp / 'distill' / 'model.safetensors'))['step_in.out_layer.weight'].eq(0).all()  # trained


@pytest.mark.parametrize('run,kind', [('distill', 'model'), ('scratch', 'model_ema')])
def test_train_shortcut_exports_sample_with_step(shortcut_runs, run, kind):
    tmp, _ = shortcut_runs
    path = str(tmp / run / f'{kind}.safetensors')
    net = convert_weights.load_transformer(path)
    assert net.config.step_embed
    txt, y, noise = tiny_inputs()
    seen, forward = [], net.forward

    def spy(*args, step=None, **kw):
        seen.append(step)
        return forward(*args, step=step, **kw)

    net.forward = spy
    out = sample.generate(net, None, txt, y, noise, 4, 1.0)
    assert [s.tolist() for s in seen] == [[0.25, 0.25]] * 4  # step = t_cur - t_next on the 4-step grid
    if run == 'distill':  # (from scratch, 2 steps leave the output projection near its zero init)
        with torch.no_grad():
            net.step_in.out_layer.weight.zero_()
            net.step_in.out_layer.bias.zero_()
        assert not torch.allclose(sample.generate(net, None, txt, y, noise, 4, 1.0), out)  # the step input acts
    with pytest.raises(convert_weights.ConvertError, match='step_embed'):  # no diffusers equivalent
        convert_weights.convert(path, str(tmp / f'{run}_diffusers'), to='diffusers')
