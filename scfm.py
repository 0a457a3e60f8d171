"""
The time convention, the sampling schedule and the SCFM objective as pure functions (docs/method.md), used by
train.py and sample.py.

Time runs from t = 1 (noise) to t = 0 (data): x_t = (1 - t) x0 + t eps, velocity v = eps - x0, and sampling is
Euler from t = 1 down to t = 0: x <- x + (t_next - t_cur) * v(x, t_cur).
"""
import math

import torch

def shifted(g, s):
    """The SD3/Flux timestep shift of a grid g in [0, 1]; s = e^mu gives Flux's resolution-dependent shift."""
    return s * g / (1 + (s - 1) * g)

def flux_mu(img_tokens):
    """FLUX.1-dev's resolution-dependent shift is s = e^mu, mu linear in the packed image token count."""
    return 0.5 + (img_tokens - 256) * (1.15 - 0.5) / (4096 - 256)

def get_schedule(num_steps, shift=1.0, image_seq_len=None):
    """The (num_steps+1,) float64 sampling grid from exactly 1.0 down to exactly 0.0: the uniform grid, shifted by
    s = shift (s > 1 spends more steps at high noise), or by FLUX.1-dev's e^mu when shift is None."""
    if shift is None:
        if image_seq_len is None:
            raise ValueError('the dynamic shift (shift=None) needs image_seq_len, the packed image token count')
        shift = math.exp(flux_mu(image_seq_len))
    if shift <= 0:
        raise ValueError(f'shift must be > 0, got {shift}')
    return shifted(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift)

FM, TEACHER, SELF = 0, 1, 2  # a sample's role: flow matching on data, a teacher window, a self window
ROLES = ('fm', 'teacher', 'self')

def plan(gen, batch_size, img_tokens, fm_ratio=0.0, teacher_ratio=0.4, teacher_steps=32, self_steps=(2, 4, 8, 16),
         shift_range=(2.5, 4.5), dyn_shift_prob=0.0, fm_t='logit_normal', guidance_range=(0.0, 7.5)):
    """Per sample: its role, the window start t and the window's two sub-steps d0, d1, the grid size n and the
    embedded guidance (docs/method.md, section 4). Each sample draws independently:
      role: FM with prob fm_ratio, else TEACHER with prob teacher_ratio, else SELF
      grid: n = teacher_steps or one of self_steps; linspace(1, 0, n+1) shifted by s ~ U(shift_range) (or by the
            resolution-dependent shift with prob dyn_shift_prob); g[0] = 1 - 1e-5 so t is never pure noise
      window: an even start index, so the two sub-steps are one step of the n/2-step schedule."""
    B = batch_size
    role = torch.where(torch.rand(B, generator=gen) < fm_ratio, FM,
                       torch.where(torch.rand(B, generator=gen) < teacher_ratio, TEACHER, SELF))
    choice = torch.tensor(self_steps)[torch.randint(len(self_steps), (B,), generator=gen)]
    n = torch.where(role == TEACHER, teacher_steps, choice).double()
    s = shift_range[0] + (shift_range[1] - shift_range[0]) * torch.rand(B, generator=gen, dtype=torch.float64)
    s = torch.where(torch.rand(B, generator=gen) < dyn_shift_prob, math.exp(flux_mu(img_tokens)), s)
    start = 2 * (torch.rand(B, generator=gen, dtype=torch.float64) * (n / 2)).floor()
    grid = lambda k: torch.where(k == 0, 1 - 1e-5, shifted(1 - k / n, s))
    t0, t1, t2 = grid(start), grid(start + 1), grid(start + 2)
    t_fm = torch.sigmoid(torch.randn(B, generator=gen)) if fm_t == 'logit_normal' else torch.rand(B, generator=gen)
    t0 = torch.where(role == FM, t_fm.double(), t0)
    guidance = guidance_range[0] + (guidance_range[1] - guidance_range[0]) * torch.rand(B, generator=gen)
    return dict(role=role, t=t0.float(), d0=(t0 - t1).float(), d1=(t1 - t2).float(), n=n.long(), guidance=guidance)

def step_sizes(role, d0, d1, smallest):
    """A shortcut model's (Frans et al. 2025) step-size input per sample for (V_near, V_far, student): d0, d1 and
    the window d0 + d1; flow matching learns the smallest step. With d0 = d1 = d (shift 1, 2^k-step grids) the window
    target is the self-consistency s(x_t, t, 2d) = 1/2 s(x_t, t, d) + 1/2 s(x_t - d s(x_t, t, d), t - d, d)."""
    return d0, d1, torch.where(role == FM, smallest, d0 + d1)

@torch.no_grad()
def target(velocity, x0, eps, role, t, d0, d1, near, far, cond=(), active=(True, True, True), steps=()):
    """The regression target per sample (docs/method.md, section 2), one no-grad pass per weight set:
        FM samples:      eps - x0
        window samples:  (d0 * V_near(x_t, t) + d1 * V_far(x_t - d0 * V_near, t - d0)) / (d0 + d1)
    velocity(which, x, t, *cond) runs weight set `which` on a subset of the samples (cond: per-sample tensors such
    as the text embeddings, sliced alike); near and far map a role (TEACHER, SELF) to the weight set of its V_near
    and V_far. active[r] says whether role r occurs anywhere in the global micro-batch (FSDP forwards are collective:
    every rank makes the same calls, possibly on zero samples). steps: () or a shortcut model's step_sizes, passed after
    cond. Returns (x_t, target)."""
    te = lambda v: v.view(-1, *[1] * (x0.ndim - 1))

    def run(weights_of, x, t, *step):  # x, t -> v, one call per weight set over the samples of the roles that use it
        v = torch.zeros_like(x0)
        for which in dict.fromkeys(weights_of.values()):
            roles = [r for r, w in weights_of.items() if w == which and active[r]]
            if roles:
                idx = torch.isin(role, torch.tensor(roles, device=role.device)).nonzero()[:, 0]
                v[idx] = velocity(which, x[idx], t[idx], *(c[idx] for c in (*cond, *step)))
        return v

    x_t = (1 - te(t)) * x0 + te(t) * eps
    v_near = run(near, x_t, t, *steps[:1])
    v_far = run(far, x_t - te(d0) * v_near, t - d0, *steps[1:2])
    window = (te(d0) * v_near + te(d1) * v_far) / te(d0 + d1)
    return x_t, torch.where(te(role) == FM, eps - x0, window)
