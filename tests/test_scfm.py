"""
The SCFM method in closed form (docs/method.md): the target, the window/grid sampler, and the LoRA teacher pass.
Pure functions, no subprocess. The EMA update is checked end to end in test_train.py (it lives inside train.py).
"""
import math

import pytest
import torch

from conftest import random_tiny_flux
import model as M
import scfm

# official near/far models per role (docs/method.md, section 3): scfm.TEACHER = 1, scfm.SELF = 2
NEAR, FAR = {1: 'teacher', 2: 'fast'}, {1: 'slow', 2: 'slow'}



def batch(B=96, fm_ratio=0.2, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    p = scfm.plan(gen, B, img_tokens=16, fm_ratio=fm_ratio)
    x0, eps = torch.randn(B, 4, 6, 6, generator=gen, dtype=dtype), torch.randn(B, 4, 6, 6, generator=gen, dtype=dtype)
    return x0, eps, p['role'], p['t'].to(dtype), p['d0'].to(dtype), p['d1'].to(dtype)


def bcast(v, x):
    return v.view(-1, *[1] * (x.ndim - 1))


# -----------------------------------------------------------------------------------------------------------------
# target


def test_target_of_straight_field_is_its_velocity():
    # a field that is constant along straight paths: V(x, t) = v for every x, t. Both sub-steps then see v, and
    # (d0 v + d1 v) / (d0 + d1) = v: a straight flow is a fixed point of the distillation (docs/method.md)
    x0, eps, role, t, d0, d1 = batch(dtype=torch.float32)
    assert set(role.tolist()) == {0, 1, 2}
    v = torch.randn_like(x0)
    x_t, tgt = scfm.target(lambda which, x, tt, idx: v[idx], x0, eps, role, t, d0, d1, NEAR, FAR,
                           cond=(torch.arange(len(role)),))
    assert torch.equal(x_t, (1 - bcast(t, x0)) * x0 + bcast(t, x0) * eps)
    w = role > 0
    # float32: (d0 v + d1 v) / (d0 + d1) rounds three times, so allow a few ulps of |v|
    assert torch.allclose(tgt[w], v[w], rtol=4e-7, atol=0)
    assert torch.equal(tgt[~w], (eps - x0)[~w])  # flow-matching samples: the plain FM target, exactly


# smooth nonlinear fields, a different one per weight set; c makes each sample's field depend on its conditioning,
# so a wrong idx (samples mixed up between the sub-batches) changes the result
C = torch.linspace(-1, 1, 96, dtype=torch.float64)
FIELDS = {
    'teacher': lambda x, t, c: torch.sin(x) * t[:, None, None, None] + 0.3 * x ** 2 + c[:, None, None, None],
    'fast': lambda x, t, c: torch.cos(2 * x) * (1 + t[:, None, None, None]) - 0.5 * x * c[:, None, None, None],
    'slow': lambda x, t, c: torch.tanh(x) * t[:, None, None, None] ** 2 + x + c[:, None, None, None] ** 2,
}


def recording(calls):
    def velocity(which, x, t, idx):
        calls.append((which, idx.tolist()))
        assert x.shape[0] == t.shape[0] == idx.shape[0]
        return FIELDS[which](x, t, C[idx])
    return velocity


@pytest.mark.parametrize('near,far', [
    (NEAR, FAR),                                          # official dual EMA (docs/method.md)
    ({1: 'teacher', 2: 'slow'}, {1: 'teacher', 2: 'slow'}),  # paper's vanilla Eq. 13: one model per slice
    ({1: 'teacher', 2: 'slow'}, {1: 'slow', 2: 'slow'}),     # vanilla-mix Eq. 21 with one EMA
])
def test_target_is_two_euler_substeps(near, far):
    x0, eps, role, t, d0, d1 = batch()
    calls = []
    x_t, tgt = scfm.target(recording(calls), x0, eps, role, t, d0, d1, near, far, cond=(torch.arange(len(role)),))
    # by hand, sample by sample: x1 = x_t - d0 V_near(x_t, t); x2 = x1 - d1 V_far(x1, t - d0)
    for i in range(len(role)):
        r = role[i].item()
        if r == 0:
            assert torch.equal(tgt[i], eps[i] - x0[i])
            continue
        ti, c = t[i:i + 1], C[i:i + 1]
        x1 = x_t[i:i + 1] - d0[i] * FIELDS[near[r]](x_t[i:i + 1], ti, c)
        x2 = x1 - d1[i] * FIELDS[far[r]](x1, ti - d0[i], c)
        end = x_t[i] - (d0[i] + d1[i]) * tgt[i]
        # float64 throughout: only rounding differs (the order of the additions), ~1e-16 relative
        assert (end - x2[0]).norm() <= 1e-12 * x2.norm(), (i, r)
    # one batched call per model: a model shared by several roles is evaluated once on all of their samples
    expect = {}
    for stage in (near, far):
        per_model = {}
        for r, which in stage.items():
            per_model.setdefault(which, []).extend((role == r).nonzero()[:, 0].tolist())
        for which, idx in per_model.items():
            expect.setdefault(which, []).append(sorted(idx))
    got = {}
    for which, idx in calls:
        got.setdefault(which, []).append(idx)
    assert got == expect
    assert len(calls) == sum(len(v) for v in expect.values()) == len(set(near.values())) + len(set(far.values()))


def test_target_calls_follow_active_flags():
    # FSDP forwards are collective: a model is called (on zero local samples if need be) whenever its role occurs on
    # any rank, and not at all when it occurs nowhere
    x0, eps, role, t, d0, d1 = batch()
    role = torch.where(role == 1, 2, role)  # no teacher samples on this rank
    calls = []
    scfm.target(recording(calls), x0, eps, role, t, d0, d1, NEAR, FAR, cond=(torch.arange(len(role)),), active=(True, True, True))
    assert [w for w, _ in calls] == ['teacher', 'fast', 'slow'] and calls[0][1] == []
    calls.clear()
    scfm.target(recording(calls), x0, eps, role, t, d0, d1, NEAR, FAR, cond=(torch.arange(len(role)),), active=(True, False, True))
    assert [w for w, _ in calls] == ['fast', 'slow']
    calls.clear()
    x_t, tgt = scfm.target(recording(calls), x0, eps, torch.zeros_like(role), t, d0, d1, NEAR, FAR,
                           active=(True, False, False))
    assert calls == [] and torch.equal(tgt, eps - x0)  # pure flow matching: no target passes at all


# -----------------------------------------------------------------------------------------------------------------
# the window / grid sampler
#
# Tolerances on frequencies are 5 binomial standard deviations, 5 * sqrt(p (1 - p) / N): with the seed fixed the test
# is deterministic, and a correct sampler would fail a 5-sigma bound with probability < 1e-6 for any other seed, while
# a wrong probability is caught once it is off by more than ~0.5 percentage points at N = 200k.

N = 200_000


def within(count, total, p):
    return abs(count / total - p) <= 5 * math.sqrt(p * (1 - p) / total)


@pytest.fixture(scope='module')
def big_plan():
    return scfm.plan(torch.Generator().manual_seed(1234), N, img_tokens=1024)


def fit_windows(p):
    """Recover each window sample's grid start index a and shift s from (t, d0, d1, n) alone: for every candidate a,
    s follows from the middle point t1 = shifted(1 - (a+1)/n, s) (1/t - 1 = (1/u - 1) / s), and the candidate must
    then also reproduce t0 and t2. Returns a, s and the residual (max abs error of t0, t2) of the best candidate."""
    t, d0, d1, n = (p[k].double() for k in ('t', 'd0', 'd1', 'n'))
    t1, t2 = t - d0, t - d0 - d1
    start, shift, resid = torch.zeros_like(t), torch.zeros_like(t), torch.full_like(t, math.inf)
    for k in n.unique().tolist():
        m = n == k
        tk, t1k, t2k = t[m], t1[m], t2[m]
        best = torch.full_like(tk, math.inf), torch.zeros_like(tk), torch.zeros_like(tk)
        for a in range(0, int(k) - 1):
            u0, u1, u2 = 1 - a / k, 1 - (a + 1) / k, 1 - (a + 2) / k
            s = (1 / u1 - 1) / (1 / t1k - 1)
            p0 = torch.full_like(tk, 1 - 1e-5) if a == 0 else scfm.shifted(u0, s)
            res = torch.maximum((p0 - tk).abs(), (scfm.shifted(u2, s) - t2k).abs())
            take = res < best[0]
            best = (torch.where(take, res, best[0]), torch.where(take, a, best[1]), torch.where(take, s, best[2]))
        resid[m], start[m], shift[m] = best
    return start.long(), shift, resid


def test_plan_roles_and_grids(big_plan):
    p = big_plan
    role, n = p['role'], p['n']
    assert (role > 0).all()  # fm_ratio = 0
    # the official sampler: Bernoulli(0.4) teacher per sample, n = 32; otherwise n uniform over {2, 4, 8, 16}, i.e. 15% each
    assert within((role == 1).sum().item(), N, 0.4), (role == 1).float().mean()
    assert (n[role == 1] == 32).all()
    assert set(n[role == 2].unique().tolist()) == {2, 4, 8, 16}
    for k in (2, 4, 8, 16):
        assert within((n == k).sum().item(), N, 0.15), (k, (n == k).float().mean())
    # guidance ~ U[0, 7.5), per sample
    g = p['guidance']
    assert g.min() >= 0 and g.max() < 7.5
    assert abs(g.mean().item() - 3.75) <= 5 * 7.5 / math.sqrt(12 * N)
    # deterministic: every rank draws the same plan for the global batch from the same seed
    q = scfm.plan(torch.Generator().manual_seed(1234), N, img_tokens=1024)
    assert all(torch.equal(p[k], q[k]) for k in p)


def test_plan_windows_are_aligned_on_shifted_grids(big_plan):
    p = big_plan
    t, d0, d1, n, role = p['t'], p['d0'], p['d1'], p['n'], p['role']
    assert (t > 0).all() and (t <= 1).all() and (d0 > 0).all() and (d1 > 0).all()
    assert t.max().item() == torch.tensor(1 - 1e-5).item()  # g[0] = 1 - 1e-5: never pure noise
    a, s, res = fit_windows(p)
    # t, t - d0, t - d0 - d1 are consecutive points of linspace(1, 0, n+1) shifted by s: t, d0, d1 are float32
    # (error ~6e-8 each), the wrong start index misses by at least a grid step (> 1e-3)
    assert res.max() < 5e-7, res.max()
    # windows start on even indices, so t and t - d0 - d1 are consecutive points of the n/2-step schedule
    assert (a % 2 == 0).all()
    assert torch.equal(t == torch.tensor(1 - 1e-5), a == 0)
    # s ~ U[2.5, 4.5) per sample (recovered to ~1e-5 relative)
    assert s.min() > 2.5 - 1e-3 and s.max() < 4.5 + 1e-3
    assert abs(s.mean().item() - 3.5) <= 5 * 2 / math.sqrt(12 * N)
    assert within((s < 3.0).sum().item(), N, 0.25)
    # the start is uniform over the even indices: teacher samples (n = 32) spread evenly over 16 windows
    at = a[role == 1] // 2
    for k in range(16):
        assert within((at == k).sum().item(), len(at), 1 / 16), k


def test_plan_dynamic_shift():
    # with prob dyn_shift_prob the shift is e^mu(L) instead: 1024 tokens -> mu = 0.63, s = 1.878
    assert scfm.flux_mu(256) == 0.5 and abs(scfm.flux_mu(4096) - 1.15) < 1e-12
    p = scfm.plan(torch.Generator().manual_seed(5), 20_000, img_tokens=1024, dyn_shift_prob=0.1)
    a, s, res = fit_windows(p)
    assert res.max() < 5e-7
    dyn = (s - math.exp(0.63)).abs() < 1e-3
    assert abs(math.exp(scfm.flux_mu(1024)) - 1.8776) < 1e-4
    assert within(dyn.sum().item(), 20_000, 0.1)
    assert ((s[~dyn] >= 2.5 - 1e-3) & (s[~dyn] < 4.5 + 1e-3)).all()


@pytest.mark.parametrize('fm_t', ['logit_normal', 'uniform'])
def test_plan_flow_matching_share(fm_t):
    # fm_ratio is drawn first, then teacher vs self among the rest
    p = scfm.plan(torch.Generator().manual_seed(7), N, img_tokens=16, fm_ratio=0.3, fm_t=fm_t)
    role, t = p['role'], p['t'].double()
    for r, q in ((0, 0.3), (1, 0.7 * 0.4), (2, 0.7 * 0.6)):
        assert within((role == r).sum().item(), N, q), r
    tf = t[role == 0]
    assert (tf > 0).all() and (tf < 1).all()
    # logit-normal: P(logit t < 1) = Phi(1) = 0.8413; uniform: P(t < 0.25) = 0.25
    if fm_t == 'logit_normal':
        assert within((torch.logit(tf) < 1).sum().item(), len(tf), 0.8413)
        assert within((tf < 0.5).sum().item(), len(tf), 0.5)
    else:
        assert within((tf < 0.25).sum().item(), len(tf), 0.25)
    # window samples still live on their grids
    w = {k: v[role > 0][:20_000] for k, v in p.items()}
    assert fit_windows(w)[2].max() < 5e-7


# -----------------------------------------------------------------------------------------------------------------
# LoRA: the teacher pass (scale 0) is the base model bit for bit


def test_lora_scale_zero_is_base_model():
    net = random_tiny_flux()
    B, H, W, Lt = 3, 8, 8, 5
    img = M.pack(torch.randn(B, 4, H, W))
    args = (img, M.make_img_ids(H, W), torch.randn(B, Lt, 32), M.make_txt_ids(Lt), torch.rand(B), torch.randn(B, 32),
            torch.rand(B) * 7.5)
    with torch.no_grad():
        base = net(*args)
        names = M.apply_lora(net, 4)
        assert len(names) == sum(1 for _ in M.lora_modules(net)) > 20
        for name, p in net.named_parameters():
            if '.lora_' in name:
                p.normal_(0, 0.5)  # B != 0: the LoRA changes the output when on
        M.set_lora_scale(net, 0.0)
        assert torch.equal(net(*args), base)
        M.set_lora_scale(net, 1.0)
        assert (net(*args) - base).abs().max() > 1e-2
