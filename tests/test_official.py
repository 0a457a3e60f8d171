"""
train.py in the official configuration, step for step against a reference written the way the official SCFM script
(trainer/flux_scfm.py of the SCFM release) trains: diffusers' FluxTransformer2DModel with peft LoRA adapters
(init_lora_weights='gaussian') on its script's LORA_LAYERS (every linear); the student's forward first, then the
target passes with the LoRA weights swapped in place (teacher: zeros; self samples: the fast EMA; the second sub-step:
the slow EMA); the per-sample MSE; clip_grad_norm_(10); AdamW(weight_decay=1e-4); `ema.mul_(decay).add_(lora,
alpha=1 - decay)` on EMAs that start at zeros. Shared with train.py: the base weights (converted by convert_weights),
the initial LoRA (train.py's step-0 snapshot), the data order (data.shards.batch_indices) and the random draws
(scfm.plan on the same seeded generator). The reference computes the targets, the loss, the gradients, the clipping,
the step and the EMAs itself.
"""
import dataclasses
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import convert_weights
import model as M
import scfm
from data.shards import batch_indices

pytest.importorskip('diffusers')
pytest.importorskip('peft')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = M.PRESETS['tiny']
R, LR, STEPS, BATCH, SEED = 4, 1e-3, 3, 8, 1337
N, SIDE, LT = 16, 8, 5  # samples in the shard, latent side, text tokens
TEACHER_RATIO, DYN_SHIFT, CLIP, WD = 0.4, 0.1, 10.0, 1e-4
# the official script's peft target_modules (its LORA_LAYERS: every linear layer of diffusers' Flux); train.py's
# split layout on every linear (model.LORA_ALL, the default lora_targets) must give exactly these adapters
LORA_LAYERS = [
    'time_text_embed.timestep_embedder.linear_1', 'time_text_embed.timestep_embedder.linear_2',
    'time_text_embed.text_embedder.linear_1', 'time_text_embed.text_embedder.linear_2',
    'time_text_embed.guidance_embedder.linear_1', 'time_text_embed.guidance_embedder.linear_2', 'context_embedder',
    'x_embedder', 'norm.linear', 'norm1.linear', 'norm1_context.linear', 'norm_out.linear', 'attn.to_k', 'attn.to_q',
    'attn.to_v', 'attn.to_out.0', 'attn.add_k_proj', 'attn.add_q_proj', 'attn.add_v_proj', 'attn.to_add_out',
    'ff.net.0.proj', 'ff.net.2', 'ff_context.net.0.proj', 'ff_context.net.2', 'proj_mlp', 'proj_out']
TRAIN = ['--model=tiny', '--device=cpu', f'--batch_size={BATCH}', f'--max_iters={STEPS}', '--log_interval=1',
         '--ckpt_interval=100', '--snapshot_interval=100', f'--lr={LR}', f'--seed={SEED}', f'--lora_rank={R}',
         f'--lora_alpha={R}', '--lora_layout=split', '--lora_init=gaussian', '--ema_init=zero', f'--grad_clip={CLIP}',
         f'--weight_decay={WD}', '--teacher=lora_off', f'--teacher_ratio={TEACHER_RATIO}',
         f'--dyn_shift_prob={DYN_SHIFT}']
RUNS = {'fp32': ['--dtype=float32'],
        'bf16': ['--dtype=bfloat16', '--master_dtype=bfloat16', '--ckpt_interval=1', f'--keep_ckpts={STEPS}']}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A random tiny base model and one shard of random data; the train.py runs start at once, in the background."""
    tmp = tmp_path_factory.mktemp('official')
    torch.manual_seed(0)
    net = M.Flux(CFG)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    init = str(tmp / 'init.safetensors')
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, init,
              metadata={'config': json.dumps(dataclasses.asdict(CFG))})
    g = torch.Generator().manual_seed(1)
    data = {'x0': torch.randn(N, CFG.in_channels // 4, SIDE, SIDE, generator=g),
            'txt': torch.randn(N, LT, CFG.context_in_dim, generator=g),
            'y': torch.randn(N, CFG.vec_in_dim, generator=g)}
    os.makedirs(tmp / 'data')
    save_file(data, str(tmp / 'data' / 'train_000.safetensors'))
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                                                            'MASTER_PORT')}
    procs = {}
    for name, extra in RUNS.items():
        cmd = [sys.executable, 'train.py', *TRAIN, *extra,
               f'--init_from={init}', f'--data_dir={tmp / "data"}', f'--out_dir={tmp / name}']
        with open(tmp / f'{name}.out', 'w') as out, open(tmp / f'{name}.err', 'w') as err:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env={**env, 'OMP_NUM_THREADS': '1'}, stdout=out, stderr=err)
    yield dict(tmp=tmp, init=init, data=data, procs=procs)
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def as_peft(sd, path):
    """Our LoRA tensors (BFL module names, with or without '.weight') -> peft's parameter names on diffusers' linears,
    written and converted as a file by convert_weights (alpha = rank: no scale folded into B, an exact copy)."""
    sd = {k if k.endswith(('.weight', '.alpha')) else f'{k}.weight': v for k, v in sd.items()}
    sd.update({k.replace('.lora_A.weight', '.alpha'): torch.tensor(float(R)) for k in list(sd) if '.lora_A.' in k})
    save_file({k: v.contiguous() for k, v in sd.items()}, f'{path}.ours.safetensors')
    convert_weights.convert_lora(f'{path}.ours.safetensors', f'{path}.peft.safetensors', to='diffusers')
    return {k.removeprefix('transformer.').replace('.weight', '.default.weight'): v
            for k, v in load_file(f'{path}.peft.safetensors').items()}


def checkpoint(runs, name, step):
    path = runs['tmp'] / f'{name}_{step}.pt'
    dcp_to_torch_save(str(runs['tmp'] / name / f'ckpt_{step:07d}'), str(path))
    return torch.load(path)


def train_result(runs, name):
    """A finished train.py run: its logged losses and grad norms, and its LoRA weights in peft's names."""
    proc, tmp = runs['procs'][name], runs['tmp']
    assert proc.wait(timeout=300) == 0, (tmp / f'{name}.err').read_text()[-3000:]
    out = tmp / name
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in log] == list(range(1, STEPS + 1))
    sd = {'init': load_file(str(out / 'snapshots' / 'lora_0000000.safetensors')),
          'student': load_file(str(out / 'lora.safetensors')), 'slow': load_file(str(out / 'lora_ema.safetensors')),
          'fast': checkpoint(runs, name, STEPS)['ema_fast']}
    return dict(loss=[r['loss'] for r in log], grad_norm=[r['grad_norm'] for r in log],
                **{k: as_peft(v, str(tmp / f'{name}_{k}')) for k, v in sd.items()})


def pack(x):  # (B, C, H, W) -> (B, H/2 * W/2, C * 4), as the official script's pack_latents
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)


def unpack(x, H, W):
    B, L, D = x.shape
    return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


@contextmanager
def swapped(lora, weights):
    """The official script's weight sets: copied into the LoRA parameters in place, the student's copied back after."""
    saved = {n: p.data.clone() for n, p in lora.items()}
    for n, p in lora.items():
        p.data.copy_(weights[n])
    try:
        yield
    finally:
        for n, p in lora.items():
            p.data.copy_(saved[n])


def te(v):  # per-sample scalars against packed (B, L, D) latents
    return v.view(-1, 1, 1)


def reference(runs, targets, dtype, init):
    """STEPS optimizer steps the official way, from the LoRA `init` (peft names) -> as train_result."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    folder = str(runs['tmp'] / 'diffusers')
    if not os.path.isdir(folder):
        convert_weights.convert(runs['init'], folder, to='diffusers')
    net = FluxTransformer2DModel.from_pretrained(folder).requires_grad_(False)
    net.to(dtype)  # as the official script: the transformer in the compute dtype, then the adapters added
    net.add_adapter(LoraConfig(r=R, lora_alpha=R, init_lora_weights='gaussian', target_modules=targets))
    lora = {n: p for n, p in net.named_parameters() if 'lora_' in n}
    assert lora.keys() == init.keys()  # the split layout on our targets is exactly this module set
    assert all(p.dtype == dtype and p.requires_grad for p in lora.values())
    with torch.no_grad():  # peft's own gaussian init is ours: A's std 1/rank, B zeros
        A, A0 = (torch.cat([w[k].flatten() for k in w if '.lora_A.' in k]).float() for w in (lora, init))
        assert abs(A.std() / A0.std() - 1) < 0.1 and abs(A0.std() * R - 1) < 0.1
        assert all(not w[k].any() for w in (lora, init) for k in w if '.lora_B.' in k)
        for n, p in lora.items():
            p.copy_(init[n])
    zero, fast, slow = ({n: torch.zeros_like(p) for n, p in lora.items()} for _ in range(3))
    # foreach: what torch picks on the GPU the official run used, and train.py's (the same numbers here, bf16 too)
    opt = torch.optim.AdamW(list(lora.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, foreach=True)
    h = w = SIDE // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(LT, 3)
    x0_all, txt_all, y_all = (runs['data'][k] for k in ('x0', 'txt', 'y'))
    out = dict(loss=[], grad_norm=[])
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(SEED * 1_000_003 + step)  # train.py's draws: noise, then the plan
        idx = batch_indices(N, step, BATCH, SEED)
        eps = torch.randn(BATCH, *x0_all.shape[1:], generator=gen)
        plan = scfm.plan(gen, BATCH, h * w, teacher_ratio=TEACHER_RATIO, dyn_shift_prob=DYN_SHIFT)
        role, t, d0, d1, g = (plan[k] for k in ('role', 't', 'd0', 'd1', 'guidance'))
        x0, txt, y = x0_all[idx], txt_all[idx].to(dtype), y_all[idx].to(dtype)
        x_t = pack((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps).to(dtype)

        def forward(x, t, i):
            return net(hidden_states=x, timestep=t, guidance=g[i], pooled_projections=y[i],
                       encoder_hidden_states=txt[i], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

        model_pred = forward(x_t, t, slice(None))
        with torch.no_grad():
            pred, x_mid = torch.zeros(x_t.shape), torch.zeros_like(x_t)
            for r, weights in ((scfm.TEACHER, zero), (scfm.SELF, fast)):  # first sub-step: teacher or fast EMA
                if (i := (role == r).nonzero()[:, 0]).numel():
                    with swapped(lora, weights):
                        v = te(d0[i]) * forward(x_t[i], t[i], i)
                    pred[i], x_mid[i] = v.float(), x_t[i] - v.to(dtype)
            with swapped(lora, slow):  # second sub-step: the slow EMA
                pred = pred + te(d1) * forward(x_mid, t - d0, slice(None))
            target = unpack(pred / te(d0 + d1), SIDE, SIDE)
        loss = ((unpack(model_pred, SIDE, SIDE).float() - target.float()) ** 2).reshape(BATCH, -1).mean(1).mean()
        loss.backward()
        out['grad_norm'].append(torch.nn.utils.clip_grad_norm_(list(lora.values()), CLIP).item())
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for n, p in lora.items():
                slow[n].mul_(0.999).add_(p, alpha=1 - 0.999)
                fast[n].mul_(0.99).add_(p, alpha=1 - 0.99)
        out['loss'].append(loss.item())
    return dict(out, init=init, student={n: p.detach().clone() for n, p in lora.items()}, fast=fast, slow=slow)


def errors(ours, ref):
    """Relative errors: of the logged numbers, and ||a - b|| / ||b|| over all tensors of the final LoRA, and over the
    A factors and over the B factors (the larger) of the LoRA's update from its initial value and of both EMAs (they
    start at zeros: all of them is update). A and B apart: after a few steps B (from zeros) is far smaller than A."""
    def rel(a, b, part='.lora_'):
        keys = [k for k in b if part in k]
        return (sum((a[k].double() - b[k].double()).pow(2).sum() for k in keys) /
                sum(b[k].double().pow(2).sum() for k in keys)).sqrt().item()

    def by_factor(a, b):
        return max(rel(a, b, '.lora_A.'), rel(a, b, '.lora_B.'))

    def update(r):
        return {k: r['student'][k].double() - r['init'][k].double() for k in r['init']}

    return {'loss': max(abs(a / b - 1) for a, b in zip(ours['loss'], ref['loss'])),
            'grad_norm': max(abs(a / b - 1) for a, b in zip(ours['grad_norm'], ref['grad_norm'])),
            'lora': rel(ours['student'], ref['student']), 'lora_update': by_factor(update(ours), update(ref)),
            'ema_fast': by_factor(ours['fast'], ref['fast']), 'ema_slow': by_factor(ours['slow'], ref['slow'])}


def test_official_fp32(runs):
    ours = train_result(runs, 'fp32')
    ref = reference(runs, LORA_LAYERS, torch.float32, ours['init'])
    errs = errors(ours, ref)
    print('\nfloat32, train.py vs the official way: ' + ', '.join(f'{k} {v:.1e}' for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs


def test_official_numerics_bf16(runs):
    """bf16 weights, LoRA, AdamW state and EMAs on both sides: the same algorithm in another order of bf16 roundings
    (our blocks vs diffusers', FSDP's input casts), so the two agree only to bf16 precision."""
    ours = train_result(runs, 'bf16')
    assert all(v.dtype == torch.bfloat16 for k in ('student', 'fast', 'slow') for v in ours[k].values())
    # train.py's EMAs are the official rule bit for bit: from zeros, ema.mul_(decay).add_(student, alpha=1 - decay) in
    # bf16 after every step (one rounding less, as a lerp, already differs in the last bit)
    ck = [checkpoint(runs, 'bf16', k) for k in range(1, STEPS + 1)]
    for kind, decay in (('ema_fast', 0.99), ('ema_slow', 0.999)):
        for name, last in ck[-1][kind].items():
            ema = torch.zeros_like(last)
            for c in ck:
                ema.mul_(decay).add_(c['student'][name], alpha=1 - decay)
            assert last.dtype == torch.bfloat16 and torch.equal(ema, last), (kind, name)
    ref = reference(runs, LORA_LAYERS, torch.bfloat16, ours['init'])
    errs = errors(ours, ref)
    print('\nbfloat16 official numerics, train.py vs the official way: ' +
          ', '.join(f'{k} {v:.1e}' for k, v in errs.items()))
    # measured: loss 1.3e-3, final LoRA 9.8e-4, its update 0.19 (A) / 0.06 (B), EMAs 0.07: bf16 keeps 8 significant
    # bits, so a 1e-3 step of A (|A| ~ 0.25, bf16 spacing 1e-3 to 2e-3) lands or rounds away on a last-bit difference,
    # and gradients that differ in their last bits flip the sign of Adam's steps where they are near zero
    assert errs['loss'] < 1e-2 and errs['lora'] < 1e-2 and max(errs['ema_fast'], errs['ema_slow']) < 0.25, errs
