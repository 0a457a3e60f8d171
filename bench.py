"""
Benchmarks, as ratios against a reference run in the same process (never as timed unit tests).

    python bench.py model     # our Flux forward / forward+backward vs diffusers' FluxTransformer2DModel, same weights
    python bench.py step      # one SCFM optimizer step vs the official code's way (diffusers + peft, weights swapped)

Needs the dev requirements (diffusers; peft for `step`). Results go to stdout as a markdown table.
"""
import os
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

import model as M

torch.manual_seed(0)
torch.set_num_threads(os.cpu_count())
# mid-size CPU config: hidden 512, 4 double + 8 single blocks, 256 image + 64 text tokens, batch 2
CFG = M.FluxConfig(in_channels=64, out_channels=64, vec_in_dim=128, context_in_dim=256, hidden_size=512, num_heads=8,
                   depth=4, depth_single_blocks=8, axes_dim=(16, 24, 24), guidance_embed=True)
B, HW, LT = 2, 32, 64  # 32x32 latent -> 16x16 = 256 tokens


def timeit(fn, warmup=1, iters=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]  # median


def random_model():
    net = M.Flux(CFG)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def diffusers_twin(net, tmp):
    """The same weights in diffusers' FluxTransformer2DModel, through convert_weights (BFL file -> diffusers folder)."""
    import convert_weights
    from diffusers import FluxTransformer2DModel
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f'{tmp}/ours.safetensors')
    convert_weights.convert(f'{tmp}/ours.safetensors', f'{tmp}/diffusers', to='diffusers')
    return FluxTransformer2DModel.from_pretrained(f'{tmp}/diffusers')


def inputs(dtype):
    img = torch.randn(B, (HW // 2) ** 2, CFG.in_channels, dtype=dtype)
    txt = torch.randn(B, LT, CFG.context_in_dim, dtype=dtype)
    y = torch.randn(B, CFG.vec_in_dim, dtype=dtype)
    t, g = torch.rand(B, dtype=dtype), torch.full((B,), 3.5, dtype=dtype)
    return img, M.make_img_ids(HW, HW), txt, M.make_txt_ids(LT), t, y, g


def bench_model():
    ours = random_model()
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_twin(ours, tmp)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype), ref.to(dtype)
        img, iid, txt, tid, t, y, g = inputs(dtype)
        run_ours = lambda: ours(img, iid, txt, tid, t, y, g)
        run_ref = lambda: ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                              img_ids=iid, txt_ids=tid, guidance=g, return_dict=False)[0]
        with torch.no_grad():
            err = ((run_ours().float() - run_ref().float()).norm() / run_ref().float().norm()).item()
            f_ours, f_ref = timeit(run_ours), timeit(run_ref)
        fb_ours = timeit(lambda: run_ours().float().square().mean().backward())
        fb_ref = timeit(lambda: run_ref().float().square().mean().backward())
        name = str(dtype).removeprefix('torch.')
        rows.append((name, 'forward', f_ours, f_ref, err))
        rows.append((name, 'forward+backward', fb_ours, fb_ref, err))
    print(f'Flux hidden {CFG.hidden_size}, {CFG.depth}+{CFG.depth_single_blocks} blocks, {(HW // 2) ** 2} image + '
          f'{LT} text tokens, batch {B}, {torch.get_num_threads()} CPU threads (median of 3)\n')
    print('| dtype | pass | ours (ms) | diffusers (ms) | ratio ours/diffusers | rel. error |')
    print('|---|---|---|---|---|---|')
    for name, what, a, b, err in rows:
        print(f'| {name} | {what} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f} | {err:.1e} |')


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'model'
    {'model': bench_model}[what]()
