"""
The SCFM method as pure functions (scfm.md §1.4-1.5), used by train.py and checked by tests/test_scfm.py.

Time runs from t = 1 (noise) to t = 0 (data): x_t = (1 - t) x0 + t eps, velocity v = eps - x0.
"""
import math

import torch


def shifted(g, s):
    """The SD3/Flux timestep shift of a grid g in [0, 1]; s = e^mu gives Flux's resolution-dependent shift."""
    return s * g / (1 + (s - 1) * g)


def flux_mu(img_tokens):
    return 0.5 + (img_tokens - 256) * (1.15 - 0.5) / (4096 - 256)


def plan(gen, B, img_tokens, fm_ratio=0.0, teacher_ratio=0.4, teacher_steps=32, self_steps=(2, 4, 8, 16),
         shift_range=(2.5, 4.5), dyn_shift_prob=0.0, fm_t='logit_normal', guidance_range=(0.0, 7.5)):
    """Per-sample role (0 = flow matching on data, 1 = teacher window, 2 = self window), the window start t and its
    two sub-steps d0, d1, the grid size n and the embedded guidance. Each sample draws independently:
      role: flow matching with prob fm_ratio, else teacher with prob teacher_ratio, else self
      grid: n = teacher_steps or one of self_steps; linspace(1, 0, n+1) shifted by s ~ U(shift_range) (or by the
            resolution-dependent shift with prob dyn_shift_prob); g[0] = 1 - 1e-5 so t is never pure noise
      window: an even start index, so the two sub-steps are one step of the n/2-step schedule."""
    role = torch.where(torch.rand(B, generator=gen) < fm_ratio, 0,
                       torch.where(torch.rand(B, generator=gen) < teacher_ratio, 1, 2))
    choice = torch.tensor(self_steps)[torch.randint(len(self_steps), (B,), generator=gen)]
    n = torch.where(role == 1, teacher_steps, choice).double()
    s = shift_range[0] + (shift_range[1] - shift_range[0]) * torch.rand(B, generator=gen, dtype=torch.float64)
    s = torch.where(torch.rand(B, generator=gen) < dyn_shift_prob, math.exp(flux_mu(img_tokens)), s)
    start = 2 * (torch.rand(B, generator=gen, dtype=torch.float64) * (n / 2)).floor()
    grid = lambda k: torch.where(k == 0, 1 - 1e-5, shifted(1 - k / n, s))
    t0, t1, t2 = grid(start), grid(start + 1), grid(start + 2)
    t_fm = torch.sigmoid(torch.randn(B, generator=gen)) if fm_t == 'logit_normal' else torch.rand(B, generator=gen)
    t0 = torch.where(role == 0, t_fm.double(), t0)
    guidance = guidance_range[0] + (guidance_range[1] - guidance_range[0]) * torch.rand(B, generator=gen)
    return dict(role=role, t=t0.float(), d0=(t0 - t1).float(), d1=(t1 - t2).float(), n=n.long(), guidance=guidance)


@torch.no_grad()
def target(velocity, x0, eps, role, t, d0, d1, near, far, active=(True, True, True)):
    """The regression target per sample, one no-grad call per model over the samples that need it:
        flow matching:   eps - x0
        window samples:  (d0 * V_near(x_t, t) + d1 * V_far(x_t - d0 * V_near, t - d0)) / (d0 + d1)
    velocity(which, x, t, idx) evaluates weight set `which` on samples idx; near/far map role (1, 2) -> weight set.
    active[r] says whether role r occurs anywhere (FSDP forwards are collective: all ranks must make the same calls,
    possibly on zero samples). Returns (x_t, target)."""
    te = lambda v: v.view(-1, *[1] * (x0.ndim - 1))
    x_t = (1 - te(t)) * x0 + te(t) * eps
    out = eps - x0
    v_near = torch.zeros_like(x0)
    for which in dict.fromkeys(near.values()):  # one call per model, batching the roles that share it
        roles = [r for r, w in near.items() if w == which and active[r]]
        if roles:
            idx = torch.isin(role, torch.tensor(roles, device=role.device)).nonzero()[:, 0]
            v_near[idx] = velocity(which, x_t[idx], t[idx], idx)
    x_mid, t_mid = x_t - te(d0) * v_near, t - d0
    v_far = torch.zeros_like(x0)
    for which in dict.fromkeys(far.values()):
        roles = [r for r, w in far.items() if w == which and active[r]]
        if roles:
            idx = torch.isin(role, torch.tensor(roles, device=role.device)).nonzero()[:, 0]
            v_far[idx] = velocity(which, x_mid[idx], t_mid[idx], idx)
    window = (te(d0) * v_near + te(d1) * v_far) / te(d0 + d1)
    return x_t, torch.where(te(role) == 0, out, window)
