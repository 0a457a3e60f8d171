"""
Few-step sampling for Flux-style flow-matching models (teacher or SCFM student).

For now this file holds only the importable sampling helpers (used by eval_digits.py and the tests); the
command-line interface is added in issue 5.

Convention (docs/scfm.md §1.1): t = 1 is pure noise, t = 0 is data, x_t = (1-t) x0 + t eps, the model predicts
v = eps - x0, and sampling runs Euler from t = 1 down to t = 0:  x <- x + (t_next - t_cur) * v(x, t_cur).
"""
import math

import torch


def get_schedule(num_steps, shift=1.0, image_seq_len=None, base_shift=0.5, max_shift=1.15):
    """
    The (num_steps+1,) float64 grid of times from exactly 1.0 down to exactly 0.0.

    shift = s: the SD3/SCFM shift g -> s*g / (1 + (s-1)*g) of the uniform grid (s > 1 spends more steps at high
    noise; s = 1 is the plain uniform grid, FLUX.1-schnell). shift = None: FLUX.1-dev's dynamic shift, s = e^mu
    with mu linear in the packed image token count (256 -> base_shift, 4096 -> max_shift); BFL writes it as
    exp(mu) / (exp(mu) + (1/t - 1)), the same function (docs/flux.md §4).
    (The SCFM gradio UI sets g[0] = 1 - 1e-5; we keep exactly 1, the time the models were trained to start at.)
    """
    if shift is None:
        if image_seq_len is None:
            raise ValueError('the dynamic shift (shift=None) needs image_seq_len, the packed image token count')
        m = (max_shift - base_shift) / (4096 - 256)
        shift = math.exp(m * (image_seq_len - 256) + base_shift)
    if shift <= 0:
        raise ValueError(f'shift must be > 0, got {shift}')
    g = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return shift * g / (1 + (shift - 1) * g)  # g = 1 -> s/s = 1.0 exactly, g = 0 -> 0.0 exactly


@torch.no_grad()
def denoise(model, x, img_ids, txt, txt_ids, y, timesteps, guidance=None):
    """
    Euler from timesteps[0] to timesteps[-1] on packed tokens x (B, L, C); returns the final x.
    model(img, img_ids, txt, txt_ids, timesteps, y, guidance) -> velocity, the model.Flux signature.
    guidance: None (a model without guidance_embed), a float, or a (B,) tensor of embedded guidance values.
    """
    B = x.shape[0]
    if guidance is not None and not torch.is_tensor(guidance):
        guidance = torch.full((B,), float(guidance), device=x.device, dtype=x.dtype)
    ts = [float(t) for t in timesteps]
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t_vec = torch.full((B,), t_cur, device=x.device, dtype=x.dtype)
        v = model(x, img_ids, txt, txt_ids, t_vec, y, guidance=guidance)
        x = x + (t_next - t_cur) * v
    return x
