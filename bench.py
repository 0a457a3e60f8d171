"""
Benchmarks, as ratios against a reference run in the same process (never as timed unit tests).

    python bench.py model     # our Flux forward / forward+backward vs diffusers' FluxTransformer2DModel, same weights
                              # (`python bench.py model float32`: one dtype only)
    python bench.py step      # one SCFM optimizer step vs the official code's way (diffusers + peft, weights swapped)
    python bench.py sample    # a 3-step sample split into text encoding / transformer / decoding, ours vs diffusers
    python bench.py gpu       # FLUX.1-dev-sized transformer (random weights) + Flux AE, 1024x1024, 3 steps, bf16
    python bench.py gpu-model # forward, forward+backward at FLUX.1-dev width vs diffusers, bf16 on the GPU
    python bench.py gpu-train # train.py config/flux3.py on one GPU, random FLUX.1-dev: step time, MFU, peak memory

Needs the dev requirements (diffusers; peft for `step`). Results go to stdout as a markdown table.
"""
import contextlib
import dataclasses
import json
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


def time_pair(fa, fb, warmup=1, iters=4):
    """Median times of two functions and the median of their per-round ratios. They run alternately, so load changes
    on a shared machine hit both alike, with the order swapped every round: in a by-hand check the second of two
    back-to-back runs of the *same* model was faster, a bias that a fixed order hands to one side."""
    times = {fa: [], fb: []}
    for i in range(warmup + iters):
        for f in ((fa, fb) if i % 2 == 0 else (fb, fa)):
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                times[f].append(time.perf_counter() - t0)
    return median(times[fa]), median(times[fb]), median([a / b for a, b in zip(times[fa], times[fb])])


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def timeit(fn, warmup=1, iters=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def random_model(cfg=CFG):
    net = M.Flux(cfg)
    with torch.no_grad():
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


def inputs(dtype, cfg=CFG, B=B, HW=HW, LT=LT):
    img = torch.randn(B, (HW // 2) ** 2, cfg.in_channels, dtype=dtype)
    txt = torch.randn(B, LT, cfg.context_in_dim, dtype=dtype)
    y = torch.randn(B, cfg.vec_in_dim, dtype=dtype)
    t, g = torch.rand(B, dtype=dtype), torch.full((B,), 3.5, dtype=dtype)
    return img, M.make_img_ids(HW, HW), txt, M.make_txt_ids(LT), t, y, g


# forward, forward+backward rounds per dtype: single runs stray +-10% on this shared machine, so a median ratio
# needs ~100 rounds to settle within ~1%; bf16 without oneDNN (AVX2) is 5-60x slower and gets fewer
ROUNDS = {'float32': (120, 48), 'bfloat16': (12, 4) if M.CPU_BF16_FALLBACK else (120, 48)}


def bench_model(dtypes='float32,bfloat16'):
    ours = random_model()
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_twin(ours, tmp)
    twin = random_model()  # an identical copy of ours: ours vs ours measures the noise of a ratio on this machine
    twin.load_state_dict(ours.state_dict())
    rows = []
    for name, (n_fwd, n_fb) in ROUNDS.items():
        if name not in dtypes.split(','):
            continue
        dtype = getattr(torch, name)
        ours.to(dtype), ref.to(dtype), twin.to(dtype)
        img, iid, txt, tid, t, y, g = inputs(dtype)
        run_ours = lambda: ours(img, iid, txt, tid, t, y, g)
        run_twin = lambda: twin(img, iid, txt, tid, t, y, g)
        run_ref = lambda: ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                              img_ids=iid, txt_ids=tid, guidance=g, return_dict=False)[0]
        fwd_bwd = lambda run: lambda: run().float().square().mean().backward()
        with torch.no_grad():
            err = ((run_ours().float() - run_ref().float()).norm() / run_ref().float().norm()).item()
            rows.append((name, 'forward', *time_pair(run_ours, run_ref, iters=n_fwd), err))
        rows.append((name, 'forward+backward', *time_pair(fwd_bwd(run_ours), fwd_bwd(run_ref), iters=n_fb), err))
        with torch.no_grad():
            rows.append((name, 'forward, ours vs a copy of ours', *time_pair(run_ours, run_twin, iters=n_fwd), 0))
        rows.append((name, 'forward+backward, ours vs a copy', *time_pair(fwd_bwd(run_ours), fwd_bwd(run_twin),
                                                                            iters=n_fb), 0))
    print(f'Flux hidden {CFG.hidden_size}, {CFG.depth}+{CFG.depth_single_blocks} blocks, {(HW // 2) ** 2} image + '
          f'{LT} text tokens, batch {B}, {torch.get_num_threads()} CPU threads; ours and diffusers alternate, order '
          f'swapped each round; times are medians, the ratio is the median of per-round ratios (forward, '
          f'forward+backward rounds: {ROUNDS})\n')
    print('| dtype | pass | ours (ms) | diffusers (ms) | ratio ours/diffusers | rel. error |')
    print('|---|---|---|---|---|---|')
    for name, what, a, b, ratio, err in rows:
        print(f'| {name} | {what} | {a * 1e3:.1f} | {b * 1e3:.1f} | {ratio:.2f} | {err:.1e} |')


# ----------------------------------------------------------------------------------------------------------------
# one SCFM optimizer step: train.py itself (1 process) vs the official code's construction (scfm.md §1.5): diffusers
# FluxTransformer2DModel + a peft LoRA, the student forward, then the target passes with LoRA weights swapped in
# place (zeros for the teacher, fast EMA, slow EMA), backward, AdamW, EMA updates

STEP_B, STEP_RANK, STEP_ITERS = 4, 16, 6


def peak_rss_mb():
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))) / 1024


def reset_peak_rss():
    import gc
    gc.collect()  # drop the previous run's objects (FSDP's hooks hold reference cycles)
    with open('/proc/self/clear_refs', 'w') as f:  # resets VmHWM to the current RSS (Linux)
        f.write('5')


def bench_ours_step(tmp, init):
    import io, re, runpy, contextlib
    os.makedirs(tmp)
    g = torch.Generator().manual_seed(0)
    save_file({'x0': torch.randn(16, 16, HW, HW, generator=g), 'txt': torch.randn(16, LT, CFG.context_in_dim, generator=g),
               'y': torch.randn(16, CFG.vec_in_dim, generator=g)}, f'{tmp}/train_000.safetensors')
    sys.argv = ['train.py', '--model=small', f'--init_from={init}', f'--data_dir={tmp}', f'--out_dir={tmp}/out',
                f'--lora_rank={STEP_RANK}', f'--batch_size={STEP_B}', f'--max_iters={STEP_ITERS}', '--log_interval=1',
                '--ckpt_interval=1000', '--dtype=float32', '--device=cpu', '--lr=1e-4']
    out = io.StringIO()
    reset_peak_rss()
    with contextlib.redirect_stdout(out):
        runpy.run_path('train.py', run_name='__main__')
    times = [float(x) for x in re.findall(r'step_time ([0-9.e-]+)', out.getvalue())]
    return sorted(times[2:])[len(times[2:]) // 2], peak_rss_mb()  # median after 2 warm-up steps


def bench_reference_step(net):
    import scfm
    from peft import LoraConfig
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_twin(net, tmp)
    del net
    reset_peak_rss()
    linears = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=STEP_RANK, lora_alpha=STEP_RANK, target_modules=linears, init_lora_weights=True))
    lora = [p for n, p in ref.named_parameters() if 'lora_' in n]
    fast, slow = [p.detach().clone() for p in lora], [p.detach().clone() for p in lora]
    opt = torch.optim.AdamW(lora, lr=1e-4)
    iid, tid = M.make_img_ids(HW, HW), M.make_txt_ids(LT)
    g = torch.Generator().manual_seed(0)
    x0, txt, y = torch.randn(STEP_B, 16, HW, HW), torch.randn(STEP_B, LT, CFG.context_in_dim), torch.randn(STEP_B, CFG.vec_in_dim)

    def v(x, t, i, gd):
        return M.unpack(ref(hidden_states=M.pack(x), encoder_hidden_states=txt[i], pooled_projections=y[i], timestep=t,
                            img_ids=iid, txt_ids=tid, guidance=gd[i], return_dict=False)[0], HW, HW)

    def swap(src):
        for p, s in zip(lora, src):
            p.data.copy_(s)

    def step():
        p = scfm.plan(g, STEP_B, (HW // 2) ** 2)
        eps, t, d0, d1, gd, role = torch.randn(x0.shape, generator=g), p['t'], p['d0'], p['d1'], p['guidance'], p['role']
        te = lambda a: a[:, None, None, None]
        x_t = (1 - te(t)) * x0 + te(t) * eps
        pred = v(x_t, t, slice(None), gd)
        with torch.no_grad():
            student = [q.detach().clone() for q in lora]
            v1 = torch.zeros_like(x0)
            for r, src in ((1, [torch.zeros_like(q) for q in lora]), (2, fast)):  # teacher = LoRA zeroed; self = fast
                i = (role == r).nonzero()[:, 0]
                if len(i):
                    swap(src)
                    v1[i] = v(x_t[i], t[i], i, gd)
            swap(slow)
            v2 = v(x_t - te(d0) * v1, t - d0, slice(None), gd)
            swap(student)
            target = (te(d0) * v1 + te(d1) * v2) / te(d0 + d1)
        ((pred - target) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(fast, [q.detach() for q in lora], 0.01)
            torch._foreach_lerp_(slow, [q.detach() for q in lora], 0.001)

    return timeit(step, warmup=2, iters=STEP_ITERS - 2), peak_rss_mb()


def bench_step(rounds=5):
    # whole runs alternate, order swapped each round, as in time_pair: a shared machine's load moves single runs by
    # 10-20%, which one sequential pair hands to one side
    net = random_model()
    res = {'ours': [], 'ref': []}
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f'{tmp}/init.safetensors',
                  metadata={'config': json.dumps(dataclasses.asdict(CFG))})
        run = {'ours': lambda i: bench_ours_step(f'{tmp}/{i}', f'{tmp}/init.safetensors'),
               'ref': lambda i: bench_reference_step(net)}
        for i in range(rounds):
            for who in ('ours', 'ref') if i % 2 == 0 else ('ref', 'ours'):
                res[who].append(run[who](i))
    ours, ref = (median([r[0] for r in res[w]]) for w in ('ours', 'ref'))
    # peak RSS of the first round: ours runs first in a fresh process, the reference after it (what ours leaves
    # behind counts against the reference, as in a single sequential pair)
    ours_mem, ref_mem = res['ours'][0][1], res['ref'][0][1]
    ratios = [a[0] / b[0] for a, b in zip(res['ours'], res['ref'])]
    print(f'SCFM step, Flux hidden {CFG.hidden_size}, {CFG.depth}+{CFG.depth_single_blocks} blocks, batch {STEP_B}, '
          f'{(HW // 2) ** 2}+{LT} tokens, LoRA rank {STEP_RANK} on all linears, float32, {torch.get_num_threads()} '
          f'CPU threads; {rounds} rounds of {STEP_ITERS} steps each, ours and the reference alternating; medians over '
          f'rounds of the median step time (after 2 warm-up steps), the ratio is the median of per-round ratios '
          f'({", ".join(f"{r:.2f}" for r in ratios)})\n')
    print('| | ours (train.py, FSDP2, 1 process) | reference (diffusers + peft, swapped) | ratio |')
    print('|---|---|---|---|')
    print(f'| step time (s) | {ours:.3f} | {ref:.3f} | {median(ratios):.2f} |')
    print(f'| peak RSS during the run (MB, first round) | {ours_mem:.0f} | {ref_mem:.0f} | {ours_mem / ref_mem:.2f} |')


# ----------------------------------------------------------------------------------------------------------------
# one 3-step 256x256 sample (32x32 latent, 256 image tokens; T5 512 tokens, CLIP 77) with small random encoders, the
# mid-size transformer and the tiny Flux AE: text encoding (the transformers encoders both pipelines call), the
# transformer (sample.generate vs the same 3 Euler steps through diffusers' FluxTransformer2DModel) and decoding (our
# AutoEncoder vs diffusers' AutoencoderKL with the same weights). Tokenizers are left out (microseconds).


def bench_sample(steps=3, size=256):
    import convert_weights
    import sample
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=CFG.context_in_dim, d_ff=1024, d_kv=32, num_heads=8,
                                 num_layers=4)).eval()
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=CFG.vec_in_dim, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=4, max_position_embeddings=77)).eval()
    ids_t5, ids_clip = torch.randint(0, 32128, (1, 512)), torch.randint(0, 49408, (1, 77))
    net, ae = random_model().eval(), M.AutoEncoder(M.AE_PRESETS['tiny']).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_twin(net, tmp).eval()
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, f'{tmp}/ae.safetensors',
                  metadata={'format': 'flux-bfl', 'model': 'ae', 'config': json.dumps(dataclasses.asdict(ae.cfg))})
        convert_weights.convert(f'{tmp}/ae.safetensors', f'{tmp}/vae', to='diffusers')
        vae = AutoencoderKL.from_pretrained(f'{tmp}/vae').eval()
    h = w = size // 8
    noise = torch.randn(1, 16, h, w)

    def encode():
        return t5(ids_t5).last_hidden_state, clip(ids_clip).pooler_output

    with torch.no_grad():
        txt, y = encode()
        ts = sample.get_schedule(steps, shift=3.0)
        iid, tid = M.make_img_ids(h, w), M.make_txt_ids(txt.shape[1])

        def ref_transformer():
            x = M.pack(noise)
            for t0, t1 in zip(ts[:-1], ts[1:]):
                v = ref(hidden_states=x, encoder_hidden_states=txt, pooled_projections=y, timestep=torch.tensor([t0]),
                        img_ids=iid, txt_ids=tid, guidance=torch.tensor([3.5]), return_dict=False)[0]
                x = x + (t1 - t0) * v
            return M.unpack(x, h, w)

        ours_transformer = lambda: sample.generate(net, None, txt, y, noise, steps, 3.0)
        z = ours_transformer()
        err = ((z - ref_transformer()).norm() / z.norm()).item()
        t_enc = timeit(encode)
        t_tr, r_tr, _ = time_pair(ours_transformer, ref_transformer)
        t_dec, r_dec, _ = time_pair(lambda: ae.decode(z), lambda: vae.decode(z / vae.config.scaling_factor
                                                                          + vae.config.shift_factor).sample)
    total, ref_total = t_enc + t_tr + t_dec, t_enc + r_tr + r_dec
    print(f'{steps}-step sample at {size}x{size} px, batch 1: T5 (d 256, 4 layers, 512 tokens) + CLIP (d 128, 4 layers), '
          f'Flux hidden {CFG.hidden_size} {CFG.depth}+{CFG.depth_single_blocks} blocks, tiny Flux AE; '
          f'{torch.get_num_threads()} CPU threads, medians, ours/diffusers order alternated; latent rel. error ours vs '
          f'diffusers {err:.1e}\n')
    print('| stage | ours (ms) | share of ours | diffusers (ms) | ratio ours/diffusers |')
    print('|---|---|---|---|---|')
    for name, a, b in (('text encoding (transformers T5 + CLIP, shared)', t_enc, t_enc),
                       (f'transformer ({steps} steps)', t_tr, r_tr), ('AE decode', t_dec, r_dec), ('total', total, ref_total)):
        print(f'| {name} | {a * 1e3:.1f} | {100 * a / total:.0f}% | {b * 1e3:.1f} | {a / b:.2f} |')


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmarks, bf16, random weights of FLUX.1-dev's sizes (issues 3 and 5; the card is printed):
#   gpu        3-step 1024x1024 transformer + AE decode latency: eager, compiled, decode with cuDNN autotuning
#   gpu-model  forward and forward+backward at FLUX.1-dev width (1 double + 2 single blocks) vs diffusers
#   gpu-train  train.py config/flux3.py on one GPU (LoRA 64 on a random FLUX.1-dev, 512 px): step time, MFU, memory
# Without a GPU, as a check of the code: `python bench.py gpu small cpu 64`, `gpu-model tiny cpu`, `gpu-train tiny cpu 4`.


@contextlib.contextmanager
def fused_matmuls():
    """Ours with one matmul per fused BFL weight (qkv, linear1), split afterwards, instead of Linear's one matmul per
    row block: which of the two is faster depends on the BLAS."""
    def forward(self, x, split=None):
        out = M.linear(x, self.weight, self.bias)
        return out if split is None else out.split(split, -1)
    plain, M.Linear.forward = M.Linear.forward, forward
    try:
        yield
    finally:
        M.Linear.forward = plain


def bench_gpu(preset='flux-dev', device='cuda', size=1024, steps=3, compile=1):
    import sample
    size, steps, dtype = int(size), int(steps), torch.bfloat16
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    with torch.device('meta'):
        net, ae = M.Flux(M.PRESETS[preset]), M.AutoEncoder(M.AE_PRESETS['flux' if preset.startswith('flux') else 'tiny'])
    net, ae = net.to(dtype).to_empty(device=device), ae.to(dtype).to_empty(device=device)  # 24 GB, not 48 + 24
    net.init_weights(), ae.init_weights()
    net, ae = net.eval(), ae.eval()
    cfg = net.config
    h = w = size // 8
    txt = torch.randn(1, 512, cfg.context_in_dim, device=device)
    y, noise = torch.randn(1, cfg.vec_in_dim, device=device), torch.randn(1, cfg.in_channels // 4, h, w, device=device)

    def timed(fn):
        def run():
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            sync()
            return time.perf_counter() - t0
        run()  # warm-up: kernel selection, allocator, compilation
        return median([run() for _ in range(5)])

    z = sample.generate(net, None, txt, y, noise, steps, 3.0).to(dtype)
    transformer = lambda: sample.generate(net, None, txt, y, noise, steps, 3.0)
    print(f'{preset} transformer ({sum(p.numel() for p in net.parameters()) / 1e9:.2f}B params) + AE decode, '
          f'{size}x{size}, {steps} steps, batch 1, bf16, on {device_name(device)} (medians of 5 after a warm-up)\n')
    print('| stage | variant | time (s) |\n|---|---|---|')
    print(f'| transformer | eager | {timed(transformer):.3f} |', flush=True)
    for label, bench, channels_last in (('eager', False, False), ('cudnn.benchmark', True, False),
                                        ('cudnn.benchmark + channels_last', True, True)):
        torch.backends.cudnn.benchmark = bench
        if channels_last:
            ae, z = ae.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
        print(f'| decode | {label} | {timed(lambda: ae.decode(z)):.3f} |', flush=True)
    if int(compile):
        net.compile_blocks()
        print(f'| transformer | blocks compiled (sample.py --compile) | {timed(transformer):.3f} |', flush=True)
    if device.startswith('cuda'):
        print(f'\npeak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB')


def bench_gpu_model(preset='flux-dev', device='cuda', depth=1, single=2, batch=2):
    cfg = dataclasses.replace(M.PRESETS[preset], depth=int(depth), depth_single_blocks=int(single))
    B, HW, LT = int(batch), 64, 512  # 512 px: 1024 image tokens, 512 T5 tokens
    with torch.device(device):
        ours = random_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ref = diffusers_twin(ours, tmp).to(device)
    img, iid, txt, tid, t, y, g = (a.to(device) for a in inputs(torch.float32, cfg, B, HW, LT))
    run_ours = lambda: ours(img, iid, txt, tid, t, y, g)
    run_ref = lambda: ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                          img_ids=iid, txt_ids=tid, guidance=g, return_dict=False)[0]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    with torch.no_grad():
        err32 = rel(run_ours(), run_ref())
        ours.bfloat16(), ref.bfloat16()
        img, txt, t, y, g = (a.bfloat16() for a in (img, txt, t, y, g))
        err16 = rel(run_ours(), run_ref())

    def synced(f):
        return lambda: (f(), device == 'cpu' or torch.cuda.synchronize())

    def run_fused():
        with fused_matmuls():
            return run_ours()

    fwd_bwd = lambda run: lambda: run().float().square().mean().backward()
    print(f'{preset} width, {cfg.depth}+{cfg.depth_single_blocks} blocks ({ours.num_params() / 1e9:.2f}B params), '
          f'{(HW // 2) ** 2} image + {LT} text tokens, batch {B}, bf16, on {device_name(device)}; rel. error ours vs diffusers: {err32:.1e} in float32, {err16:.1e} in bf16 '
          f'(medians; order swapped each round)\n')
    print('| pass | ours as shipped vs | ours (ms) | other (ms) | ratio ours/other |')
    print('|---|---|---|---|---|')
    for what, wrap, n in (('forward', torch.no_grad, 50), ('forward+backward', contextlib.nullcontext, 25)):
        f = (lambda r: r) if what == 'forward' else fwd_bwd
        for other, run_other in (('diffusers', run_ref), ('ours, fused_matmuls()', run_fused)):
            with wrap():
                a, b, ratio = time_pair(synced(f(run_ours)), synced(f(run_other)), 3, n)
            print(f'| {what} | {other} | {a * 1e3:.2f} | {b * 1e3:.2f} | {ratio:.3f} |', flush=True)


def bench_gpu_train(preset='flux-dev', device='cuda', batch=16, grad_accum=1, iters=5, *train_args):
    """Writes a random bf16 model (24 GB for FLUX.1-dev) and one shard of random 512 px data, then runs train.py."""
    import re
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device('meta'):
            net = M.Flux(M.PRESETS[preset])
        cfg, net = net.config, net.to(torch.bfloat16).to_empty(device=device)
        with torch.no_grad():  # no zero-initialised layers: zero outputs and gradients would flatter the matmuls
            for p in net.parameters():
                p.normal_(0, 0.02)
        save_file({k: v.cpu() for k, v in net.state_dict().items()}, f'{tmp}/base.safetensors')
        del net
        g, n = torch.Generator().manual_seed(0), int(batch)
        os.makedirs(f'{tmp}/data')
        save_file({'x0': torch.randn(n, cfg.in_channels // 4, 64, 64, generator=g),
                   'txt': torch.randn(n, 512, cfg.context_in_dim, generator=g),
                   'y': torch.randn(n, cfg.vec_in_dim, generator=g)}, f'{tmp}/data/train_000.safetensors')
        cmd = [sys.executable, 'train.py', 'config/flux3.py', f'--init_from={tmp}/base.safetensors', f'--model={preset}',
               f'--device={device}', f'--data_dir={tmp}/data', f'--out_dir={tmp}/out', f'--batch_size={batch}',
               f'--grad_accum={grad_accum}', f'--max_iters={iters}', '--log_interval=1', '--ckpt_interval=100000',
               *train_args]
        log = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
            for line in p.stdout:
                print(line, end='', flush=True)
                log.append(line)
        if p.returncode:
            raise SystemExit(f'train.py failed ({p.returncode})')
    steps = [dict(re.findall(r'(\w+) ([0-9.e+-]+)', l.split(':', 1)[1])) for l in log if re.match(r'step \d+:', l)]
    m = lambda k: median([float(s[k]) for s in steps[2:]])  # after 2 warm-up steps
    print(f'\ntrain.py config/flux3.py, random {preset} weights, LoRA rank 64 on every linear, grad_ckpt, 512 px '
          f'(1024 + 512 tokens), batch {batch} (grad_accum {grad_accum}) {" ".join(train_args)}, bf16, 1 process on '
          f'{device_name(device)}; medians of steps 3-{iters}; MFU against 989 TFLOP/s dense bf16\n')
    print('| step time (s) | steps/s | images/s | MFU | peak memory (GB) |')
    print('|---|---|---|---|---|')
    print(f'| {m("step_time"):.2f} | {1 / m("step_time"):.3f} | {m("img_per_s"):.2f} | {100 * m("mfu"):.1f}% | '
          f'{max(float(s.get("peak_mem_gb", "nan")) for s in steps):.1f} |')


def device_name(device):
    return torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'model'
    {'model': bench_model, 'step': bench_step, 'sample': bench_sample, 'gpu': bench_gpu,
     'gpu-model': bench_gpu_model, 'gpu-train': bench_gpu_train}[what](*sys.argv[2:])
