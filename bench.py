"""Speed as ratios against a reference run alongside, as markdown tables (needs diffusers; peft for `step`). Arguments
are positional and optional; GPU ones use random FLUX.1-dev-size weights (`gpu small cpu 64 3 0`, `gpu-model tiny cpu`):

    python bench.py model [dtypes] [forward rounds] [forward+backward rounds]  # float32,bfloat16 120 48
    python bench.py step [rounds]          # one SCFM optimizer step: train.py vs the official code's construction
    python bench.py sample [steps] [size]  # a 3-step sample: text encoding / transformer / decode, vs diffusers
    python bench.py gpu [preset] [device] [size] [steps] [compile]        # 3-step 1024x1024 latency, bf16
    python bench.py gpu-model [preset] [device] [depth] [single] [batch]  # `model` at FLUX.1-dev width, 1024+512 tokens
    python bench.py gpu-train [preset] [device] [batch] [grad_accum] [iters] [train.py args]  # step time, MFU
"""
import copy, dataclasses, json, os, re, subprocess, sys, tempfile, time
from statistics import median

import torch
from safetensors.torch import save_file

import model, sample, scfm

torch.manual_seed(0)
torch.set_num_threads(os.cpu_count())
CFG = model.PRESETS['small']  # hidden 512, 4 double + 8 single blocks
STEP_BATCH, STEP_RANK, STEP_ITERS = 4, 16, 6  # the step bench: 256 image tokens (32x32 latents) + 64 text tokens

def seconds(run):
    t0 = time.perf_counter()
    run()
    if torch.cuda.is_initialized():  # wait for the queued kernels
        torch.cuda.synchronize()
    return time.perf_counter() - t0

def time_pair(run_a, run_b, warmup=1, rounds=4, measure=seconds):
    """Median times of two runs and their per-round ratios. They alternate in an order swapped every round (the second
    of two runs can be faster); the median of the ratios ignores the rounds a load spike hits."""
    times = {run_a: [], run_b: []}
    for i in range(warmup + rounds):
        for run in (run_a, run_b) if i % 2 == 0 else (run_b, run_a):
            times[run].append(measure(run))
    a, b = times[run_a][warmup:], times[run_b][warmup:]
    return median(a), median(b), [x / y for x, y in zip(a, b)]

def table(caption, header, rows, device='cpu'):
    """Print the caption, the machine and a markdown table (header: the column names joined by ' | ')."""
    machine = torch.cuda.get_device_name() if device.startswith('cuda') else f'{torch.get_num_threads()} CPU threads'
    print(f'{caption}; {machine}\n\n| {header} |\n|{"---|" * (header.count("|") + 1)}',
          *(f'| {" | ".join(cells)} |' for cells in rows), sep='\n', flush=True)

def random_model(cfg=CFG, device='cpu', dtype=torch.float32):
    with torch.device('meta'):
        net = model.Flux(cfg).to(dtype)
    for p in net.to_empty(device=device).parameters():  # no zero layers: zero outputs would flatter the matmuls
        torch.nn.init.normal_(p, 0, 0.02)
    return net

def diffusers_twin(net, cfg, diffusers_class='FluxTransformer2DModel'):
    """The same weights in diffusers (FluxTransformer2DModel or AutoencoderKL), converted by convert_weights."""
    import convert_weights, diffusers
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.cpu().contiguous() for k, v in net.state_dict().items()}, f'{tmp}/ours.safetensors',
                  metadata={'config': json.dumps(dataclasses.asdict(cfg))})
        convert_weights.convert(f'{tmp}/ours.safetensors', f'{tmp}/diffusers', to='diffusers')
        return getattr(diffusers, diffusers_class).from_pretrained(f'{tmp}/diffusers').eval()

def as_ours(ref):
    """diffusers' FluxTransformer2DModel with our Flux's call signature."""
    return lambda img, img_ids, txt, txt_ids, t, y, guidance=None: ref(
        hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids,
        txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

def bench_model(dtypes='float32,bfloat16', forward_rounds=120, backward_rounds=48, cfg=CFG, device='cpu', batch=2,
                latent=32, text_tokens=64, warmup=1):
    """Our Flux against diffusers' FluxTransformer2DModel (same weights), an identical copy of ours (how far a ratio
    strays from 1 by noise alone). ~100 rounds settle a median ratio to ~1%."""
    ours, rows, tokens = random_model(cfg, device), [], (latent // 2) ** 2
    ref, twin = diffusers_twin(ours, cfg).to(device), copy.deepcopy(ours)
    for name in dtypes.split(','):
        dtype = getattr(torch, name)
        ours.to(dtype), ref.to(dtype), twin.to(dtype)
        img, txt, y, t = (torch.randn(batch, *shape, dtype=dtype, device=device) for shape in
                          ((tokens, cfg.in_channels), (text_tokens, cfg.context_in_dim), (cfg.vec_in_dim,), ()))
        args = (img, model.make_img_ids(latent, latent, device=device), txt,
                model.make_txt_ids(text_tokens, device=device), t.sigmoid(), y, torch.full_like(t, 3.5))
        others = {'diffusers': lambda: as_ours(ref)(*args), 'a copy of ours (noise)': lambda: twin(*args)}
        with torch.no_grad():  # rel. error: |ours - other| / |ours|
            out = ours(*args).float()
            errors = {other: ((out - run().float()).norm() / out.norm()).item() for other, run in others.items()}
        for what, n in (('forward', forward_rounds), ('forward+backward', backward_rounds)):
            timed = lambda run: run if what == 'forward' else lambda: run().float().square().mean().backward()
            with torch.set_grad_enabled(what != 'forward'):
                rows += [(name, what, other, *time_pair(timed(lambda: ours(*args)), timed(run), warmup, int(n)),
                          errors[other]) for other, run in others.items()]
    table(f'Flux hidden {cfg.hidden_size}, {cfg.depth}+{cfg.depth_single_blocks} blocks, {tokens}+{text_tokens} '
          f'tokens, batch {batch}; medians of {forward_rounds} forward, {backward_rounds} forward+backward rounds',
          'dtype | pass | ours vs | ours (ms) | other (ms) | ratio ours/other | rel. error', [(*names, f'{a * 1e3:.2f}',
          f'{b * 1e3:.2f}', f'{median(ratios):.3f}', f'{error:.1e}') for *names, a, b, ratios, error in rows], device)

def bench_gpu_model(preset='flux-dev', device='cuda', depth=1, single=2, batch=2):
    cfg = dataclasses.replace(model.PRESETS[preset], depth=int(depth), depth_single_blocks=int(single))
    bench_model('float32,bfloat16', 50, 25, cfg, device, int(batch), latent=64, text_tokens=512, warmup=3)

def run_logged(cmd, echo=False):
    """cmd in a fresh process -> (its 'step N: key value ...' lines as dicts, its peak RSS in MB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))  # the thread count this process uses
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    log = [print(line, end='', flush=True) or line if echo else line for line in proc.stdout]
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f'{" ".join(cmd)} failed ({os.waitstatus_to_exitcode(status)})')
    steps = [line.split(':', 1)[1] for line in log if re.match(r'step \d+:', line)]
    return [{k: float(v) for k, v in re.findall(r'(\w+) ([0-9.e+-]+)', s)} for s in steps], usage.ru_maxrss / 1024

def run_train(cfg, device, batch, latent, text_tokens, *args, echo=False):
    """run_logged(train.py) on a random model (bf16 on a GPU) and one shard of random data."""
    g, dtype = torch.Generator().manual_seed(0), torch.bfloat16 if device.startswith('cuda') else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.cpu() for k, v in random_model(cfg, device, dtype).state_dict().items()},
                  f'{tmp}/init.safetensors', metadata={'config': json.dumps(dataclasses.asdict(cfg))})
        save_file({'x0': torch.randn(batch, cfg.in_channels // 4, latent, latent, generator=g),
                   'txt': torch.randn(batch, text_tokens, cfg.context_in_dim, generator=g),
                   'y': torch.randn(batch, cfg.vec_in_dim, generator=g)}, f'{tmp}/train_000.safetensors')
        return run_logged([sys.executable, 'train.py', *args, f'--device={device}', f'--data_dir={tmp}',
                           f'--init_from={tmp}/init.safetensors', f'--out_dir={tmp}/out', '--log_interval=1',
                           '--ckpt_interval=100000'], echo)

def reference_step():
    """SCFM steps built as the official code builds them: diffusers + a peft LoRA overwritten in place per pass."""
    from peft import LoraConfig
    ref = diffusers_twin(random_model(), CFG).requires_grad_(False)
    ref.add_adapter(LoraConfig(r=STEP_RANK, lora_alpha=STEP_RANK, target_modules=[
        name for name, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]))
    lora = [p for name, p in ref.named_parameters() if 'lora_' in name]
    weights = {'teacher': [torch.zeros_like(p) for p in lora], 'fast': [p.detach().clone() for p in lora],
               'slow': [p.detach().clone() for p in lora]}
    opt, g = torch.optim.AdamW(lora, lr=1e-4), torch.Generator().manual_seed(0)
    img_ids, txt_ids, x0 = model.make_img_ids(32, 32), model.make_txt_ids(64), torch.randn(STEP_BATCH, 16, 32, 32)
    txt, y = torch.randn(STEP_BATCH, 64, CFG.context_in_dim), torch.randn(STEP_BATCH, CFG.vec_in_dim)

    def velocity(which, x, t, txt, y, guidance):
        with torch.no_grad():
            torch._foreach_copy_(lora, weights[which])
        return model.unpack(as_ours(ref)(model.pack(x), img_ids, txt, txt_ids, t, y, guidance), 32, 32)

    for i in range(STEP_ITERS):
        t0, p = time.perf_counter(), scfm.plan(g, batch_size=STEP_BATCH, img_tokens=256)
        weights['student'] = [q.detach().clone() for q in lora]
        x_t, target = scfm.target(velocity, x0, torch.randn(x0.shape, generator=g), p['role'], p['t'], p['d0'],
                                  p['d1'], near={scfm.TEACHER: 'teacher', scfm.SELF: 'fast'},
                                  far={scfm.TEACHER: 'slow', scfm.SELF: 'slow'}, cond=(txt, y, p['guidance']),
                                  active=[(p['role'] == r).any() for r in range(3)])  # no calls on zero samples
        ((velocity('student', x_t, p['t'], txt, y, p['guidance']) - target) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(weights['fast'], lora, 0.01)
            torch._foreach_lerp_(weights['slow'], lora, 0.001)
        print(f'step {i + 1}: step_time {time.perf_counter() - t0:.6g}', flush=True)

def bench_step(rounds=5):
    """train.py (FSDP2, 1 process, LoRA on every linear) against reference_step, fresh processes in swapped order."""
    rss = {}
    def step_time(who):  # of one fresh process: the median after 2 warm-up steps; keeps its peak RSS
        steps, rss[who] = run_logged([sys.executable, __file__, 'step-reference']) if who == 'reference' else run_train(
            CFG, 'cpu', 16, 32, 64, '--model=small', f'--lora_rank={STEP_RANK}', '--lr=1e-4',
            f'--batch_size={STEP_BATCH}', f'--max_iters={STEP_ITERS}', '--dtype=float32')
        return median(s['step_time'] for s in steps[2:])
    ours, ref, ratios = time_pair('ours', 'reference', 0, int(rounds), step_time)
    table(f'SCFM step, Flux hidden 512, 4+8 blocks, batch {STEP_BATCH}, 256+64 tokens, LoRA rank {STEP_RANK}, float32; '
          f'medians of {rounds} rounds of {STEP_ITERS} steps (2 warm-up); per-round ratios '
          f'{", ".join(f"{r:.2f}" for r in ratios)}', '| ours (train.py) | reference (diffusers + peft) | ratio',
          [('step time (s)', f'{ours:.3f}', f'{ref:.3f}', f'{median(ratios):.2f}'), ('peak RSS (MB, last round)',
           f'{rss["ours"]:.0f}', f'{rss["reference"]:.0f}', f'{rss["ours"] / rss["reference"]:.2f}')])

def bench_sample(steps=3, size=256):
    """Random T5 and CLIP (the same transformers models in both pipelines), our transformer and AE vs diffusers'."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    steps, size, h = int(steps), int(size), int(size) // 8
    t5 = T5EncoderModel(T5Config(d_model=CFG.context_in_dim, d_ff=1024, d_kv=32, num_heads=8, num_layers=4)).eval()
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=CFG.vec_in_dim, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=4)).eval()
    net, ae = random_model().eval(), model.AutoEncoder(model.AE_PRESETS['tiny']).eval()
    ref, vae = diffusers_twin(net, CFG), diffusers_twin(ae, ae.cfg, 'AutoencoderKL')
    tokens_t5, tokens_clip = torch.randint(0, 32128, (1, 512)), torch.randint(0, 49408, (1, 77))
    encode = lambda: (t5(tokens_t5).last_hidden_state, clip(tokens_clip).pooler_output)
    torch.set_grad_enabled(False)
    (txt, y), ids, noise = encode(), (model.make_img_ids(h, h), model.make_txt_ids(512)), torch.randn(1, 16, h, h)
    ref_transformer = lambda: model.unpack(sample.denoise(as_ours(ref), model.pack(noise), ids[0], txt, ids[1], y,
                                                          scfm.get_schedule(steps, shift=3.0), 3.5), h, h)
    ours_transformer = lambda: sample.generate(net, None, txt, y, noise, steps, 3.0)
    z = ours_transformer()
    err, t_enc = (ref_transformer() - z).norm() / z.norm(), median([seconds(encode) for _ in range(4)][1:])
    t_tr, r_tr, _ = time_pair(ours_transformer, ref_transformer)
    t_dec, r_dec, _ = time_pair(lambda: ae.decode(z), lambda: vae.decode(z / vae.config.scaling_factor
                                                                      + vae.config.shift_factor).sample)
    stages = [('text encoding (shared)', t_enc, t_enc), (f'transformer ({steps} steps)', t_tr, r_tr),
              ('AE decode', t_dec, r_dec), ('total', t_enc + t_tr + t_dec, t_enc + r_tr + r_dec)]
    table(f'{steps}-step sample, {size}x{size} px, batch 1, T5 and CLIP d 256/128 4 layers, Flux hidden 512 4+8 '
          f'blocks, tiny Flux AE; medians; latent rel. error ours vs diffusers {err:.1e}',
          'stage | ours (ms) | share of ours | diffusers (ms) | ratio ours/diffusers', [(name, f'{a * 1e3:.1f}',
          f'{100 * a / stages[-1][1]:.0f}%', f'{b * 1e3:.1f}', f'{a / b:.2f}') for name, a, b in stages])

def bench_gpu(preset='flux-dev', device='cuda', size=1024, steps=3, compile=1):
    """Latency of the transformer (eager, compiled) and the AE decode (eager, cuDNN autotuning, channels_last)."""
    cfg, h, steps = model.PRESETS[preset], int(size) // 8, int(steps)
    net = random_model(cfg, device, torch.bfloat16).eval()  # built on meta: 24 GB, not 48 + 24
    ae = model.AutoEncoder(model.AE_PRESETS['flux' if preset.startswith('flux') else 'tiny']).to(device, torch.bfloat16)
    torch.set_grad_enabled(False)
    txt, y = torch.randn(1, 512, cfg.context_in_dim, device=device), torch.randn(1, cfg.vec_in_dim, device=device)
    noise = torch.randn(1, cfg.in_channels // 4, h, h, device=device)
    timed = lambda run: f'{median([seconds(run) for _ in range(6)][1:]):.3f}'
    transformer = lambda: sample.generate(net, None, txt, y, noise, steps, 3.0)
    z = transformer().to(torch.bfloat16)
    table(f'{preset} ({sum(p.numel() for p in net.parameters()) / 1e9:.2f}B params) + AE decode, {size}x{size}, '
          f'{steps} steps, batch 1, 512 T5 tokens, bf16; medians of 5 after a warm-up', 'stage | variant | time (s)',
          [('transformer', 'eager', timed(transformer))], device)
    for variant in ('eager', 'cudnn.benchmark', 'cudnn.benchmark + channels_last'):
        torch.backends.cudnn.benchmark = variant != 'eager'
        if variant.endswith('channels_last'):
            ae, z = ae.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
        print(f'| decode | {variant} | {timed(lambda: ae.decode(z))} |', flush=True)
    if int(compile):
        net.compile_blocks()
        print(f'| transformer | blocks compiled (sample.py --compile) | {timed(transformer)} |', flush=True)
    if device.startswith('cuda'):
        print(f'\npeak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB')

def bench_gpu_train(preset='flux-dev', device='cuda', batch=16, grad_accum=1, iters=5, *train_args):
    """train.py config/flux3.py on a random bf16 model (24 GB for FLUX.1-dev) and random 512 px data."""
    steps, _ = run_train(model.PRESETS[preset], device, int(batch), 64, 512, 'config/flux3.py', f'--model={preset}',
                         f'--batch_size={batch}', f'--grad_accum={grad_accum}', f'--max_iters={iters}', *train_args,
                         echo=True)
    value = lambda key: median(s[key] for s in steps[2:])  # after 2 warm-up steps
    table(f'\ntrain.py {" ".join(["config/flux3.py", *train_args])}, random {preset} weights, LoRA rank 64, grad_ckpt, '
          f'512 px, batch {batch} (grad_accum {grad_accum}), bf16, 1 process; medians of steps 3-{iters}; MFU against '
          '989 TFLOP/s dense bf16', 'step time (s) | steps/s | images/s | MFU | peak memory (GB)',
          [(f'{value("step_time"):.2f}', f'{1 / value("step_time"):.3f}', f'{value("img_per_s"):.2f}',
            f'{100 * value("mfu"):.1f}%', f'{max(s.get("peak_mem_gb", float("nan")) for s in steps):.1f}')], device)

if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'model'
    {'model': bench_model, 'step': bench_step, 'step-reference': reference_step, 'sample': bench_sample,
     'gpu': bench_gpu, 'gpu-model': bench_gpu_model, 'gpu-train': bench_gpu_train}[what](*sys.argv[2:])
