"""
Bad input ends every script before any work, with a non-zero exit and one line naming the option, value or file
(checks.py); an out_dir belongs to one run; a resume runs no pickle; a write error names the path and leaves nothing.
The table runs the scripts in this process (train.py's checks run before its process group and model exist); the
few cases that need a real run are subprocesses of the tiny model.
"""
import importlib.util
import io
import json
import math
import os
import pickle
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from conftest import random_tiny_flux, snapshot, write_shards
import checks
import convert_weights
import model as M
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
sys.path.insert(0, os.path.join(ROOT, 'data', 'flux'))
import prepare_folder  # noqa: E402
import prepare_teacher  # noqa: E402

ENV = {**{k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                                                            'MASTER_PORT')}, 'OMP_NUM_THREADS': '1'}
RUN = ['--model=tiny', '--device=cpu', '--dtype=float32', '--batch_size=8', '--lora_rank=4', '--lr=1e-3',
       '--log_interval=1']


class Canary:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.fixture(scope='module')
def fx(tmp_path_factory):
    """Tiny valid inputs (a Flux checkpoint, an AE, shards, text-encoder folders, prompts, an image) and bad files."""
    tmp = tmp_path_factory.mktemp('inputs')
    f = {'init': str(tmp / 'init.safetensors'), 'ae': str(tmp / 'ae.safetensors'), 'canary': str(tmp / 'ran')}
    random_tiny_flux(f['init'])
    ae = M.AutoEncoder(M.AutoEncoderConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=4))  # 32 norm groups
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, f['ae'])
    f['data'] = write_shards(tmp / 'data')
    for name, content in [('random', os.urandom(1000)), ('empty', b''), ('pickle', pickle.dumps(Canary(f['canary'])))]:
        f[name] = str(tmp / f'{name}.safetensors')
        open(f[name], 'wb').write(content)
    f['truncated'] = str(tmp / 'truncated.safetensors')
    save_file({'img_in.weight': torch.zeros(64, 64)}, f['truncated'])
    os.truncate(f['truncated'], os.path.getsize(f['truncated']) - 100)
    for name in ('t5', 'clip', 'images', 'empty_dir'):
        os.makedirs(f.setdefault(name, str(tmp / name)))
    f['prompts'] = str(tmp / 'prompts.txt')
    open(f['prompts'], 'w').write('a cat\na dog\n')
    f['file'] = f['prompts']  # a file where a folder is expected
    from PIL import Image
    Image.new('RGB', (32, 32)).save(tmp / 'images' / 'a.png')
    open(tmp / 'images' / 'a.txt', 'w').write('a black square')
    # data folders with one bad shard each: random bytes, no samples, 3 channels for a 4-channel model
    f['data_random'] = write_shards(tmp / 'data_random', n=(4,))
    open(os.path.join(f['data_random'], 'train_001.safetensors'), 'wb').write(os.urandom(500))
    f['data_zero'] = write_shards(tmp / 'data_zero', n=(4, 0))
    f['data_rgb'] = write_shards(tmp / 'data_rgb', n=(20,), channels=3)
    f['tmp'] = tmp
    return f


def run_train(argv, mp):
    """train.py with these arguments, in this process -> the message it stopped with. The process group it would
    start after its checks stops it instead, with the message 'CHECKS PASSED'."""
    for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        mp.delenv(k, raising=False)  # restored afterwards, whatever train.py sets

    def passed(*a, **k):
        raise SystemExit('CHECKS PASSED')
    mp.setattr(dist, 'init_process_group', passed)
    mp.setattr(sys, 'argv', ['train.py', *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(TRAIN, run_name='__main__')
    return e.value.code


def run_script(script, argv, fx, capsys, monkeypatch):
    """A script's command line in this process -> (exit status, its message)."""
    out = str(fx['tmp'] / f'out_{abs(hash(tuple(argv)))}')
    if script == 'train':
        return 1, run_train([*RUN, f'--init_from={fx["init"]}', f'--data_dir={fx["data"]}', f'--out_dir={out}', *argv],
                            monkeypatch)
    common = ['--ae', fx['ae'], '--t5', fx['t5'], '--clip', fx['clip'], '--out', out, '--device', 'cpu', '--dtype',
              'float32']
    mains = {'sample': lambda: sample.main([*common, '--ckpt', fx['init'], '--prompt', 'cat', '--size', '32x32',
                                            *argv]),
             'teacher': lambda: prepare_teacher.main([*common, '--ckpt', fx['init'], '--prompts', fx['prompts'],
                                                      '--quiet', *argv]),
             'folder': lambda: prepare_folder.main([*common, '--images', fx['images'], '--quiet', *argv]),
             'convert': lambda: convert_weights.main(argv),
             'digits': lambda: load_digits_prepare().main(['--out_dir', out, *argv])}
    with pytest.raises(SystemExit) as e:
        sample.run_cli(mains[script])
    code = e.value.code
    return (1, code) if isinstance(code, str) else (code, capsys.readouterr().err)


def load_digits_prepare():
    spec = importlib.util.spec_from_file_location('digits_prepare', os.path.join(ROOT, 'data', 'digits', 'prepare.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
CASES = [  # (script, arguments, words the message must hold); {name} is a file of the fx fixture
    # train.py: options from a set
    ('train', ['--lr_schedule=constnat'], ['lr_schedule', 'constnat', 'cosine']),
    ('train', ['--fm_t=logit-normal'], ['fm_t', 'logit-normal']),
    ('train', ['--dtype=float16'], ['dtype', 'float16']),
    ('train', ['--master_dtype=float16'], ['master_dtype', 'float16']),
    ('train', ['--teacher=coppy'], ['teacher', 'coppy']),
    ('train', ['--near_self=fst'], ['near_self', 'fst']),
    ('train', ['--far_teacher=fast'], ['far_teacher', 'fast']),
    ('train', ['--model=huge'], ['model', 'huge', 'tiny']),
    ('train', ['--lora_init=xavier'], ['lora_init', 'xavier']),
    ('train', ['--lora_layout=qkv'], ['lora_layout', 'qkv']),
    ('train', ['--ema_init=ones'], ['ema_init', 'ones']),
    pytest.param('train', ['--device=cuda'], ['device', 'cuda'], marks=NO_GPU),
    ('train', ['--device=tpu'], ['device', 'tpu']),
    # train.py: numbers against their ranges, grids, and options that must agree
    ('train', ['--teacher_ratio=1.5'], ['teacher_ratio', '1.5', '[0, 1]']),
    ('train', ['--fm_ratio=-0.1'], ['fm_ratio', '-0.1']),
    ('train', ['--dyn_shift_prob=2.0'], ['dyn_shift_prob', '2.0']),
    ('train', ['--ema_slow=1.0'], ['ema_slow', '1.0', '[0, 1)']),
    ('train', ['--self_steps=(3,)'], ['self_steps', '(3,)', 'even']),
    ('train', ['--self_steps=(0,)'], ['self_steps', '(0,)']),
    ('train', ['--self_steps=()'], ['self_steps', '()']),
    ('train', ['--teacher_steps=31'], ['teacher_steps', '31']),
    ('train', ['--grad_accum=-1'], ['grad_accum', '-1']),
    ('train', ['--grad_accum=0'], ['grad_accum', '0']),
    ('train', ['--batch_size=0'], ['batch_size', '0']),
    ('train', ['--max_iters=0'], ['max_iters', '0']),
    ('train', ['--lr=-0.001'], ['lr', '-0.001']),
    ('train', ['--lora_alpha=-4'], ['lora_alpha', '-4']),
    ('train', ['--ckpt_interval=0'], ['ckpt_interval', '0']),
    ('train', ['--shift_range=(4.5, 2.5)'], ['shift_range', '(4.5, 2.5)']),
    ('train', ['--guidance_range=(-1.0, 7.5)'], ['guidance_range', '(-1.0, 7.5)']),
    ('train', ['--batch_size=6', '--grad_accum=4'], ['batch_size=6', 'grad_accum']),
    ('train', ['--teacher=copy', '--lora_rank=0', '--init_from='], ['init_from', 'copy']),
    ('train', ['--lora_rank=0'], ["teacher='lora_off'", 'lora_rank']),
    ('train', ['--export_only=True'], ['export_only', 'resume=True']),
    ('train', ['--master_dtype=bfloat16', '--dtype=float32'], ['master_dtype', 'dtype']),
    ('train', ['--ema_init=zero', '--lora_rank=0', '--teacher=copy'], ['ema_init', 'lora_rank']),
    ('train', ['--step_embed=True'], ['step_embed', 'lora_rank=0']),
    ('train', ['--no_such_key=1'], ['unknown config key', 'no_such_key']),
    ('train', ['--max_iters=abc'], ['max_iters', 'expects int']),
    # train.py: files
    ('train', ['--init_from={random}'], ['{random}', 'not a safetensors file']),
    ('train', ['--init_from={pickle}'], ['{pickle}', 'not a safetensors file']),
    ('train', ['--init_from={empty}'], ['{empty}', 'not a safetensors file']),
    ('train', ['--init_from={truncated}'], ['{truncated}', 'not a safetensors file']),
    ('train', ['--init_from={ae}'], ['{ae}', 'detected format bfl-ae']),
    ('train', ['--data_dir={data_random}'], ['train_001.safetensors', 'not a safetensors shard']),
    ('train', ['--data_dir={data_zero}'], ['train_001.safetensors', '(0, 4, 8, 8)', 'N > 0']),
    ('train', ['--data_dir={data_rgb}'], ['x0 has shape (20, 3, 8, 8)', 'needs (N > 0, 4, H, W)']),
    ('train', ['--data_dir={empty_dir}'], ['{empty_dir}', 'no train*.safetensors']),
    ('train', ['--out_dir={file}'], ['{file}', 'File exists']),
    ('train', ['--resume=True'], ['resume=True', 'no checkpoint']),
    # sample.py
    ('sample', ['--guidance', '-1'], ['--guidance', '-1.0', '>= 0']),
    ('sample', ['--steps', '-1'], ['--steps', '-1']),
    ('sample', ['--steps', '0'], ['--steps', '0']),
    ('sample', ['--batch', '0'], ['--batch', '0']),
    ('sample', ['--true_cfg', '0.5'], ['--true_cfg', '0.5']),
    ('sample', ['--first_t', '1.5'], ['--first_t', '1.5']),
    ('sample', ['--shift', '-3'], ['--shift', '-3']),
    ('sample', ['--max_length', '0'], ['--max_length', '0']),
    ('sample', ['--out', '{file}'], ['--out', '{file}', 'a folder, not a file']),
    pytest.param('sample', ['--device', 'cuda'], ['--device', 'cuda'], marks=NO_GPU),
    ('sample', ['--ckpt', '{random}'], ['{random}', 'not a safetensors file']),
    ('sample', ['--ckpt', '{ae}'], ['{ae}', 'detected format bfl-ae']),
    ('sample', ['--ae', '{init}'], ['{init}', 'detected format bfl']),
    ('sample', ['--lora', '{pickle}'], ['{pickle}', 'not a safetensors file']),
    ('sample', ['--t5', '{tmp}/no_t5'], ['--t5', 'no_t5', 'an existing file or folder']),
    # convert_weights.py
    ('convert', ['{random}', '{tmp}/o.safetensors'], ['{random}', 'not a safetensors file']),
    ('convert', ['{tmp}/missing.safetensors', '{tmp}/o.safetensors'], ['missing.safetensors', 'no such file']),
    ('convert', ['{init}', '{empty_dir}'], ['{empty_dir}', 'cannot write it']),
    ('convert', ['{init}', '{tmp}/no_dir/o.safetensors'], ['no_dir/o.safetensors', 'cannot write it']),
    ('convert', ['{init}', '{file}', '--to', 'diffusers'], ['{file}', 'File exists']),
    ('convert', ['--lora', '{init}', '{tmp}/o.safetensors'], ['{init}', 'not a LoRA']),
    # data/flux/prepare_teacher.py and prepare_folder.py
    ('teacher', ['--steps', '0'], ['--steps', '0']),
    ('teacher', ['--chunk', '0'], ['--chunk', '0']),
    ('teacher', ['--guidance', '-2'], ['--guidance', '-2.0']),
    ('teacher', ['--ckpt', '{truncated}'], ['{truncated}', 'not a safetensors file']),
    ('teacher', ['--out', '{file}'], ['--out', '{file}']),
    ('folder', ['--resolution', '0'], ['--resolution', '0']),
    ('folder', ['--max_ratio', '0.5'], ['--max_ratio', '0.5']),
    ('folder', ['--images', '{tmp}/no_images'], ['--images', 'no_images']),
    ('folder', ['--ae', '{empty}'], ['{empty}', 'not a safetensors file']),
    # data/digits/prepare.py
    ('digits', ['--size', '7'], ['--size', '7', 'even']),
    ('digits', ['--txt_len', '0'], ['--txt_len', '0']),
    ('digits', ['--limit', '1'], ['--limit', '1']),
    ('digits', ['--out_dir', '{file}'], ['--out_dir', '{file}']),
]


@pytest.mark.parametrize('script,argv,words', CASES)
def test_bad_input(fx, capsys, monkeypatch, script, argv, words):
    fill = lambda s: s.format(**fx)  # noqa: E731
    status, msg = run_script(script, [fill(a) for a in argv], fx, capsys, monkeypatch)
    assert status not in (0, None)
    assert all(fill(w) in msg for w in words), msg
    assert len(msg.strip().splitlines()) == 1 or script == 'digits', msg  # argparse's error adds the usage line
    assert not os.path.exists(fx['canary'])  # no pickle ran


# -----------------------------------------------------------------------------------------------------------------
# out_dir: one run at a time; a rerun without resume deletes nothing; overwrite=True starts afresh


@pytest.fixture(scope='module')
def first_run(fx):
    """A real 30-step run; while it holds its out_dir, a second run on the same out_dir (in this process)."""
    out = str(fx['tmp'] / 'run')
    args = [*RUN, f'--init_from={fx["init"]}', f'--data_dir={fx["data"]}', f'--out_dir={out}', '--max_iters=30',
            '--ckpt_interval=10']
    p = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lock, t0 = os.path.join(out, 'lock'), time.time()
    while not (os.path.exists(lock) and f'pid {p.pid} ' in open(lock).read()) and time.time() - t0 < 120:
        time.sleep(0.01)
    with pytest.MonkeyPatch.context() as mp:
        second = run_train(args, mp)
    running = p.poll() is None  # still running after the second one stopped: the lock was held throughout
    stdout, stderr = p.communicate(timeout=300)
    return dict(out=out, args=args, pid=p.pid, rc=p.returncode, stdout=stdout, stderr=stderr, second=second,
                running=running)


def test_second_run_on_an_out_dir_stops(first_run):
    r = first_run
    assert r['running'] and 'is in use by another run' in r['second'], r['second']
    assert f"pid {r['pid']} on {os.uname().nodename}" in r['second']  # the holder, named
    assert r['rc'] == 0, r['stderr'][-2000:]  # and the first run finished undisturbed
    assert sorted(os.listdir(r['out'])) == ['ckpt_0000020', 'ckpt_0000030', 'latest', 'lock', 'log.jsonl',
                                            'lora.safetensors', 'lora_ema.safetensors']
    assert open(os.path.join(r['out'], 'latest')).read() == 'ckpt_0000030'


def test_rerun_without_resume_deletes_nothing(first_run, tmp_path, monkeypatch):
    r, before = first_run, snapshot(first_run['out'])
    msg = run_train(r['args'], monkeypatch)
    assert 'holds an earlier run' in msg and 'ckpt_0000020' in msg and 'resume=True' in msg and 'overwrite=True' in msg
    assert snapshot(r['out']) == before  # not a byte or an mtime changed, the lock file's included
    # overwrite=True: the earlier run's files go before anything else happens
    out2 = str(tmp_path / 'copy')
    shutil.copytree(r['out'], out2)
    assert run_train([*r['args'], f'--out_dir={out2}', '--overwrite=True'], monkeypatch) == 'CHECKS PASSED'
    assert os.listdir(out2) == ['lock'] and f'pid {os.getpid()} ' in open(os.path.join(out2, 'lock')).read()


# -----------------------------------------------------------------------------------------------------------------
# resume: the checkpoint pointer is validated, the config compared, and no pickle runs


def test_latest_pointer_and_resumed_config(first_run, tmp_path, monkeypatch):
    out = str(tmp_path / 'run')
    shutil.copytree(first_run['out'], out)
    os.makedirs(os.path.join(out, 'ckpt_0000040.tmp'))  # a crash's partial save, and a folder without meta.json
    os.makedirs(os.path.join(out, 'ckpt_0000050'))
    for latest, found in [('ckpt_0000020', 'ckpt_0000020'), ('ckpt_0000030\n', 'ckpt_0000030'),
                          ('../run/ckpt_0000020', 'ckpt_0000030'), (os.path.join(out, 'ckpt_0000020'), 'ckpt_0000030'),
                          ('ckpt_0000050', 'ckpt_0000030'), ('ckpt_0000040.tmp', 'ckpt_0000030'), ('', 'ckpt_0000030'),
                          ('\x00\xff garbage', 'ckpt_0000030')]:
        open(os.path.join(out, 'latest'), 'w', errors='surrogateescape').write(latest)
        assert checks.latest_checkpoint(out) == os.path.join(out, found), latest
    os.remove(os.path.join(out, 'latest'))
    assert checks.latest_checkpoint(out) == os.path.join(out, 'ckpt_0000030')
    # resumed with another lr and more steps: train.py's checks pass (a change is printed, not refused) and the
    # changes are those options
    args = [*first_run['args'], f'--out_dir={out}', '--resume=True', '--lr=2e-3', '--max_iters=40']
    assert run_train(args, monkeypatch) == 'CHECKS PASSED'
    config = dict(json.load(open(os.path.join(out, 'ckpt_0000030', 'meta.json')))['config'], lr=2e-3, max_iters=40)
    assert checks.resume_checkpoint(out, dict(config, resume=True))[1] == {'lr': (1e-3, 2e-3), 'max_iters': (30, 40)}
    # what the saved tensors depend on may not change: one line, before dcp would fail on shapes
    shutil.copytree(first_run['out'], out3 := str(tmp_path / 'run3'))  # (this process holds out's lock now)
    msg = run_train([*args, f'--out_dir={out3}', '--lora_layout=split'], monkeypatch)
    assert "ckpt_0000030 was written with lora_layout='fused', not 'split'" in msg, msg


def test_overwrite_keeps_what_the_run_reads_and_pruning_keeps_other_folders(fx, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    os.makedirs(out / 'snapshots')
    init = str(out / 'snapshots' / 'model_0000000.safetensors')
    shutil.copy(fx['init'], init)
    msg = run_train([*RUN, f'--init_from={init}', f'--data_dir={fx["data"]}', f'--out_dir={out}', '--overwrite=True'],
                    monkeypatch)
    assert 'would delete snapshots, which this run reads' in msg and os.path.exists(init), msg
    os.makedirs(out / 'ckpt_0000400_keep')  # a user's copy: not a checkpoint folder
    for n in (9, 10, 100):
        os.makedirs(out / f'ckpt_{n}')
    assert checks.checkpoints(str(out)) == ['ckpt_9', 'ckpt_10', 'ckpt_100']  # by step, not by name


def test_metadata_may_not_patch_a_class(tmp_path):
    """pickle's BUILD on an admitted class would set its attributes for the whole process: refused."""
    from torch.distributed.checkpoint.metadata import Metadata
    crafted = (b'\x80\x04c' + b'torch.distributed.checkpoint.metadata\nMetadata\n' +
               b'}X\x08\x00\x00\x00__init__ctorch\nSize\nsb.')  # Metadata.__init__ = torch.Size
    path = tmp_path / '.metadata'
    path.write_bytes(crafted)
    init = Metadata.__init__
    with pytest.raises(ValueError, match='BUILD on'):
        checks.read_metadata(str(path))
    assert Metadata.__init__ is init


def fake_checkpoint(out_dir, metadata):
    ckpt = os.path.join(out_dir, 'ckpt_0000002')
    os.makedirs(ckpt)
    open(os.path.join(ckpt, '.metadata'), 'wb').write(metadata)
    open(os.path.join(ckpt, 'meta.json'), 'w').write('{"config": {}, "step": 2}')
    open(os.path.join(out_dir, 'latest'), 'w').write('ckpt_0000002')


def test_crafted_metadata_runs_nothing(fx, tmp_path, monkeypatch):
    canary = str(tmp_path / 'ran')
    crafted = pickle.dumps(Canary(canary))
    fake_checkpoint(str(tmp_path / 'out'), crafted)
    msg = run_train([*RUN, f'--init_from={fx["init"]}', f'--data_dir={fx["data"]}', f'--out_dir={tmp_path / "out"}',
                     '--resume=True'], monkeypatch)
    assert os.path.join('ckpt_0000002', '.metadata') in msg and 'not checkpoint metadata' in msg, msg
    assert 'io.open is not a checkpoint metadata type' in msg and 'out_dirs you trust' in msg
    assert not os.path.exists(canary)
    pickle.loads(crafted)  # what dcp's own reader does with it: the file appears (the test has teeth)
    assert os.path.exists(canary)


@pytest.mark.filterwarnings('ignore:torch.distributed is disabled')  # dcp without a process group: one process
def test_crafted_checkpoint_value_runs_nothing(tmp_path):
    """dcp stores values that are not tensors (the step, optimizer settings) as pickles and loads them with
    weights_only=False; a checkpoint whose metadata points such a value at a crafted pickle must not run it."""
    ckpt, canary = str(tmp_path / 'ckpt'), str(tmp_path / 'ran')
    dcp.save({'w': torch.ones(3), 'step': 7}, checkpoint_id=ckpt)
    state = {'w': torch.zeros(3), 'step': 0}
    checks.trusted_load(state, ckpt)  # our own checkpoint loads
    assert state['step'] == 7 and torch.equal(state['w'], torch.ones(3))
    md = checks.read_metadata(os.path.join(ckpt, '.metadata'))
    index = next(k for k in md.storage_data if k.fqn == 'step')
    crafted = io.BytesIO()
    torch.save(Canary(canary), crafted)
    data = os.path.join(ckpt, md.storage_data[index].relative_path)
    md.storage_data[index].offset, md.storage_data[index].length = os.path.getsize(data), len(crafted.getvalue())
    open(data, 'ab').write(crafted.getvalue())
    pickle.dump(md, open(os.path.join(ckpt, '.metadata'), 'wb'))
    with pytest.raises(BaseException, match='Unsupported global'):
        checks.trusted_load({'w': torch.zeros(3), 'step': 0}, ckpt)
    assert not os.path.exists(canary)
    dcp.load({'w': torch.zeros(3), 'step': 0}, checkpoint_id=ckpt)  # dcp's own loader runs it (the test has teeth)
    assert os.path.exists(canary)


# -----------------------------------------------------------------------------------------------------------------
# a non-finite gradient norm stops the run; write errors name the path and leave no partial files


# the second clip_grad_norm_ (step 1) reports an infinite gradient norm, as after an overflow in the backward pass
INF_GRAD_WRAPPER = '''
import runpy, sys, torch
sys.path.insert(0, {root!r})
_clip, _calls = torch.nn.utils.clip_grad_norm_, []
def clip(params, max_norm, *args, **kwargs):
    _calls.append(1)
    norm = _clip(params, max_norm, *args, **kwargs)
    return torch.full_like(norm, float('inf')) if len(_calls) == 2 else norm
torch.nn.utils.clip_grad_norm_ = clip
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name='__main__')
'''


def test_nonfinite_grad_norm_stops(fx, tmp_path):
    out, wrapper = str(tmp_path / 'out'), tmp_path / 'inf_grad.py'
    wrapper.write_text(INF_GRAD_WRAPPER.format(root=ROOT, train=TRAIN))
    r = subprocess.run([sys.executable, str(wrapper), *RUN, f'--init_from={fx["init"]}', f'--data_dir={fx["data"]}',
                        f'--out_dir={out}', '--max_iters=3', '--ckpt_interval=1'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    m = re.search(r'FloatingPointError: loss is (\S+), gradient norm inf at step 1: .* checkpoint is (\S+)\. ',
                  r.stderr)
    assert r.returncode != 0 and m and math.isfinite(float(m[1])), r.stderr[-2000:]  # the loss alone looked fine
    # stopped before the optimizer step: nothing saved at that step, the step-1 checkpoint is the last, no export
    assert m[2] == os.path.join(out, 'ckpt_0000001') and open(os.path.join(out, 'latest')).read() == 'ckpt_0000001'
    assert sorted(os.listdir(out)) == ['ckpt_0000001', 'latest', 'lock', 'log.jsonl']


def limited_file_size(limit):
    """In a child: writes past `limit` bytes per file fail with EFBIG, as on a full disk (not killed by SIGXFSZ)."""
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return set_limit


def test_write_errors_name_the_path_and_leave_nothing(fx, tmp_path):
    """A full disk (here: a file-size limit, EFBIG) while train.py writes a checkpoint, or exports (the step-0
    snapshot comes first), and while convert_weights writes a file; and, from the shell, a bad option: each ends
    with exit status 1 and one line naming the path or option, no traceback."""
    runs = {name: str(tmp_path / name) for name in ('ckpt', 'export', 'convert', 'option')}
    train = [sys.executable, TRAIN, *RUN, f'--init_from={fx["init"]}', f'--data_dir={fx["data"]}', '--max_iters=2']
    cmds = {'ckpt': [*train, f'--out_dir={runs["ckpt"]}'],
            'export': [*train, f'--out_dir={runs["export"]}', '--snapshot_interval=1'],
            'convert': [sys.executable, 'convert_weights.py', fx['init'], f'{runs["convert"]}/o.safetensors'],
            'option': [*train, f'--out_dir={runs["option"]}', '--lr_schedule=constnat']}
    os.makedirs(runs['convert'])
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=limited_file_size(20_000)) for k, c in cmds.items()}
    err = {k: p.communicate(timeout=300)[1] for k, p in procs.items()}
    for k, path in [('ckpt', os.path.join(runs['ckpt'], 'ckpt_0000002.tmp')),
                    ('export', os.path.join(runs['export'], 'snapshots', 'lora_0000000.safetensors')),
                    ('convert', os.path.join(runs['convert'], 'o.safetensors')), ('option', '--lr_schedule=')]:
        line = err[k][err[k].find('error: '):].splitlines()[0]  # (after train.py's progress bar)
        assert procs[k].returncode == 1 and path in line, err[k][-2000:]
        assert ('File too large' if k != 'option' else "'constnat': expected one of") in line
        assert 'Traceback' not in err[k]
    # nothing partial stays: no checkpoint folder, no temporary file
    assert sorted(os.listdir(runs['ckpt'])) == ['lock', 'log.jsonl']
    assert os.listdir(os.path.join(runs['export'], 'snapshots')) == [] and os.listdir(runs['convert']) == []


def test_flux3_config_passes_the_checks(fx, monkeypatch):
    """config/flux3.py (the official run's options) on the tiny model: every option is valid, and agrees."""
    argv = [os.path.join(ROOT, 'config', 'flux3.py'), '--model=tiny', '--device=cpu', f'--init_from={fx["init"]}',
            f'--data_dir={fx["data"]}', f'--out_dir={fx["tmp"] / "flux3"}']
    assert run_train(argv, monkeypatch) == 'CHECKS PASSED'
