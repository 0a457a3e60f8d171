"""
Few-step sampling for Flux-style flow-matching models (teacher or SCFM student).

    python sample.py --ckpt flux1-dev.safetensors --lora out/flux3/lora.safetensors --prompt "a cat" \
        --steps 3 --shift 3.0 --t5 FLUX.1-dev/text_encoder_2 --clip FLUX.1-dev/text_encoder --ae ae.safetensors

Also the sampler core of eval_clip.py, the data scripts and the testbed: the one Euler loop (denoise), generate and
the one image grid (make_grid). Time convention and schedules: scfm.py and docs/method.md.
"""
import argparse
import json
import math
import os
import time

import torch

import model
from checks import CLI, check_options, one_line_errors
from convert_weights import load_ae, load_transformer, open_files, read_ae, read_flux
from scfm import get_schedule

@torch.no_grad()
def denoise(net, x, img_ids, txt, txt_ids, y, timesteps, guidance=None, step_embed=False):
    """Euler from timesteps[0] to timesteps[-1] on packed tokens x (B, L, C); net has model.Flux's signature.
    guidance: None (a model without guidance_embed), a float, or a (B,) tensor of embedded guidance values.
    step_embed: net is a shortcut model, also given each step's size t_cur - t_next."""
    B = x.shape[0]
    full = lambda v: torch.full((B,), float(v), device=x.device, dtype=x.dtype)
    if guidance is not None and not torch.is_tensor(guidance):
        guidance = full(guidance)
    ts = [float(t) for t in timesteps]
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        step = {'step': full(t_cur - t_next)} if step_embed else {}
        v = net(x, img_ids, txt, txt_ids, full(t_cur), y, guidance=guidance, **step)
        x = x + (t_next - t_cur) * v
    return x

# ----------------------------------------------------------------------------------------------------------
# Text encoders: T5 last_hidden_state, CLIP-L pooler_output, padded to max_length, no attention mask (as BFL does)

def load_text_encoders(t5_dir, clip_dir, device='cpu', dtype=torch.float32):
    """Local folders only (nothing is downloaded): a T5EncoderModel and a CLIPTextModel, each with its tokenizer in
    the same folder or, as in a diffusers FLUX.1 snapshot, in the sibling tokenizer_2 / tokenizer folder."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel
    out = {}
    for key, path, what, sibling, enc, tok in (
            ('t5', t5_dir, 'T5 encoder', 'tokenizer_2', T5EncoderModel, AutoTokenizer),
            ('clip', clip_dir, 'CLIP text encoder', 'tokenizer', CLIPTextModel, CLIPTokenizer)):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f'{what} folder {path!r} does not exist (a local folder: nothing is downloaded)')
        sibling = os.path.join(os.path.dirname(os.path.normpath(path)), sibling)
        has_tok = any(os.path.exists(os.path.join(path, f)) for f in ('tokenizer.json', 'tokenizer_config.json',
                                                                      'spiece.model', 'vocab.json'))
        out[key] = enc.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval().requires_grad_(False)
        out[key + '_tok'] = tok.from_pretrained(sibling if os.path.isdir(sibling) and not has_tok else path,
                                                local_files_only=True)
    return out

@torch.no_grad()
def encode_prompts(prompts, enc, max_length=512):
    """list of str -> txt (B, max_length, d_T5), y (B, d_CLIP), fp32. max_length: 512 for FLUX.1-dev, 256 for
    schnell; CLIP always uses its 77 tokens."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    ids = enc['t5_tok'](prompts, padding='max_length', max_length=max_length, truncation=True,
                        return_tensors='pt').input_ids
    txt = enc['t5'](ids.to(enc['t5'].device), attention_mask=None).last_hidden_state  # Flux attends to the pads too
    ids = enc['clip_tok'](prompts, padding='max_length', max_length=enc['clip_tok'].model_max_length,
                          truncation=True, return_tensors='pt').input_ids
    y = enc['clip'](ids.to(enc['clip'].device), attention_mask=None).pooler_output  # final LN at the first EOS
    return txt.float(), y.float()

# ----------------------------------------------------------------------------------------------------------
# Models and the sampler

def make_noise(seeds, channels, h, w):  # one generator per image: image i depends on its own seed only
    return torch.stack([torch.randn(channels, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

@torch.no_grad()
def generate(net, ae, txt, y, noise, steps, shift, guidance=3.5, true_cfg=1.0, neg_txt=None, neg_y=None,
             first_t=1.0, return_latents=False):
    """noise (B, C, h, w) latents, txt (B, Lt, D), y (B, Dv) -> images (B, 3, 8h, 8w) in [0, 1], or the latents
    when ae is None. shift: a float, or None for FLUX.1-dev's resolution-dependent shift. first_t: the schedule's
    first time (the SCFM demo uses 1 - 1e-5). true_cfg > 1: v = v_neg + true_cfg * (v - v_neg) (diffusers' true
    CFG). The latent is integrated in fp32, as diffusers' scheduler does; the model runs in its own dtype."""
    p = next(net.parameters())
    B, C, h, w = noise.shape
    img_ids, txt_ids = model.make_img_ids(h, w, device=p.device), model.make_txt_ids(txt.shape[1], device=p.device)
    ts = get_schedule(steps, shift=shift, image_seq_len=(h // 2) * (w // 2))
    ts[0] = first_t
    use_cfg = true_cfg != 1.0
    if use_cfg:  # one batched forward for the conditional and the negative halves
        if neg_txt is None or neg_y is None:
            raise ValueError('true_cfg != 1 needs the negative prompt embeddings neg_txt, neg_y')
        txt, y = torch.cat([txt, neg_txt.expand_as(txt)]), torch.cat([y, neg_y.expand_as(y)])
    txt, y = txt.to(p.device, p.dtype), y.to(p.device, p.dtype)

    def velocity(x, img_ids, txt, txt_ids, t, y, guidance=None, step=None):
        n = 2 if use_cfg else 1
        g, d = (None if v is None else v.repeat(n).to(p.dtype) for v in (guidance, step))
        v = net(x.to(p.dtype).repeat(n, 1, 1), img_ids, txt, txt_ids, t.repeat(n).to(p.dtype), y, guidance=g,
                step=d).float()
        if use_cfg:
            v, v_neg = v.chunk(2)
            v = v_neg + true_cfg * (v - v_neg)
        return v

    guidance = guidance if net.config.guidance_embed else None
    z = model.unpack(denoise(velocity, model.pack(noise.to(p.device, torch.float32)), img_ids, txt, txt_ids, y, ts,
                             guidance=guidance, step_embed=net.config.step_embed), h, w)
    if ae is None:
        return z
    img = (ae.decode(z.to(next(ae.parameters()).dtype)).float() / 2 + 0.5).clamp(0, 1)  # diffusers' postprocess
    return (img, z) if return_latents else img

def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> list of PIL images (rounded like diffusers' numpy_to_pil)."""
    from PIL import Image
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype('uint8')
    return [Image.fromarray(a) for a in arr]

def make_grid(pils, cols=None, row_labels=None):
    """PIL images -> one PIL grid, row-major; row_labels: a text per row, written in a left margin."""
    from PIL import Image, ImageDraw
    cols = cols or math.ceil(math.sqrt(len(pils)))
    W, H = pils[0].size
    left = 6 * max(map(len, row_labels)) + 10 if row_labels else 0
    grid = Image.new('RGB', (left + cols * W, math.ceil(len(pils) / cols) * H), 'white')
    for i, im in enumerate(pils):
        grid.paste(im, (left + (i % cols) * W, (i // cols) * H))
    for r, label in enumerate(row_labels or []):
        ImageDraw.Draw(grid).text((4, r * H + H // 2 - 6), label, fill='black')
    return grid

# ----------------------------------------------------------------------------------------------------------
# Command line (sample.py and eval_clip.py)

def read_prompts(path):
    """One prompt per non-empty line."""
    with open(path, encoding='utf-8') as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f'prompt file {path!r} has no prompts (one per line expected)')
    return prompts

def parse_size(size):
    """'HEIGHTxWIDTH' in pixels -> (H, W); multiples of 16 (8x autoencoder, then 2x2 patches)."""
    try:
        h, w = (int(v) for v in str(size).lower().split('x'))
    except ValueError:
        raise ValueError(f'size {size!r} must look like HEIGHTxWIDTH, e.g. 512x512') from None
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f'size {h}x{w}: height and width must be positive multiples of 16 (8x AE, 2x2 patches)')
    return h, w

def parse_shift(shift):  # checked first by checks.CLI
    return None if shift == 'dynamic' else float(shift)

def run_cli(main):
    """Run a script's main; the errors we raise on bad input print as one line (exit status 1), not a traceback."""
    with one_line_errors():
        main()

DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}

def add_sampling_args(ap, out):
    """The options sample.py and eval_clip.py share: the models, the sampler and the output folder."""
    ap.add_argument('--ckpt', required=True, help='transformer: our/BFL .safetensors or a diffusers folder')
    ap.add_argument('--lora', help='LoRA file (ours, diffusers/PEFT or kohya)')
    ap.add_argument('--lora_scale', type=float, default=1.0, help='the SCFM demo uses 1-1.75, higher for fewer steps')
    ap.add_argument('--t5', required=True, help='local T5 encoder folder')
    ap.add_argument('--clip', required=True, help='local CLIP text encoder folder')
    ap.add_argument('--ae', required=True, help='autoencoder: ae.safetensors or a diffusers vae folder')
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--shift', default='3.0', help="a float, or 'dynamic' (FLUX.1-dev's resolution-dependent shift)")
    ap.add_argument('--first_t', type=float, default=1.0, help='first schedule time (the SCFM demo: 0.99999)')
    ap.add_argument('--guidance', type=float, default=3.5, help='embedded guidance (guidance-distilled models)')
    ap.add_argument('--seed', type=int, default=0, help='image i uses seed + i')
    ap.add_argument('--size', default='512x512', help='HEIGHTxWIDTH, multiples of 16')
    ap.add_argument('--batch', type=int, default=4)
    ap.add_argument('--max_length', type=int, help="T5 tokens (default: the LoRA/model file's training length, or 512)")
    ap.add_argument('--out', default=out)
    ap.add_argument('--dtype', default='bfloat16', choices=list(DTYPES))
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')

def check_sampling_args(args):
    """The shared options, checked before anything big loads -> (height, width, shift)."""
    check_options(vars(args), CLI, '--{} {!r}')  # paths, numbers, --device, --out (and the caller's own options)
    read_flux(args.ckpt), read_ae(args.ae)  # their headers: a wrong or broken file fails before anything loads
    if args.max_length is None:  # the text length the LoRA or model was trained with (train.py's export), else 512
        metas = [open_files([p])[1] for p in (args.lora, args.ckpt) if p and os.path.isfile(p)]
        args.max_length = next((int(m['max_length']) for m in metas if 'max_length' in m), 512)
    return (*parse_size(args.size), parse_shift(args.shift))

def encode_batches(prompts, args, device, extra=()):
    """Encode prompts (and the extra texts) in batches of args.batch, then free the encoders before the DiT loads.
    -> list of (txt, y) per batch, and the (txt, y) of each extra text."""
    enc = load_text_encoders(args.t5, args.clip, device, DTYPES[args.dtype])
    encode = lambda texts: tuple(v.cpu() for v in encode_prompts(texts, enc, args.max_length))  # on the CPU until used
    out = [encode(prompts[i:i + args.batch]) for i in range(0, len(prompts), args.batch)]
    extra = [encode([t]) for t in extra]
    enc = None  # the encoders go before the DiT loads
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    return out, extra

def main(argv=None):
    ap = argparse.ArgumentParser(description='Few-step Flux sampling (teacher or SCFM student LoRA).')
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument('--prompt', help='one prompt')
    src.add_argument('--prompts', help='a text file, one prompt per line')
    add_sampling_args(ap, out='out/samples')
    ap.add_argument('--merge', action='store_true', help='fold the LoRA into the weights (faster)')
    ap.add_argument('--compile', action='store_true', help='torch.compile each block (faster after a one-time compile)')
    ap.add_argument('--true_cfg', type=float, default=1.0, help='> 1: true CFG against --negative (2x compute)')
    ap.add_argument('--negative', default='', help='negative prompt for --true_cfg')
    args = ap.parse_args(argv)

    H, W, shift = check_sampling_args(args)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    dtype, dev, t0 = DTYPES[args.dtype], args.device, time.time()
    batches, extra = encode_batches(prompts, args, dev, [args.negative] if args.true_cfg != 1.0 else [])
    neg = [t.to(dev) for t in extra[0]] if extra else (None, None)
    net = load_transformer(args.ckpt, dev, dtype, args.lora, args.lora_scale, args.merge)
    if args.compile:
        net.compile_blocks()
    ae = load_ae(args.ae, dev, dtype)
    os.makedirs(args.out, exist_ok=True)
    pils, t1 = [], time.time()
    for i, (txt, y) in zip(range(0, len(prompts), args.batch), batches):
        noise = make_noise(range(args.seed + i, args.seed + i + len(txt)), net.config.in_channels // 4, H // 8, W // 8)
        imgs = generate(net, ae, txt.to(dev), y.to(dev), noise, args.steps, shift, args.guidance, args.true_cfg, *neg,
                        first_t=args.first_t)
        for im in to_pil(imgs):
            im.save(os.path.join(args.out, f'{len(pils):05d}.png'))
            pils.append(im)
    make_grid(pils).save(os.path.join(args.out, 'grid.png'))
    settings = {**vars(args), 'height': H, 'width': W, 'n_images': len(prompts), 'prompts': prompts,
                'seeds': [args.seed + i for i in range(len(prompts))],
                'schedule': [args.first_t] + get_schedule(args.steps, shift, (H // 16) * (W // 16)).tolist()[1:],
                'sample_seconds': time.time() - t1, 'total_seconds': time.time() - t0}
    with open(os.path.join(args.out, 'settings.json'), 'w') as f:
        json.dump(settings, f, indent=2)
    print(f'wrote {len(pils)} images + grid.png + settings.json to {args.out} '
          f'({settings["sample_seconds"]:.1f} s sampling)')

if __name__ == '__main__':
    run_cli(main)
