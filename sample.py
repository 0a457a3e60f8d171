"""
Few-step sampling for Flux-style flow-matching models (teacher or SCFM student).

    python sample.py --ckpt flux1-dev.safetensors --lora out/flux3/lora.safetensors --prompt "a cat" \
        --steps 3 --shift 3.0 --t5 FLUX.1-dev/text_encoder_2 --clip FLUX.1-dev/text_encoder --ae ae.safetensors

The importable core: get_schedule, denoise, encode_prompts, generate (used by eval_clip.py, the data scripts,
eval_digits.py and the tests).

Convention (docs/scfm.md §1.1): t = 1 is pure noise, t = 0 is data, x_t = (1-t) x0 + t eps, the model predicts
v = eps - x0, and sampling runs Euler from t = 1 down to t = 0:  x <- x + (t_next - t_cur) * v(x, t_cur).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import model as M


def get_schedule(num_steps, shift=1.0, image_seq_len=None, base_shift=0.5, max_shift=1.15):
    """
    The (num_steps+1,) float64 grid of times from exactly 1.0 down to exactly 0.0.

    shift = s: the SD3/SCFM shift g -> s*g / (1 + (s-1)*g) of the uniform grid (s > 1 spends more steps at high
    noise; s = 1 is the plain uniform grid, FLUX.1-schnell). shift = None: FLUX.1-dev's dynamic shift, s = e^mu
    with mu linear in the packed image token count (256 -> base_shift, 4096 -> max_shift); BFL writes it as
    exp(mu) / (exp(mu) + (1/t - 1)), the same function (docs/flux.md §4).
    (The SCFM gradio UI sets g[0] = 1 - 1e-5; we keep exactly 1, the time the models were trained to start at.)
    """
    if shift is None:
        if image_seq_len is None:
            raise ValueError('the dynamic shift (shift=None) needs image_seq_len, the packed image token count')
        m = (max_shift - base_shift) / (4096 - 256)
        shift = math.exp(m * (image_seq_len - 256) + base_shift)
    if shift <= 0:
        raise ValueError(f'shift must be > 0, got {shift}')
    g = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return shift * g / (1 + (shift - 1) * g)  # g = 1 -> s/s = 1.0 exactly, g = 0 -> 0.0 exactly


@torch.no_grad()
def denoise(model, x, img_ids, txt, txt_ids, y, timesteps, guidance=None):
    """
    Euler from timesteps[0] to timesteps[-1] on packed tokens x (B, L, C); returns the final x.
    model(img, img_ids, txt, txt_ids, timesteps, y, guidance) -> velocity, the model.Flux signature.
    guidance: None (a model without guidance_embed), a float, or a (B,) tensor of embedded guidance values.
    """
    B = x.shape[0]
    if guidance is not None and not torch.is_tensor(guidance):
        guidance = torch.full((B,), float(guidance), device=x.device, dtype=x.dtype)
    ts = [float(t) for t in timesteps]
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t_vec = torch.full((B,), t_cur, device=x.device, dtype=x.dtype)
        v = model(x, img_ids, txt, txt_ids, t_vec, y, guidance=guidance)
        x = x + (t_next - t_cur) * v
    return x


# ----------------------------------------------------------------------------------------------------------
# Text encoders (docs/flux.md §7): T5 last_hidden_state and CLIP-L pooler_output, padding='max_length',
# truncation, and no attention mask anywhere, exactly as BFL and diffusers' FluxPipeline do.

def load_text_encoders(t5_dir, clip_dir, device='cpu', dtype=torch.float32):
    """Local folders only (we never download): t5_dir holds a T5EncoderModel + its tokenizer, clip_dir a
    CLIPTextModel + CLIPTokenizer (e.g. the text_encoder_2/tokenizer_2 and text_encoder/tokenizer folders of a
    diffusers FLUX.1 snapshot: pass the model folder and the tokenizer is looked up next to it)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    def folders(path, what, tok_sibling):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f'{what} folder {path!r} does not exist (a local folder is needed: '
                                    f'nothing is downloaded)')
        sib = os.path.join(os.path.dirname(os.path.normpath(path)), tok_sibling)
        # a diffusers snapshot keeps the tokenizer in a sibling folder; a plain HF repo keeps both together
        has_tok = any(os.path.exists(os.path.join(path, f)) for f in ('tokenizer.json', 'tokenizer_config.json',
                                                                      'spiece.model', 'vocab.json'))
        return path, (path if has_tok or not os.path.isdir(sib) else sib)

    t5_model, t5_tok = folders(t5_dir, 'T5 encoder', 'tokenizer_2')
    clip_model, clip_tok = folders(clip_dir, 'CLIP text encoder', 'tokenizer')
    kw = dict(dtype=dtype, local_files_only=True)
    return dict(
        t5=T5EncoderModel.from_pretrained(t5_model, **kw).to(device).eval().requires_grad_(False),
        t5_tok=AutoTokenizer.from_pretrained(t5_tok, local_files_only=True),
        clip=CLIPTextModel.from_pretrained(clip_model, **kw).to(device).eval().requires_grad_(False),
        clip_tok=CLIPTokenizer.from_pretrained(clip_tok, local_files_only=True),
    )


@torch.no_grad()
def encode_prompts(prompts, enc, max_length=512):
    """list of str -> txt (B, max_length, d_T5) T5 last_hidden_state, y (B, d_CLIP) CLIP pooler_output (fp32).
    max_length: 512 for FLUX.1-dev, 256 for schnell. CLIP always uses its 77 tokens."""
    if isinstance(prompts, str):
        prompts = [prompts]
    t5, clip = enc['t5'], enc['clip']
    ids = enc['t5_tok'](prompts, padding='max_length', max_length=max_length, truncation=True,
                        return_tensors='pt').input_ids
    txt = t5(ids.to(t5.device), attention_mask=None).last_hidden_state  # no mask: Flux attends to the pads too
    ids = enc['clip_tok'](prompts, padding='max_length', max_length=enc['clip_tok'].model_max_length,
                          truncation=True, return_tensors='pt').input_ids
    y = clip(ids.to(clip.device), attention_mask=None).pooler_output  # final-LN state at the first EOS, no projection
    return txt.float(), y.float()

# ----------------------------------------------------------------------------------------------------------
# Models and the sampler core


def load_transformer(path, device='cpu', dtype=torch.float32, lora=None, lora_scale=1.0, merge=False):
    """Any transformer checkpoint convert_weights reads (ours/BFL, diffusers folder), optionally with a LoRA file
    (ours, diffusers/PEFT or kohya). The LoRA stays a separate branch scaled by lora_scale, or is merged."""
    import convert_weights as cw
    sd, cfg = cw.load_flux_state_dict(path, dtype=dtype, device=device)
    with torch.device('meta'):
        model = M.Flux(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if lora:
        lsd, _ = cw.load_lora(lora)
        linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for k in lsd:  # name the first key (BFL name, after conversion) with no linear in this model
            module = k.rsplit('.lora_', 1)[0].removesuffix('.alpha')
            if module not in linears:
                raise KeyError(f'{lora}: LoRA key {k!r} does not fit the model (it has no linear layer {module!r}); '
                               f'is it a LoRA for another model?')
        # shapes are checked here (ValueError naming the key)
        M.load_lora_state_dict(model, {k: v.to(device, dtype) for k, v in lsd.items()}, source=lora)
        M.set_lora_scale(model, lora_scale)
        if merge:
            M.merge_lora(model)
    return model.eval().requires_grad_(False)


def load_ae(path, device='cpu', dtype=torch.float32):
    import convert_weights as cw
    sd, cfg = cw.load_ae_state_dict(path, dtype=dtype, device=device)
    with torch.device('meta'):
        ae = M.AutoEncoder(cfg)
    ae.load_state_dict(sd, strict=True, assign=True)
    return ae.eval().requires_grad_(False)


def make_noise(seeds, channels, h, w):
    """One fp32 CPU generator per image, so image i depends on its own seed only (not on batch size or rank)."""
    return torch.stack([torch.randn(channels, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def parse_size(size):
    """'512x512' or 'HxW' -> (H, W) in pixels; both must be multiples of 16 (8x AE, then 2x2 patches)."""
    try:
        h, w = (int(v) for v in str(size).lower().split('x'))
    except ValueError:
        raise ValueError(f'size {size!r} must look like HEIGHTxWIDTH, e.g. 512x512') from None
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f'size {h}x{w}: height and width must be positive multiples of 16 (8x AE, 2x2 patches)')
    return h, w


@torch.no_grad()
def generate(model, ae, txt, y, noise, steps, shift, guidance=3.5, true_cfg=1.0, neg_txt=None, neg_y=None,
             first_t=1.0, return_latents=False):
    """
    noise (B, C, h, w) latent noise, txt (B, Lt, D), y (B, Dv) -> images (B, 3, 8h, 8w) in [0, 1], fp32.
    shift: a float, or None for FLUX.1-dev's resolution-dependent shift. first_t: the schedule's first time
    (1.0 = FluxPipeline; the SCFM gradio UI uses 1 - 1e-5). true_cfg > 1: diffusers' true CFG,
    v = v_neg + true_cfg * (v - v_neg) (the SCFM UI's "w" is true_cfg - 1). The latent is integrated in fp32
    (as diffusers' scheduler does); the model runs in its own dtype. ae=None returns the latents only.
    """
    p = next(model.parameters())
    B, C, h, w = noise.shape
    img_ids, txt_ids = M.make_img_ids(h, w, device=p.device), M.make_txt_ids(txt.shape[1], device=p.device)
    ts = get_schedule(steps, shift=shift, image_seq_len=(h // 2) * (w // 2))
    ts[0] = first_t
    use_cfg = true_cfg != 1.0
    if use_cfg and (neg_txt is None or neg_y is None):
        raise ValueError('true_cfg != 1 needs the negative prompt embeddings neg_txt, neg_y')
    if use_cfg:  # one batched forward for the conditional and the negative halves
        txt, y = torch.cat([txt, neg_txt.expand_as(txt)]), torch.cat([y, neg_y.expand_as(y)])
    txt, y = txt.to(p.device, p.dtype), y.to(p.device, p.dtype)
    g = guidance if model.config.guidance_embed else None

    def velocity(x, img_ids, txt, txt_ids, t, y, guidance=None):
        n = 2 if use_cfg else 1
        xx = x.to(p.dtype).repeat(n, 1, 1)
        gg = None if guidance is None else guidance.repeat(n).to(p.dtype)
        v = model(xx, img_ids, txt, txt_ids, t.repeat(n).to(p.dtype), y, guidance=gg).float()
        if use_cfg:
            v, v_neg = v.chunk(2)
            v = v_neg + true_cfg * (v - v_neg)
        return v

    x = denoise(velocity, M.pack(noise.to(p.device, torch.float32)), img_ids, txt, txt_ids, y, ts, guidance=g)
    z = M.unpack(x, h, w)
    if ae is None:
        return z
    q = next(ae.parameters())
    img = (ae.decode(z.to(q.dtype)).float() / 2 + 0.5).clamp(0, 1)  # diffusers' postprocess, bit for bit
    return (img, z) if return_latents else img


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> list of PIL images (rounded like diffusers' numpy_to_pil)."""
    from PIL import Image
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype('uint8')
    return [Image.fromarray(a) for a in arr]


def make_grid(pils, cols=None):
    from PIL import Image
    cols = cols or math.ceil(math.sqrt(len(pils)))
    rows = math.ceil(len(pils) / cols)
    W, H = pils[0].size
    grid = Image.new('RGB', (cols * W, rows * H))
    for i, im in enumerate(pils):
        grid.paste(im, ((i % cols) * W, (i // cols) * H))
    return grid


def read_prompts(path):
    """One prompt per non-empty line."""
    with open(path, encoding='utf-8') as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f'prompt file {path!r} has no prompts (one per line expected)')
    return prompts


def parse_shift(shift):
    if shift == 'dynamic':
        return None
    try:
        return float(shift)
    except ValueError:
        raise ValueError(f"--shift {shift!r}: a number (e.g. 3.0) or 'dynamic'") from None


def cli_error(e):
    """One readable line for the errors we raise on bad input (KeyError's str() would add quotes)."""
    return f'error: {e.args[0] if isinstance(e, KeyError) and e.args else e}'


DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}

# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description='Few-step Flux sampling (teacher or SCFM student LoRA).')
    ap.add_argument('--ckpt', required=True, help='transformer: our/BFL .safetensors or a diffusers folder')
    ap.add_argument('--lora', help='LoRA file (ours, diffusers/PEFT or kohya)')
    ap.add_argument('--lora_scale', type=float, default=1.0, help='SCFM README: 1-1.75, higher for fewer steps')
    ap.add_argument('--merge', action='store_true', help='fold the LoRA into the weights (faster)')
    ap.add_argument('--compile', action='store_true', help='torch.compile each block (faster after a one-time compile)')
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument('--prompt', help='one prompt')
    src.add_argument('--prompts', help='a text file, one prompt per line')
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--shift', default='3.0', help="a float, or 'dynamic' (FLUX.1-dev's resolution-dependent shift)")
    ap.add_argument('--first_t', type=float, default=1.0, help='first schedule time (SCFM UI: 0.99999)')
    ap.add_argument('--guidance', type=float, default=3.5, help='embedded guidance (guidance-distilled models)')
    ap.add_argument('--true_cfg', type=float, default=1.0, help='> 1: true CFG against --negative (2x compute)')
    ap.add_argument('--negative', default='', help='negative prompt for --true_cfg')
    ap.add_argument('--seed', type=int, default=0, help='image i uses seed + i')
    ap.add_argument('--size', default='512x512', help='HEIGHTxWIDTH, multiples of 16')
    ap.add_argument('--batch', type=int, default=4)
    ap.add_argument('--max_length', type=int, default=512, help='T5 tokens: 512 dev, 256 schnell')
    ap.add_argument('--t5', required=True, help='local T5 encoder folder')
    ap.add_argument('--clip', required=True, help='local CLIP text encoder folder')
    ap.add_argument('--ae', required=True, help='autoencoder: ae.safetensors or a diffusers vae folder')
    ap.add_argument('--out', default='out/samples')
    ap.add_argument('--dtype', default='bfloat16', choices=list(DTYPES))
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a = ap.parse_args(argv)

    # validate everything cheap before loading anything big
    H, W = parse_size(a.size)
    prompts = [a.prompt] if a.prompt is not None else read_prompts(a.prompts)
    shift = parse_shift(a.shift)
    for path, what in ((a.ckpt, '--ckpt'), (a.ae, '--ae'), (a.lora, '--lora')):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f'{what} {path!r} does not exist')
    dtype, dev = DTYPES[a.dtype], a.device
    t0 = time.time()
    enc = load_text_encoders(a.t5, a.clip, dev, dtype)
    txt, y = [], []
    for i in range(0, len(prompts), a.batch):
        t, v = encode_prompts(prompts[i:i + a.batch], enc, a.max_length)
        txt.append(t.cpu()), y.append(v.cpu())
    txt, y = torch.cat(txt), torch.cat(y)
    neg = encode_prompts([a.negative], enc, a.max_length) if a.true_cfg != 1.0 else (None, None)
    del enc  # the encoders are not needed any more: free their memory before loading the DiT
    if dev.startswith('cuda'):
        torch.cuda.empty_cache()
    model = load_transformer(a.ckpt, dev, dtype, a.lora, a.lora_scale, a.merge)
    if a.compile:
        model.compile_blocks()
    ae = load_ae(a.ae, dev, dtype)
    C = model.config.in_channels // 4
    os.makedirs(a.out, exist_ok=True)
    pils, t1 = [], time.time()
    for i in range(0, len(prompts), a.batch):
        n = min(a.batch, len(prompts) - i)
        noise = make_noise(range(a.seed + i, a.seed + i + n), C, H // 8, W // 8)
        imgs = generate(model, ae, txt[i:i + n].to(dev), y[i:i + n].to(dev), noise, a.steps, shift, a.guidance,
                        a.true_cfg, *(None if t is None else t.to(dev) for t in neg), first_t=a.first_t)
        for j, im in enumerate(to_pil(imgs)):
            im.save(os.path.join(a.out, f'{i + j:05d}.png'))
            pils.append(im)
    make_grid(pils).save(os.path.join(a.out, 'grid.png'))
    settings = {**vars(a), 'height': H, 'width': W, 'n_images': len(prompts), 'prompts': prompts,
                'seeds': [a.seed + i for i in range(len(prompts))],
                'schedule': [a.first_t] + get_schedule(a.steps, shift, (H // 16) * (W // 16)).tolist()[1:],
                'sample_seconds': time.time() - t1, 'total_seconds': time.time() - t0}
    with open(os.path.join(a.out, 'settings.json'), 'w') as f:
        json.dump(settings, f, indent=2)
    print(f'wrote {len(pils)} images + grid.png + settings.json to {a.out} '
          f'({settings["sample_seconds"]:.1f} s sampling)')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(cli_error(e))
