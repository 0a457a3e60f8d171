"""
Benchmarks, each a ratio against a reference that runs in the same process. Tables go to stdout as markdown.
Needs the dev requirements (diffusers; peft for `step`). Arguments are positional and optional.

    python bench.py model [dtypes] [forward rounds] [forward+backward rounds]    # float32,bfloat16 120 48
        our Flux forward and forward+backward against diffusers' FluxTransformer2DModel with the same weights, an
        identical copy of ours (the noise of a ratio) and ours with one fused matmul per BFL weight (split vs fused)
    python bench.py step [rounds]          # one SCFM optimizer step: train.py vs the official code's construction
    python bench.py sample [steps] [size]  # a 3-step sample: text encoding / transformer / decode, ours vs diffusers
    python bench.py gpu [preset] [device] [size] [steps] [compile]        # 3-step 1024x1024 latency, bf16
    python bench.py gpu-model [preset] [device] [depth] [single] [batch]  # `model` at FLUX.1-dev width, bf16
    python bench.py gpu-train [preset] [device] [batch] [grad_accum] [iters] [train.py args]  # step time, MFU

The GPU ones use random weights of FLUX.1-dev's sizes. Without a GPU they run as a check of the code:
`gpu small cpu 64`, `gpu-model tiny cpu`, `gpu-train tiny cpu 4 1 3 --compile=False`.
"""
import contextlib
import copy
import dataclasses
import gc
import io
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model
import scfm

torch.manual_seed(0)
torch.set_num_threads(os.cpu_count())
CFG = model.PRESETS['small']  # hidden 512, 4 double + 8 single blocks
BATCH, LATENT, TEXT_TOKENS = 2, 32, 64  # a 32x32 latent is 16x16 = 256 image tokens


def time_pair(run_a, run_b, warmup=1, rounds=4):
    """Median times of two functions and the median of their per-round ratios. The two alternate, so a load change
    on a shared machine hits both alike, and their order swaps every round, because the second of two back-to-back
    runs can be faster (warm caches) and a fixed order would hand that to one side. The median of per-round ratios
    ignores the few rounds a load spike hits."""
    times = {run_a: [], run_b: []}
    for i in range(warmup + rounds):
        for run in (run_a, run_b) if i % 2 == 0 else (run_b, run_a):
            t0 = time.perf_counter()
            run()
            if i >= warmup:
                times[run].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times[run_a], times[run_b])]
    return median(times[run_a]), median(times[run_b]), median(ratios)


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def random_model(cfg=CFG):
    net = model.Flux(cfg)
    with torch.no_grad():  # no zero-initialised layers: zero outputs and gradients would flatter the matmuls
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def diffusers_twin(net, tmp):
    """The same weights in diffusers' FluxTransformer2DModel, through convert_weights (BFL file -> diffusers folder)."""
    import convert_weights
    from diffusers import FluxTransformer2DModel
    save_file({k: v.cpu().contiguous() for k, v in net.state_dict().items()}, f'{tmp}/ours.safetensors',
              metadata={'format': 'flux-bfl', 'config': json.dumps(dataclasses.asdict(net.config))})
    convert_weights.convert(f'{tmp}/ours.safetensors', f'{tmp}/diffusers', to='diffusers')
    return FluxTransformer2DModel.from_pretrained(f'{tmp}/diffusers')


@contextlib.contextmanager
def fused_matmuls():
    """model.Linear with one matmul per fused BFL weight (qkv, linear1), split afterwards, instead of one matmul per
    row block: the alternative to model.py's split matmuls, for the split vs fused rows."""
    def forward(self, x, split=None):
        out = F.linear(x, self.weight, self.bias)
        return out if split is None else out.split(split, -1)
    split_forward, model.Linear.forward = model.Linear.forward, forward
    try:
        yield
    finally:
        model.Linear.forward = split_forward


def compare_models(ours, ref, dtype, rounds, warmup=1, batch=BATCH, latent=LATENT, text_tokens=TEXT_TOKENS,
                   sync=lambda: None):
    """Rows (pass, other, ours s, other s, ratio ours/other, rel. error) of ours against diffusers (ref), an
    identical copy of ours and ours with fused matmuls, forward (rounds[0]) and forward+backward (rounds[1])."""
    cfg, dev, twin = ours.config, next(ours.parameters()).device, copy.deepcopy(ours)
    ours.to(dtype), ref.to(dtype), twin.to(dtype)
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, device=dev)
    img, txt, y = randn(batch, (latent // 2) ** 2, cfg.in_channels), randn(batch, text_tokens, cfg.context_in_dim), randn(batch, cfg.vec_in_dim)
    t, g = torch.rand(batch, dtype=dtype, device=dev), torch.full((batch,), 3.5, dtype=dtype, device=dev)
    img_ids, txt_ids = model.make_img_ids(latent, latent, device=dev), model.make_txt_ids(text_tokens, device=dev)

    def fused():
        with fused_matmuls():
            return ours(img, img_ids, txt, txt_ids, t, y, g)

    others = {'diffusers': lambda: ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                                       img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0],
              'a copy of ours (noise)': lambda: twin(img, img_ids, txt, txt_ids, t, y, g),
              'ours, fused matmuls (split vs fused)': fused}
    run_ours = lambda: ours(img, img_ids, txt, txt_ids, t, y, g)
    with torch.no_grad():
        errors = {name: rel_error(run_ours(), run()) for name, run in others.items()}
    forward = lambda run: lambda: (run(), sync())
    forward_backward = lambda run: lambda: (run().float().square().mean().backward(), sync())
    rows = []
    for what, wrap, n in (('forward', forward, rounds[0]), ('forward+backward', forward_backward, rounds[1])):
        for name, run in others.items():
            with torch.set_grad_enabled(what != 'forward'):
                rows.append((what, name, *time_pair(wrap(run_ours), wrap(run), warmup, n), errors[name]))
    return rows


def rel_error(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def print_rows(rows):
    print('| dtype | pass | ours vs | ours (ms) | other (ms) | ratio ours/other | rel. error |\n|---|---|---|---|---|---|---|')
    for dtype, what, other, a, b, ratio, err in rows:
        print(f'| {dtype} | {what} | {other} | {a * 1e3:.2f} | {b * 1e3:.2f} | {ratio:.3f} | {err:.1e} |')
    for dtype, what, other, _, _, ratio, _ in rows:  # split stays only if it beats fused by more than the noise
        if other.startswith('ours, fused'):
            noise = next(r[5] for r in rows if r[:2] == (dtype, what) and r[2].endswith('(noise)'))
            verdict = 'ahead' if 1 - ratio > abs(1 - noise) else 'not ahead'
            print(f'\nsplit vs fused, {dtype} {what}: split/fused {ratio:.3f}, noise {noise:.3f}: split {verdict} of '
                  f'fused by more than the noise', end='')
    print()


def bench_model(dtypes='float32,bfloat16', forward_rounds=120, backward_rounds=48):
    # single runs on a shared machine stray by about 10%, so a median ratio needs about 100 rounds to settle to 1%
    ours = random_model()
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_twin(ours, tmp)
    rows = [(name, *row) for name in dtypes.split(',')
            for row in compare_models(ours, ref, getattr(torch, name), (int(forward_rounds), int(backward_rounds)))]
    print(f'Flux hidden {CFG.hidden_size}, {CFG.depth}+{CFG.depth_single_blocks} blocks, {(LATENT // 2) ** 2} image + '
          f'{TEXT_TOKENS} text tokens, batch {BATCH}, {torch.get_num_threads()} CPU threads; {forward_rounds} forward, '
          f'{backward_rounds} forward+backward rounds, the two sides alternating, order swapped each round; times '
          f'are medians, the ratio is the median of per-round ratios\n')
    print_rows(rows)


# One SCFM optimizer step: train.py itself (one process) against the official code's construction (docs/method.md):
# diffusers FluxTransformer2DModel + a peft LoRA, the student forward, the target passes with LoRA weights swapped in
# place (zeros for the teacher, fast EMA, slow EMA), backward, AdamW, EMA updates.
STEP_BATCH, STEP_RANK, STEP_ITERS = 4, 16, 6


def peak_rss_mb():
    return int(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))) / 1024


def reset_peak_rss():
    gc.collect()  # drop the previous run's objects (FSDP's hooks hold reference cycles)
    with open('/proc/self/clear_refs', 'w') as f:  # resets VmHWM to the current RSS (Linux)
        f.write('5')


def bench_ours_step(tmp, init):
    os.makedirs(tmp)
    g = torch.Generator().manual_seed(0)
    save_file({'x0': torch.randn(16, 16, LATENT, LATENT, generator=g), 'y': torch.randn(16, CFG.vec_in_dim, generator=g),
               'txt': torch.randn(16, TEXT_TOKENS, CFG.context_in_dim, generator=g)}, f'{tmp}/train_000.safetensors')
    sys.argv = ['train.py', '--model=small', f'--init_from={init}', f'--data_dir={tmp}', f'--out_dir={tmp}/out',
                f'--lora_rank={STEP_RANK}', f'--batch_size={STEP_BATCH}', f'--max_iters={STEP_ITERS}', '--lr=1e-4',
                '--log_interval=1', '--ckpt_interval=1000', '--dtype=float32', '--device=cpu']
    out = io.StringIO()
    reset_peak_rss()
    with contextlib.redirect_stdout(out):
        runpy.run_path('train.py', run_name='__main__')
    times = [float(x) for x in re.findall(r'step_time ([0-9.e-]+)', out.getvalue())]
    return median(times[2:]), peak_rss_mb()  # after 2 warm-up steps


def bench_reference_step(net):
    from peft import LoraConfig
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_twin(net, tmp)
    reset_peak_rss()
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=STEP_RANK, lora_alpha=STEP_RANK, init_lora_weights=True, target_modules=[
        name for name, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]))
    lora = [p for name, p in ref.named_parameters() if 'lora_' in name]
    fast, slow = [p.detach().clone() for p in lora], [p.detach().clone() for p in lora]
    opt = torch.optim.AdamW(lora, lr=1e-4)
    img_ids, txt_ids, g = model.make_img_ids(LATENT, LATENT), model.make_txt_ids(TEXT_TOKENS), torch.Generator().manual_seed(0)
    x0, y = torch.randn(STEP_BATCH, 16, LATENT, LATENT), torch.randn(STEP_BATCH, CFG.vec_in_dim)
    txt = torch.randn(STEP_BATCH, TEXT_TOKENS, CFG.context_in_dim)
    velocity = lambda x, t, i, gd: model.unpack(ref(
        hidden_states=model.pack(x), encoder_hidden_states=txt[i], pooled_projections=y[i], timestep=t,
        img_ids=img_ids, txt_ids=txt_ids, guidance=gd[i], return_dict=False)[0], LATENT, LATENT)

    def swap_in(weights):
        torch._foreach_copy_([p.data for p in lora], weights)

    def step():
        p = scfm.plan(g, batch_size=STEP_BATCH, img_tokens=(LATENT // 2) ** 2)
        t, d0, d1, gd, role = p['t'], p['d0'], p['d1'], p['guidance'], p['role']
        col = lambda v: v[:, None, None, None]
        x_t = (1 - col(t)) * x0 + col(t) * torch.randn(x0.shape, generator=g)
        pred = velocity(x_t, t, slice(None), gd)
        with torch.no_grad():
            student, v1 = [q.detach().clone() for q in lora], torch.zeros_like(x0)
            for r, weights in ((scfm.TEACHER, [torch.zeros_like(q) for q in lora]), (scfm.SELF, fast)):
                i = (role == r).nonzero()[:, 0]
                if len(i):
                    swap_in(weights)
                    v1[i] = velocity(x_t[i], t[i], i, gd)
            swap_in(slow)
            v2 = velocity(x_t - col(d0) * v1, t - d0, slice(None), gd)
            swap_in(student)
            target = (col(d0) * v1 + col(d1) * v2) / col(d0 + d1)
        ((pred - target) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(fast, [q.detach() for q in lora], 0.01)
            torch._foreach_lerp_(slow, [q.detach() for q in lora], 0.001)

    times = []
    for i in range(STEP_ITERS):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return median(times[2:]), peak_rss_mb()  # after 2 warm-up steps, as for ours


def bench_step(rounds=5):
    # whole runs alternate, order swapped each round, for the reasons given in time_pair
    net, results, rounds = random_model(), {'ours': [], 'reference': []}, int(rounds)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f'{tmp}/init.safetensors',
                  metadata={'config': json.dumps(dataclasses.asdict(CFG))})
        run = {'ours': lambda i: bench_ours_step(f'{tmp}/{i}', f'{tmp}/init.safetensors'),
               'reference': lambda i: bench_reference_step(net)}
        for i in range(rounds):
            for who in ('ours', 'reference') if i % 2 == 0 else ('reference', 'ours'):
                results[who].append(run[who](i))
    ours, ref = (median([r[0] for r in results[who]]) for who in ('ours', 'reference'))
    # peak RSS of the first round: ours runs first in a fresh process, the reference after it (what ours leaves
    # behind counts against the reference, as in one sequential pair)
    ours_mem, ref_mem = results['ours'][0][1], results['reference'][0][1]
    ratios = [a[0] / b[0] for a, b in zip(results['ours'], results['reference'])]
    print(f'SCFM step, Flux hidden {CFG.hidden_size}, {CFG.depth}+{CFG.depth_single_blocks} blocks, batch {STEP_BATCH}, '
          f'{(LATENT // 2) ** 2}+{TEXT_TOKENS} tokens, LoRA rank {STEP_RANK} on all linears, float32, '
          f'{torch.get_num_threads()} CPU threads; {rounds} rounds of {STEP_ITERS} steps, the two sides alternating; '
          f'medians over rounds of the median step time after 2 warm-up steps; the ratio is the median of per-round '
          f'ratios ({", ".join(f"{r:.2f}" for r in ratios)})\n')
    print('| | ours (train.py, FSDP2, 1 process) | reference (diffusers + peft, swapped) | ratio |\n|---|---|---|---|')
    print(f'| step time (s) | {ours:.3f} | {ref:.3f} | {median(ratios):.2f} |')
    print(f'| peak RSS during the run (MB, first round) | {ours_mem:.0f} | {ref_mem:.0f} | {ours_mem / ref_mem:.2f} |')
