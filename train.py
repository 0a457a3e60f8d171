"""
SCFM self-distillation (and plain flow matching) for Flux-architecture DiTs: one loop, top to bottom.

    python train.py config/flux3.py                                               # 1 GPU, FLUX.1-dev, LoRA
    torchrun --standalone --nproc_per_node=8 train.py config/flux3.py            # 8 GPUs
    python train.py config/digits_scfm.py                                         # the CPU testbed
    torchrun --nnodes=2 ... train.py config/flux3.py --dp_replicate=2 --batch_size=16  # replicate across nodes

One network, several weight sets. The student is the network's trainable weights (a LoRA, or all weights). The
targets come from the same network with other weights swapped in place on the local shards (no communication, no
second model): the frozen teacher (LoRA scale 0, or a frozen copy of the initial weights), a fast EMA (0.99) and a
slow EMA (0.999). Per sample (docs/method.md, sections 2-4):
    teacher sample: 2 sub-steps on the 32-step grid, V_near = teacher,  V_far = slow EMA
    self sample:    2 sub-steps on a 2/4/8/16-step grid, V_near = fast EMA, V_far = slow EMA
    target = (d0 * V_near(x_t, t) + d1 * V_far(x_t - d0 * V_near, t - d0)) / (d0 + d1)
and the student regresses its velocity at (x_t, t) onto the target with a plain MSE.

Every random number of a step is drawn for the *global* batch from a generator seeded by (seed, step), and each rank
takes its slice. So a run is identical on any number of processes, and resume needs nothing but the step.
"""
import dataclasses
import json
import math
import os
import shutil
import socket
import time
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import checks
import convert_weights
import scfm
from data.shards import batch_indices, bucket_schedule, open_buckets, read_samples
from model import (LORA_ALL, PRESETS, Flux, LoRALinear, apply_lora, lora_state_dict, make_img_ids, make_txt_ids, pack,
                   set_lora_scale, unpack)

# our outputs are never modified in place, so FSDP2's warning about returning a view does not apply
warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view')

# -----------------------------------------------------------------------------------------------------------------
# config: plain globals, overridden by config/*.py files and --key=value (see configurator.py)
# I/O
out_dir = 'out'
init_from = ''               # a Flux checkpoint (ours/BFL file or diffusers folder); '' = random init
resume = False               # continue from the latest checkpoint in out_dir (only from out_dirs you trust)
overwrite = False            # without resume: delete an earlier run's files in out_dir (else it refuses to start)
export_only = False          # with resume: just export the latest checkpoint's weights and exit
ckpt_interval = 200          # steps between checkpoints (also one at the end)
keep_ckpts = 2               # older checkpoints are deleted
snapshot_interval = 0        # > 0: also export the student every N steps to snapshots/ (quality-vs-step curves)
log_interval = 10
wandb_log, wandb_project, wandb_run_name = False, 'scfm', 'run'
# data: shards written by data/<name>/prepare*.py (format: data/shards.py, README)
data_dir = 'data/digits'
# model
model = 'digits'             # preset name in model.PRESETS
step_embed = False           # a shortcut model: the preset plus a step-size input (scfm.step_sizes)
lora_rank = 0                # 0: train all weights; > 0: frozen base + LoRA of this rank
lora_alpha = None            # None: alpha = rank
lora_targets = LORA_ALL      # regex over BFL module names
lora_layout = 'fused'        # 'fused': one adapter per BFL weight | 'split': one per q/k/v/MLP part (as diffusers)
lora_init = 'kaiming'        # A's init: 'kaiming' (PEFT's default) | 'gaussian' (std 1/rank, the official script)
grad_ckpt = False            # per-block activation checkpointing
compile = False              # torch.compile each block
# SCFM (defaults = the official code, docs/method.md section 5)
teacher = 'lora_off'         # 'lora_off': the base (LoRA scale 0) | 'copy': frozen copy of the initial weights | 'none'
teacher_ratio = 0.4          # share of samples anchored on the teacher
fm_ratio = 0.0               # share of plain flow-matching samples on data (pretraining); drawn first
fm_t = 'logit_normal'        # t for flow-matching samples: 'logit_normal' | 'uniform'
fm_warmup = 0                # the first N steps are all flow matching (pretraining: EMA targets need a model first)
teacher_steps = 32           # teacher windows: 2 sub-steps of this grid
self_steps = (2, 4, 8, 16)   # self windows: 2 sub-steps of one of these grids
shift_range = (2.5, 4.5)     # per-sample timestep shift s ~ U[a, b)
dyn_shift_prob = 0.0         # chance of the resolution-dependent shift instead (official Flux code: 0.1)
guidance_range = (0.0, 7.5)  # per-sample embedded guidance for guidance-distilled models
ema_fast, ema_slow = 0.99, 0.999  # EMA decays
ema_reset_every = 0          # > 0: reset both EMAs to the student every N steps (paper: cyclic restarts)
ema_init = 'student'         # both EMAs start as 'student' (a copy) | 'zero' (the official script)
near_self = 'fast'           # V_near for self samples: 'fast' (dual EMA) | 'slow' (one EMA: vanilla)
far_teacher = 'slow'         # V_far for teacher samples: 'slow' (official) | 'teacher' (paper's vanilla Eq. 13)
# optimizer
batch_size = 16              # global batch per optimizer step
grad_accum = 1
max_iters = 1000
lr = 2e-5
lr_schedule = 'constant'     # 'constant' | 'cosine'
warmup_iters, min_lr = 0, 0.0
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0              # 0 = off
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'           # bf16 compute, fp32 master weights (frozen ones bf16), fp32 grad reduction; or 'float32'
master_dtype = 'float32'     # trainable weights, AdamW state, EMAs; 'bfloat16' (with dtype bf16): the official numerics
dp_replicate = 1             # > 1: hybrid sharding over a (replicate, shard) mesh
peak_flops = 989e12          # for MFU; H100/H200 dense bf16
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith('_') and
               isinstance(v, (int, float, bool, str, tuple, type(None)))]
# then checks before any work, each failure one line: options (checks.TRAIN), files, out_dir's lock, resume's checkpoint
with checks.one_line_errors():
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}
    master, world = int(os.environ.get('RANK', 0)) == 0, int(os.environ.get('WORLD_SIZE', 1))
    checks.check_options(config, {**checks.TRAIN, 'model': tuple(PRESETS)})
    for bad, msg in [(teacher == 'lora_off' and not lora_rank and teacher_ratio > 0, "teacher='lora_off' needs a LoRA "
                      "(lora_rank > 0); all weights: teacher='copy'"),
                     (teacher == 'none' and teacher_ratio > 0, "teacher='none' needs teacher_ratio=0"),
                     (teacher != 'none' and not init_from, f"teacher={teacher!r} needs init_from (a pretrained model)"),
                     (master_dtype == 'bfloat16' and dtype != 'bfloat16', "master_dtype='bfloat16' needs dtype too"),
                     (ema_init == 'zero' and not lora_rank, "ema_init='zero' is for LoRA deltas (lora_rank > 0)"),
                     (world % dp_replicate, f'dp_replicate={dp_replicate} must divide the process count {world}'),
                     (batch_size % (grad_accum * world), f'batch_size={batch_size} must be a multiple of '
                      f'grad_accum*world = {grad_accum * world}'),
                     (step_embed and lora_rank, 'step_embed=True trains a new input: all weights (lora_rank=0)'),
                     (export_only and not resume, 'export_only=True exports the latest checkpoint: set resume=True')]:
        if bad:
            raise ValueError(msg)
    cfg = dataclasses.replace(PRESETS[model], step_embed=step_embed)
    init_tensors = convert_weights.read_flux(init_from)[1] if init_from else None  # the headers now, tensors later
    buckets = open_buckets(data_dir, cfg)  # data/shards.py: the shard format, its checks and the batch order
    sizes = [sum(n for _, n in b) for b in buckets]
    shapes = [(*b[0][0].get_slice('x0').get_shape()[1:], b[0][0].get_slice('txt').get_shape()[1]) for b in buckets]
    lock = checks.claim_out_dir(out_dir, resume, overwrite, master, (init_from, data_dir))  # held until the end
    fixed = ('model', 'step_embed', 'lora_rank', 'lora_targets', 'lora_layout', 'teacher', 'master_dtype')
    ckpt, changed = checks.resume_checkpoint(out_dir, config, fixed) if resume else (None, {})
# -----------------------------------------------------------------------------------------------------------------

# distributed: plain `python train.py` is a one-process torchrun, so there is a single code path
if 'RANK' not in os.environ:
    with socket.socket() as s:  # a free port, so several single-process runs can coexist
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cuda':
    device = f'cuda:{local_rank}'
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    # cuDNN's attention backward fails on H200s with torch 2.11 / CUDA 13 (pytorch#190321): train with flash attention
    torch.backends.cuda.enable_cudnn_sdp(False)
dist.init_process_group(backend='cuda:nccl,cpu:gloo' if device_type == 'cuda' else 'gloo')
print0 = (lambda *args, **kw: print(*args, **kw, flush=True)) if master else (lambda *args, **kw: None)
mesh = (init_device_mesh(device_type, (dp_replicate, world // dp_replicate), mesh_dim_names=('replicate', 'shard'))
        if dp_replicate > 1 else init_device_mesh(device_type, (world,)))
micro = batch_size // (grad_accum * world)  # samples per rank per micro-step

# -----------------------------------------------------------------------------------------------------------------
# model: meta-device construction -> fully_shard per block, then the root -> storage -> weights, shard by shard

with torch.device('meta'):
    net = Flux(cfg)
    if lora_rank:
        apply_lora(net, lora_rank, lora_alpha, lora_targets, layout=lora_layout, init=lora_init)
for name, p in net.named_parameters():
    p.requires_grad_(not lora_rank or '.lora_' in name)
net.gradient_checkpointing = grad_ckpt
if compile:
    net.compile_blocks()
mixed = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == 'bfloat16' else {}
# The root casts the inputs to bf16, the blocks nothing (RoPE stays fp32; a checkpointed block recomputes with its
# forward's dtypes). Frozen weights (a LoRA's base) live in the compute dtype (no optimizer needs an fp32 master) and,
# on one process, outside FSDP (sharding over one rank only copies them); trainable ones in master_dtype (fp32, or bf16
# as the official script keeps its LoRA, AdamW state and EMAs). Every forward reshards, the root's too: the target
# passes swap weights into the *sharded* parameters, so no unsharded copy may outlive a forward.
ignored = {p for p in net.parameters() if not p.requires_grad} if world == 1 else None
for p in net.parameters():
    p.data = p.data.to(getattr(torch, master_dtype) if p.requires_grad else mixed.get('param_dtype', torch.float32))
for block in [*net.double_blocks, *net.single_blocks]:
    fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(**mixed, cast_forward_inputs=False),
                reshard_after_forward=True, ignored_params=ignored)
fully_shard(net, mesh=mesh, mp_policy=MixedPrecisionPolicy(**mixed), reshard_after_forward=True, ignored_params=ignored)
net.to_empty(device=device)
params = dict(net.named_parameters())
trainable = {n: p for n, p in params.items() if p.requires_grad}

def initial_weights():
    """Yields (name, full CPU tensor) one at a time: the base weights streamed from init_from, the rest (a model
    from scratch, the LoRA factors) from a seeded CPU init that is identical on every rank."""
    base = [n for n in params if '.lora_' not in n]
    if init_from:
        for n, t in init_tensors:
            if n not in params or t.shape != params[n].shape:
                raise ValueError(f'{init_from}: {n} {tuple(t.shape)} does not fit model {model!r} '
                                 f'({tuple(params[n].shape) if n in params else "no such parameter"})')
            base.remove(n)
            yield n, t
        if missing := [n for n in base if not n.startswith('step_in.')]:
            raise KeyError(f'{init_from}: does not fit model {model!r}: missing {missing[:5]}')
    torch.manual_seed(seed)
    with torch.device('meta' if init_from else 'cpu'):  # with init_from only the LoRA factors need values
        ref = Flux(cfg)
        if lora_rank:
            apply_lora(ref, lora_rank, lora_alpha, lora_targets, layout=lora_layout, init=lora_init)
    if init_from and base:  # and a new step-size input, whose zero output leaves the model init_from's flow
        ref.step_in.to_empty(device='cpu')
    if not init_from or base:
        ref.init_weights()  # a no-op on the parts left on the meta device
    for m in ref.modules() if init_from else []:
        if isinstance(m, LoRALinear):
            m.lora_A, m.lora_B = (torch.nn.Parameter(torch.empty(p.shape)) for p in (m.lora_A, m.lora_B))
            m.reset_lora()
    yield from ((n, p.detach()) for n, p in ref.named_parameters() if n in base or '.lora_' in n)

with torch.no_grad():
    for n, full in initial_weights():
        p, full = params[n], full.to(device, params[n].dtype)
        # each rank slices its own shard out of the full tensor: no broadcast, one tensor at a time; a parameter
        # FSDP ignores (frozen, one process) takes the full tensor
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor)
                else full)
print0(f'model {model}: {sum(p.numel() for p in params.values()) / 1e6:.2f}M params, '
       f'{sum(p.numel() for p in trainable.values()) / 1e6:.3f}M trainable, '
       f'frozen in {next((str(p.dtype)[6:] for p in params.values() if not p.requires_grad), "-")}, {world} '
       f'process(es) on {device_type}, {dtype}')

# weight sets as local shards: no communication to update, swap or reset them
def local(tensors):
    return [t.to_local() if hasattr(t, 'to_local') else t for t in tensors]

student_w = local(trainable.values())
ema_fast_w = [p.detach().clone() for p in trainable.values()]  # DTensors, so checkpoints reshard them
ema_slow_w = [p.detach().clone() for p in trainable.values()]
teacher_w = [p.detach().clone() for p in trainable.values()] if teacher == 'copy' else None
stash = [t.clone() for t in student_w]

@contextmanager
def weights(which):
    """Run the network with weight set `which` swapped into the trainable parameters; restored even on error."""
    if which == 'student':
        yield
    elif which == 'teacher' and teacher == 'lora_off':
        set_lora_scale(net, 0.0)  # the base model, bit for bit
        try:
            yield
        finally:
            set_lora_scale(net, 1.0)
    else:
        torch._foreach_copy_(stash, student_w)
        torch._foreach_copy_(student_w, local({'fast': ema_fast_w, 'slow': ema_slow_w, 'teacher': teacher_w}[which]))
        try:
            yield
        finally:
            torch._foreach_copy_(student_w, stash)

@torch.no_grad()
def update_ema(reset=False):
    """ema <- decay * ema + (1 - decay) * student, or with reset=True ema <- student (both EMAs). fp32 rounds once
    (lerp); bf16 twice, as the official script's mul_ then add_ (the decay step alone then rounds back to ema)."""
    for ema, decay in ((ema_fast_w, ema_fast), (ema_slow_w, ema_slow)):
        if reset or master_dtype == 'float32':
            torch._foreach_lerp_(local(ema), student_w, 1.0 if reset else 1 - decay)
        else:  # per tensor: on the CPU, _foreach_mul_ would round the decay itself to bf16
            for e, w in zip(local(ema), student_w):
                e.mul_(decay).add_(w, alpha=1 - decay)

optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                              foreach=True)

def get_lr(it):
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if lr_schedule == 'constant':
        return lr
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)

# -----------------------------------------------------------------------------------------------------------------
# checkpoints: torch.distributed.checkpoint (every rank writes its shards; loads onto any number of processes),
# written to a temporary folder and renamed, so a crash mid-save leaves the previous checkpoint as `latest`

def train_state():
    names = list(trainable)
    return {'student': dict(trainable), 'ema_fast': dict(zip(names, ema_fast_w)),
            'ema_slow': dict(zip(names, ema_slow_w)), 'optim': get_optimizer_state_dict(net, optimizer), 'step': 0,
            **({'teacher': dict(zip(names, teacher_w))} if teacher_w else {})}

def save_checkpoint(step):
    name = f'ckpt_{step:07d}'
    tmp, final = os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name)
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    state = train_state()
    state['step'] = step
    try:
        dcp.save(state, checkpoint_id=tmp)
        dist.barrier()
        if master:
            with open(os.path.join(tmp, 'meta.json'), 'w') as f:
                json.dump({'config': config, 'step': step, 'model': dataclasses.asdict(cfg)}, f)
    except (Exception, dcp.CheckpointException) as e:  # a full disk, no permission: the partial folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        cause = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
        raise SystemExit(f'error: cannot write checkpoint {tmp} (removed): {cause!r}') from None
    if master:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, 'latest.tmp'), 'w') as f:
            f.write(name)
        os.replace(os.path.join(out_dir, 'latest.tmp'), os.path.join(out_dir, 'latest'))
        # prune older checkpoints, never the one just written (a stale newer one may exist after a crash)
        old = [d for d in checks.checkpoints(out_dir) if d != name]
        for d in old[:max(0, len(old) - (keep_ckpts - 1))] if keep_ckpts > 0 else []:
            shutil.rmtree(os.path.join(out_dir, d))
    dist.barrier()

def load_checkpoint(path):
    state = train_state()
    checks.trusted_load(state, path)  # dcp.load in place into our (sharded) tensors, resharding to the world size
    set_optimizer_state_dict(net, optimizer, state['optim'])
    return state['step']

@torch.no_grad()
def export(step, snapshot=False):
    """Full (unsharded) weights for sample.py, the evaluations and convert_weights.py: the student and its slow EMA
    as <kind>.safetensors and <kind>_ema.safetensors (kind: lora or model), or with snapshot=True the student alone
    as snapshots/<kind>_<step>.safetensors. A LoRA is written by model.lora_state_dict (BFL names + alpha)."""
    kind = 'lora' if lora_rank else 'model'
    # max_length: the data's text tokens (T5 length of data preparation), sample.py's default for this file
    meta = {'format': 'flux-bfl', 'config': json.dumps(dataclasses.asdict(cfg)), 'step': str(step),
            'max_length': str(shapes[0][3])}
    for suffix, which in [('', 'student')] + ([] if snapshot else [('_ema', 'slow')]):
        with weights(which):
            sd = lora_state_dict(net) if lora_rank else trainable
            # full_tensor is collective (every rank calls it); copy before the student is swapped back in
            full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().to('cpu', copy=True).contiguous()
                    for k, v in sd.items()}
        if master:
            path = os.path.join(out_dir, 'snapshots', f'{kind}_{step:07d}.safetensors') if snapshot else \
                os.path.join(out_dir, f'{kind}{suffix}.safetensors')
            with checks.one_line_errors():  # a full disk: the error names the file, its temporary is removed
                os.makedirs(os.path.dirname(path), exist_ok=True)
                convert_weights.write_dict(path, full, meta)
            if not snapshot:
                print0(f'exported {path}')
    dist.barrier()

start_step = 0
if resume:
    start_step = load_checkpoint(ckpt)
    print0(f'resumed from {ckpt} at step {start_step}' + (f', with {changed} (then, now)' if changed else ''))
elif ema_init == 'zero':  # as the official script starts them: the EMA model's LoRA delta B @ A grows from 0
    torch._foreach_zero_(local(ema_fast_w + ema_slow_w))
else:
    update_ema(reset=True)  # both EMAs start at the student
if export_only:
    export(start_step)
    dist.destroy_process_group()
    raise SystemExit(0)

for n, (C, H, W, Lt) in zip(sizes, shapes):
    print0(f'data: {n} samples of {C}x{H}x{W} ({(H // 2) * (W // 2)} tokens) + {Lt} text tokens')
position_ids = {(H, W, Lt): (make_img_ids(H, W, device=device), make_txt_ids(Lt, device=device))
                for _, H, W, Lt in shapes}
bucket_of, pos_of = bucket_schedule(sizes, max_iters, seed)  # a whole batch comes from one bucket

# -----------------------------------------------------------------------------------------------------------------
# the SCFM step

def velocity(which, x, t, txt, y, guidance, step=None):
    """The network's velocity under weight set `which` on latents x (B, C, H, W) at times t (and step), in fp32."""
    img_ids, txt_ids = position_ids[(*x.shape[-2:], txt.shape[1])]
    with weights(which):
        v = net(pack(x), img_ids, txt, txt_ids, t, y, guidance if cfg.guidance_embed else None, step)
    return unpack(v.float(), *x.shape[-2:])

if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

near, far = {scfm.TEACHER: 'teacher', scfm.SELF: near_self}, {scfm.TEACHER: far_teacher, scfm.SELF: 'slow'}
step, t_last = start_step, time.time()
if snapshot_interval and step == 0:
    export(0, snapshot=True)  # the initial student: where a quality-vs-step curve starts
bar = tqdm(total=max_iters, initial=start_step, desc='train', disable=not master, dynamic_ncols=True)
while step < max_iters:
    for group in optimizer.param_groups:
        group['lr'] = get_lr(step)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # this step's randomness, for the global batch
    b = int(bucket_of[step])
    C, H, W, Lt = shapes[b]
    img_tokens = (H // 2) * (W // 2)
    idx_global = batch_indices(sizes[b], int(pos_of[step]), batch_size, seed + 100_003 * b)
    eps_global = torch.randn(batch_size, C, H, W, generator=gen)
    plan = scfm.plan(gen, batch_size, img_tokens, fm_ratio=fm_ratio if step >= fm_warmup else 1.0,
                     teacher_ratio=teacher_ratio, teacher_steps=teacher_steps, self_steps=self_steps,
                     shift_range=shift_range, dyn_shift_prob=dyn_shift_prob, fm_t=fm_t, guidance_range=guidance_range)
    loss_by_role = torch.zeros(len(scfm.ROLES), device=device, dtype=torch.float64)  # summed over the global batch
    count_by_role = torch.zeros(len(scfm.ROLES), device=device, dtype=torch.float64)
    for k in range(grad_accum):
        # global sample j belongs to micro-step j // (world*micro) and rank (j // micro) % world
        mb = torch.arange(batch_size)[(k * world + rank) * micro:(k * world + rank + 1) * micro]
        x0, txt, y = (v.to(device) for v in read_samples(buckets[b], idx_global[mb]))
        eps = eps_global[mb].to(device)
        role, t, d0, d1, g = (plan[n][mb].to(device) for n in ('role', 't', 'd0', 'd1', 'guidance'))
        global_roles = plan['role'].view(grad_accum, world * micro)[k]
        active = [bool((global_roles == r).any()) for r in range(len(scfm.ROLES))]  # the same on every rank
        steps = scfm.step_sizes(role, d0, d1, 1 / max(self_steps)) if step_embed else ()  # fm: the finest grid's
        x_t, target = scfm.target(velocity, x0, eps, role, t, d0, d1, near, far, cond=(txt, y, g), active=active,
                                  steps=steps)
        net.set_requires_gradient_sync(k == grad_accum - 1)  # reduce-scatter gradients only once per step
        per_sample = ((velocity('student', x_t, t, txt, y, g, *steps[2:]) - target) ** 2).mean((1, 2, 3))
        (per_sample.mean() / grad_accum).backward()
        loss_by_role.index_add_(0, role, per_sample.detach().double())
        count_by_role += torch.bincount(role, minlength=len(scfm.ROLES))
    dist.all_reduce(loss_by_role)
    dist.all_reduce(count_by_role)
    loss = (loss_by_role.sum() / batch_size).item()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), grad_clip if grad_clip > 0 else float('inf'))
    grad_norm = grad_norm.full_tensor().item() if isinstance(grad_norm, DTensor) else grad_norm.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # before the step: the weights stay finite
        raise FloatingPointError(f'loss is {loss}, gradient norm {grad_norm} at step {step}: stopping; nothing was '
                                 f'saved at this step, the last good checkpoint is '
                                 f'{checks.latest_checkpoint(out_dir) or "(none yet)"}. Lower lr or check the data.')
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema()
    step += 1
    if ema_reset_every and step % ema_reset_every == 0:
        update_ema(reset=True)
    bar.update(1)
    if step % log_interval == 0 or step == max_iters:
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt, t_last = (time.time() - t_last) / log_interval, time.time()
        # model FLOPs utilisation: the student's fwd+bwd (3 forwards) per sample + two target forwards per window
        windows = (count_by_role[scfm.TEACHER] + count_by_role[scfm.SELF]).item()
        mfu = (3 * batch_size + 2 * windows) * net.estimate_flops(img_tokens, Lt) / dt / peak_flops
        log = dict(loss=loss, **{f'loss_{name}': (loss_by_role[r] / count_by_role[r]).item()
                                 for r, name in enumerate(scfm.ROLES) if count_by_role[r] > 0},
                   grad_norm=grad_norm, lr=get_lr(step - 1), tokens=img_tokens, step_time=dt, img_per_s=batch_size / dt,
                   mfu=mfu)
        if device_type == 'cuda':
            log['peak_mem_gb'] = torch.cuda.max_memory_allocated() / 1e9
        bar.set_postfix(loss=f'{loss:.4f}', gn=f'{grad_norm:.3f}')
        print0(f'step {step}: ' + ' '.join(f'{k} {v:.4g}' for k, v in log.items()))
        if wandb_log and master:
            wandb.log(log, step=step)
        if master:  # the full-precision numbers, one JSON line per logged step (after a resume: the last one counts)
            with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(dict(step=step, **log)) + '\n')
    if step % ckpt_interval == 0 or step == max_iters:
        save_checkpoint(step)
    if snapshot_interval and step % snapshot_interval == 0:
        export(step, snapshot=True)
bar.close()
export(step)
dist.destroy_process_group()
