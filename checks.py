"""The scripts' checks before any work: options against their sets and ranges, train.py's out_dir (one run owns it)
and resume (no pickle runs code). A failure names the option or file, its value and what was expected."""
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import sys
from contextlib import contextmanager

import torch

# a rule: a tuple of the choices, or (test, what a value must be)
POS, NONNEG = (lambda v: 0 < v < math.inf, '> 0'), (lambda v: 0 <= v < math.inf, '>= 0')
ONE_UP, GRID = (lambda v: v >= 1, '>= 1'), (lambda v: v >= 2 and v % 2 == 0, 'even, >= 2 (a window: 2 sub-steps)')
DEVICE = (lambda v: v == 'cpu' or re.fullmatch(r'cuda(:\d+)?', v) and torch.cuda.is_available(), 'cpu, cuda on a GPU')
TRAIN = {
    'teacher': ('lora_off', 'copy', 'none'), 'near_self': ('fast', 'slow'), 'far_teacher': ('slow', 'teacher'),
    'fm_t': ('logit_normal', 'uniform'), 'lr_schedule': ('constant', 'cosine'), 'dtype': ('bfloat16', 'float32'),
    'master_dtype': ('float32', 'bfloat16'), 'lora_init': ('kaiming', 'gaussian'), 'lora_layout': ('fused', 'split'),
    'ema_init': ('student', 'zero'), 'device': DEVICE,
    **dict.fromkeys(('teacher_ratio', 'fm_ratio', 'dyn_shift_prob'), (lambda v: 0 <= v <= 1, 'in [0, 1]')),
    **dict.fromkeys(('ema_fast', 'ema_slow', 'beta1', 'beta2'), (lambda v: 0 <= v < 1, 'in [0, 1)')),
    **dict.fromkeys(('batch_size', 'grad_accum', 'max_iters', 'ckpt_interval', 'log_interval', 'dp_replicate'), ONE_UP),
    **dict.fromkeys(('keep_ckpts', 'snapshot_interval', 'ema_reset_every', 'fm_warmup', 'warmup_iters', 'lora_rank',
                     'min_lr', 'weight_decay', 'grad_clip'), NONNEG),
    'lr': POS, 'lora_alpha': POS, 'peak_flops': POS, 'teacher_steps': GRID,
    'self_steps': (lambda v: len(v) > 0 and all(GRID[0](n) for n in v), 'a non-empty tuple, each ' + GRID[1]),
    'shift_range': (lambda v: len(v) == 2 and 0 < v[0] <= v[1], '(lo, hi) with 0 < lo <= hi'),
    'guidance_range': (lambda v: len(v) == 2 and 0 <= v[0] <= v[1], '(lo, hi) with 0 <= lo <= hi')}
CLI = {  # sample.py, eval_clip.py, data/flux/prepare_*.py: each has some of these
    **dict.fromkeys(('steps', 'batch', 'max_length', 'chunk', 'teacher_steps', 'resolution'), ONE_UP),
    **dict.fromkeys(('guidance', 'teacher_guidance', 'max_chunks', 'limit'), NONNEG),
    'first_t': (lambda v: 0 < v <= 1, 'in (0, 1]'), 'true_cfg': (lambda v: 1 <= v < math.inf, '>= 1 (1: off)'),
    'max_ratio': (lambda v: 1 <= v < math.inf, '>= 1'), 'lora_scale': (math.isfinite, 'a finite number'),
    'out': (lambda v: not os.path.isfile(v), 'a folder, not a file'), 'device': DEVICE,
    'shift': (lambda v: v == 'dynamic' or 0 < float(v) < math.inf, "a number > 0 (e.g. 3.0) or 'dynamic'"),
    **dict.fromkeys(('ckpt', 'ae', 'lora', 't5', 'clip', 'prompts', 'images', 'clip_model'),
                    (os.path.exists, 'an existing file or folder'))}

def check_options(values, rules, flag='--{}={!r}'):
    """values {option: value} against rules {option: rule}; an option values lacks or sets to None (unset) passes."""
    for k, rule in rules.items():
        test, want = rule if callable(rule[0]) else (rule.__contains__, f'one of {list(rule)}')
        try:
            ok = values.get(k) is None or test(values[k])
        except (TypeError, ValueError):  # a value of another type
            ok = False
        if not ok:
            error = FileNotFoundError if test is os.path.exists else ValueError
            raise error(f'{flag.format(k, values[k])}: expected {want}')

@contextmanager
def one_line_errors():
    """Our errors on bad input end the program with one line on stderr (exit status 1), not a traceback."""
    try:
        yield
    except (ValueError, KeyError, OSError) as e:  # KeyError's str() would add quotes
        sys.exit(f'error: {e.args[0] if isinstance(e, KeyError) and e.args else e}')

# ---- train.py's out_dir: one run at a time, no earlier run overwritten, resume unpickles only plain data
CKPT = re.compile(r'ckpt_(\d+)')  # a checkpoint folder: its step in the name

def checkpoints(out_dir):
    """The ckpt_<step> folder names of out_dir (complete or not), oldest first by step."""
    return sorted(filter(CKPT.fullmatch, os.listdir(out_dir)), key=lambda n: int(CKPT.fullmatch(n)[1]))

def claim_out_dir(out_dir, resume, overwrite, master, inputs=()):
    """Makes out_dir, locked by rank 0 (out_dir/lock names the holder); an earlier run's files refuse, or go (never
    one of `inputs`, the files the run reads)."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, 'lock'), 'a+') if master else None  # also the probe that out_dir is writable
    try:
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f'out_dir={out_dir!r} is in use by another run ({open(lock.name).read().strip()})') from None
    except OSError as e:  # a file system without locks
        raise OSError(f'{lock.name}: cannot lock the out_dir ({e.strerror})') from None
    run = re.compile(r'latest|log\.jsonl|snapshots|ckpt_\d+(\.tmp)?|(lora|model)(_ema)?\.safetensors')  # its files
    found = sorted(filter(run.fullmatch, os.listdir(out_dir)))
    if found and not resume and not overwrite:
        raise ValueError(f'out_dir={out_dir!r} holds an earlier run ({", ".join(found[:5])}): resume=True continues '
                         'it, overwrite=True deletes it and starts afresh, or use another out_dir')
    read = {os.path.realpath(f) for f in inputs if f}
    if not resume and (hit := [f for f in found if any(r.startswith(os.path.realpath(os.path.join(out_dir, f)))
                                                       for r in read)]):
        raise ValueError(f'out_dir={out_dir!r}: overwrite=True would delete {hit[0]}, which this run reads')
    for f in found if master and not resume else []:  # overwrite=True: the earlier run's files go
        (shutil.rmtree if os.path.isdir(p := os.path.join(out_dir, f)) else os.remove)(p)
    if lock:
        lock.truncate(0)
        print(f'pid {os.getpid()} on {os.uname().nodename}', file=lock, flush=True)
    return lock

def latest_checkpoint(out_dir):
    """The complete ckpt_<step> folder of out_dir that out_dir/latest names, else the newest one, else None."""
    complete = lambda n: CKPT.fullmatch(n) and os.path.isfile(os.path.join(out_dir, n, 'meta.json'))
    name = open(p, errors='replace').read().strip() if os.path.isfile(p := os.path.join(out_dir, 'latest')) else ''
    name = name if complete(name) else ([None] + list(filter(complete, checkpoints(out_dir))))[-1]
    return name and os.path.join(out_dir, name)

def resume_checkpoint(out_dir, config, fixed=()):
    """-> (the checkpoint, {option: (then, now)} of the changed options, run control aside); a crafted .metadata
    fails here, harmless; a changed option of `fixed` (what the checkpoint's tensors depend on) refuses."""
    if (ckpt := latest_checkpoint(out_dir)) is None:
        raise FileNotFoundError(f'resume=True but out_dir={out_dir!r} has no checkpoint')
    read_metadata(os.path.join(ckpt, '.metadata'))
    with open(os.path.join(ckpt, 'meta.json')) as f:
        then, now = json.load(f)['config'], json.loads(json.dumps(config))
    changed = {k: (then[k], now[k]) for k in sorted(then.keys() & now.keys() - {'resume', 'overwrite', 'export_only'})
               if then[k] != now[k]}
    if bad := sorted(changed.keys() & set(fixed)):
        raise ValueError(f'{ckpt} was written with {bad[0]}={changed[bad[0]][0]!r}, not {changed[bad[0]][1]!r}: '
                         'resume under the same setting, or start another out_dir')
    return ckpt, changed

_METADATA, _SAFE = 'torch.distributed.checkpoint.metadata', {  # the types in a .metadata: _METADATA's and these
    'torch.Size', 'torch.serialization._get_layout', 'torch.distributed.checkpoint.filesystem._StorageInfo',
    'pathlib.PosixPath', 'pathlib._local.PosixPath'}

class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be checked
    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: lambda self: self.load_build()}

    def load_build(self):  # setting attributes of a class or function would change it for the whole process
        if isinstance(self.stack[-2], type) or callable(self.stack[-2]):
            raise pickle.UnpicklingError(f'BUILD on {self.stack[-2]!r}')
        super().load_build()

    def find_class(self, module, name):  # dcp's metadata classes and what they hold; no other module is imported
        obj = getattr(__import__(module, fromlist=['_']), name, None) if module in ('torch', _METADATA) else None
        if f'{module}.{name}' in _SAFE or isinstance(obj, torch.dtype) or getattr(obj, '__module__', 0) == _METADATA:
            return obj or super().find_class(module, name)
        raise pickle.UnpicklingError(f'{module}.{name} is not a checkpoint metadata type')

def read_metadata(path):
    """A dcp .metadata file: a pickle (a plain load of a crafted one runs its code), of the metadata types only."""
    from torch.distributed.checkpoint.metadata import Metadata
    try:
        with open(path, 'rb') as f:
            md = _MetadataUnpickler(f).load()
        if type(md) is not Metadata:
            raise pickle.UnpicklingError(f'a {type(md).__name__}, not a Metadata')
        return md
    except FileNotFoundError:
        raise FileNotFoundError(f'{path}: missing; the checkpoint is incomplete') from None
    except Exception as e:
        raise ValueError(f'{path}: not checkpoint metadata ({e}); resume only from out_dirs you trust') from None

def trusted_load(state, path):
    """dcp.load that unpickles only plain data: .metadata by read_metadata, other values by weights_only first."""
    import torch.distributed.checkpoint as dcp

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, rank=None, **kwargs):  # rank: dcp's fallback, per-rank metadata
            return read_metadata(os.path.join(self.path, '.metadata' if rank is None else f'__{rank}.metadata'))

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)  # raises on anything but plain data
            value.seek(0)
            super().load_bytes(read_item, value)

    dcp.load(state, checkpoint_id=path, storage_reader=Reader(path), planner=Planner())
