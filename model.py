"""
A self-contained FLUX.1-compatible DiT, hand-written LoRA and the Flux autoencoder.

Parameter names are exactly the BFL names of `flux1-dev.safetensors` / `ae.safetensors`, so the project's
checkpoint format *is* the BFL format (convert_weights.py maps diffusers folders onto it).
No training logic lives here.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# The Flux DiT (BFL src/flux/model.py, modules/layers.py, math.py)

@dataclass
class FluxConfig:
    in_channels: int = 64          # 16 latent channels x 2x2 patch (pixel-space models: 3 x 2x2 = 12, etc.)
    out_channels: int = 64
    vec_in_dim: int = 768          # CLIP-L pooled output
    context_in_dim: int = 4096     # T5-XXL d_model
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19                # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple = (16, 56, 56) # RoPE dims per id axis, must sum to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True    # FLUX.1-dev is guidance-distilled; schnell is not
    step_embed: bool = False       # a shortcut model's step-size input d, in t units (not in Flux checkpoints)

PRESETS = {
    'flux-dev': FluxConfig(),
    'flux-schnell': FluxConfig(guidance_embed=False),
    # small models for tests and benchmarks; any channel count works (pixel-space models too)
    'tiny': FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                       num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6)),
    'small': FluxConfig(in_channels=64, out_channels=64, vec_in_dim=128, context_in_dim=256, hidden_size=512,
                        num_heads=8, depth=4, depth_single_blocks=8, axes_dim=(16, 24, 24)),
    # the CPU testbed: 8x8 grey digits in pixel space (1 channel x 2x2 patch), MiniLM text embeddings, no guidance
    'digits': FluxConfig(in_channels=4, out_channels=4, vec_in_dim=384, context_in_dim=384, hidden_size=128,
                         num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12), guidance_embed=False),
}

# ----- small pieces -----
def timestep_embedding(t, dim=256, max_period=10000, time_factor=1000.0):
    # the Flux sinusoid: t in [0, 1] scaled by 1000, cos first then sin, computed in fp32
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = (time_factor * t)[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb

def rope(ids, axes_dim, theta):
    # ids (B, L, 3) -> RoPE's (cos, sin), each (B, L, 1, head_dim) in fp32: pair k of axis i turns by pos_i *
    # theta^(-2k/dim_i), the angle repeated for both members of its (interleaved) pair: plain elementwise math
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim))
        angles.append(ids[..., i].float()[..., None] * omega)
    angles = torch.cat(angles, -1).repeat_interleave(2, -1).unsqueeze(2)
    return torch.cos(angles), torch.sin(angles)

def apply_rope(x, pe):
    # x: (B, L, H, D) as D/2 pairs (x0, x1); pair k becomes (cos*x0 - sin*x1, sin*x0 + cos*x1), in fp32
    cos, sin = pe
    xf = x.float()
    x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x1, x0), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)

def attention(q, k, v, pe):
    # q, k, v: (B, L, H, D); SDPA's output on (B, H, L, D) views is laid out as (B, L, H, D), so "B H L D -> B L (H D)"
    # is a view, not a copy
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return x.transpose(1, 2).flatten(2)

def add_linear(out, x, weight, alpha):
    # out + alpha * x @ weight.T as one GEMM accumulating into out: LoRA's up-projection without extra passes
    return torch.addmm(out.flatten(0, -2), x.flatten(0, -2), weight.t(), alpha=alpha).view(out.shape)

class Linear(nn.Linear):
    # BFL fuses q, k, v (single blocks: and the MLP input) into one weight; `parts` are its row blocks, each its own
    # matmul (forward returns a list): the same numbers as one wide product split afterwards but contiguous outputs
    # for RoPE and attention, and what lets a split-layout LoRA give each part its own adapter
    def __init__(self, in_features, out_features, bias=True, parts=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.parts = parts

    def forward(self, x):
        if self.parts is None:
            return super().forward(x)
        biases = self.bias.split(self.parts) if self.bias is not None else [None] * len(self.parts)
        return [F.linear(x, w, b) for w, b in zip(self.weight.split(self.parts), biases)]

def layer_norm(x):
    # every LayerNorm in Flux is affine-free with eps 1e-6, so a function is enough (no parameters to name)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)

class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale

class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))

class Modulation(nn.Module):
    # adaLN: (shift, scale, gate) per sub-layer, from the conditioning vector
    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)

class AttentionProjections(nn.Module):  # q, k, v and the output projection; the blocks attend jointly
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, qkv_bias, parts=[dim] * 3)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = (heads(a, self.num_heads) for a in self.qkv(x))
        q, k = self.norm(q, k, v)
        return q, k, v

def heads(x, num_heads):
    return x.unflatten(-1, (num_heads, -1))  # "B L (H D) -> B L H D"

def mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate='tanh'), nn.Linear(hidden, dim))

def modulate(x, shift, scale):
    return (1 + scale) * layer_norm(x) + shift

# ----- blocks -----
class DoubleStreamBlock(nn.Module):
    # image and text tokens keep separate weights but attend jointly (text first)
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(dim, 6), Modulation(dim, 6)
        self.img_attn = AttentionProjections(dim, num_heads, qkv_bias)
        self.txt_attn = AttentionProjections(dim, num_heads, qkv_bias)
        self.img_mlp, self.txt_mlp = mlp(dim, hidden), mlp(dim, hidden)

    def forward(self, img, txt, vec, pe):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1))
        attn = attention(torch.cat((tq, iq), 1), torch.cat((tk, ik), 1), torch.cat((tv, iv), 1), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt

class SingleStreamBlock(nn.Module):
    # one fused linear computes qkv and the MLP input; a second fuses the attention out-proj and MLP out
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = Linear(dim, dim * 3 + self.mlp_hidden, parts=[dim] * 3 + [self.mlp_hidden])
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, 3)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        q, k, v, h = self.linear1(modulate(x, shift, scale))
        q, k, v = heads(q, self.num_heads), heads(k, self.num_heads), heads(v, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), F.gelu(h, approximate='tanh')), 2))
        return x + gate * out

class LastLayer(nn.Module):
    def __init__(self, dim, out_channels):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # BFL order: shift first (diffusers swaps)
        return self.linear(modulate(x, shift[:, None], scale[:, None]))

# ----- the model -----
class Flux(nn.Module):
    """Built on the meta device, then to_empty() + init_weights() or a checkpoint's tensors (assign=True)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        assert c.hidden_size % c.num_heads == 0, 'hidden_size must be divisible by num_heads'
        assert sum(c.axes_dim) == c.hidden_size // c.num_heads, f'axes_dim {c.axes_dim} must sum to head_dim'
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else None
        self.step_in = MLPEmbedder(256, c.hidden_size) if c.step_embed else None
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias)
                                           for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio)
                                           for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)
        self.gradient_checkpointing = False  # per-block activation checkpointing, trades compute for memory

    @torch.no_grad()
    def init_weights(self):
        # Xavier-uniform linears, zero biases, zero adaLN and output projections (DiT's adaLN-Zero): identity blocks
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LoRALinear):
                    m.reset_lora()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.scale)
        last = self.final_layer
        for m in [m.lin for m in self.modules() if isinstance(m, Modulation)] + [last.adaLN_modulation[1], last.linear]:
            nn.init.zeros_(m.weight)  # every adaLN modulation and the output projection
        if self.step_in is not None:  # the step-size input starts at zero: a model initialised from a flow is that flow
            nn.init.zeros_(self.step_in.out_layer.weight)
        nn.init.normal_(self.time_in.in_layer.weight, std=0.02)  # small embedder init, as in DiT
        nn.init.normal_(self.time_in.out_layer.weight, std=0.02)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, step=None):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f'img and txt must be (B, L, C), got {tuple(img.shape)} and {tuple(txt.shape)}')
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError('this model is guidance-distilled (guidance_embed=True): pass guidance')
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if self.step_in is not None:
            if step is None:
                raise ValueError('this model has a step-size input (step_embed=True): pass step')
            vec = vec + self.step_in(timestep_embedding(step, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = self.pos_embed(txt_ids, img_ids, img.shape[0])
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)

    def compile_blocks(self):
        # torch.compile per block: fuses the norms, RoPE, modulation and gates between the matmuls
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile()

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def pos_embed(self, txt_ids, img_ids, batch):
        # computed in forward (no buffer) so meta-device construction and FSDP sharding stay trivial
        ids = torch.cat((txt_ids, img_ids), -2)
        return rope(ids[None].expand(batch, -1, -1) if ids.ndim == 2 else ids, self.config.axes_dim, self.config.theta)

    def estimate_flops(self, img_tokens, txt_tokens):
        """Forward FLOPs per sample (multiply-add = 2): every weight matmul once per token + joint attention."""
        c, L = self.config, img_tokens + txt_tokens
        H, M = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
        blocks = L * 2 * (c.depth * (4 * H * H + 2 * H * M) + c.depth_single_blocks * (H * (3 * H + M) + (H + M) * H))
        attn = (c.depth + c.depth_single_blocks) * 4 * L * L * H
        io = 2 * img_tokens * H * (c.in_channels + c.out_channels) + 2 * txt_tokens * c.context_in_dim * H
        return blocks + attn + io + 2 * H * (c.depth * 12 * H + c.depth_single_blocks * 3 * H + 2 * H)  # + modulation

# ----- latent packing and position ids (BFL sampling.py) -----
def pack(x, p=2):
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p); feature order (c, ph, pw), tokens row-major."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f'latent size {H}x{W} must be a multiple of the patch size {p}')
    return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)

def unpack(x, h, w, p=2):
    """(B, L, C*p*p) -> (B, C, h, w) with h, w the unpacked latent size."""
    B, L, D = x.shape
    return x.view(B, h // p, w // p, D // (p * p), p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, D // (p * p), h, w)

def make_img_ids(h, w, p=2, device=None):
    """(h/p * w/p, 3) ids (0, row, col) over the packed token grid; h, w = unpacked latent size."""
    ids = torch.zeros(h // p, w // p, 3, device=device)
    ids[..., 1] = torch.arange(h // p, device=device)[:, None]
    ids[..., 2] = torch.arange(w // p, device=device)[None, :]
    return ids.reshape(-1, 3)

def make_txt_ids(length, device=None):
    return torch.zeros(length, 3, device=device)

# ----------------------------------------------------------------------------------------------------------
# LoRA without a library: y = W x + b + scale * (alpha/rank) * B A x.  B starts at zero, so a fresh LoRA is
# the base model; scale 0 skips the LoRA branch entirely, so the teacher pass is the base model bit for bit.

LORA_ALL = r'.*'  # target pattern over BFL module names: every linear (with layout 'split': the official SCFM run's)

class LoRALinear(Linear):
    """layout 'fused': one adapter per weight (q, k, v share A); 'split': one per part of a fused weight (A stacks
    the parts' (rank, in) factors, B's rows follow the parts), as PEFT adapters on diffusers' separate linears."""
    def __init__(self, in_features, out_features, bias=True, rank=4, alpha=None, parts=None, layout='fused',
                 init='kaiming', device=None, dtype=None):
        super().__init__(in_features, out_features, bias, parts, device, dtype)
        self.rank, self.alpha, self.scale, self.init = rank, float(alpha if alpha is not None else rank), 1.0, init
        n = len(parts) if parts and layout == 'split' else 1
        self.lora_A = nn.Parameter(torch.empty(n * rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_lora(self):
        if self.init == 'gaussian':  # PEFT's init_lora_weights='gaussian' (the official SCFM script)
            nn.init.normal_(self.lora_A, std=1 / self.rank)
        else:  # PEFT's default
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        out = super().forward(x)
        if self.scale == 0:
            return out
        h, s = F.linear(x, self.lora_A), self.scale * self.alpha / self.rank
        if self.parts is None:
            return add_linear(out, h, self.lora_B, s)
        hs = h.chunk(self.lora_A.shape[0] // self.rank, -1)  # one chunk (shared A) or one per part
        return [add_linear(o, hs[i % len(hs)], b, s)
                for i, (o, b) in enumerate(zip(out, self.lora_B.split(self.parts)))]

    def delta(self):
        """The weight update scale * alpha/rank * B @ A in fp32 (split layout: B block-diagonal over the parts)."""
        B = self.lora_B.float()
        if self.lora_A.shape[0] > self.rank:
            B = torch.block_diag(*B.split(self.parts))
        return (self.scale * self.alpha / self.rank) * (B @ self.lora_A.float())

def apply_lora(model, rank, alpha=None, targets=LORA_ALL, layout='fused', init='kaiming'):
    """Swap every linear layer whose module name fully matches the regex `targets` for a LoRALinear, in place.
    Base weights are kept (same tensors, same names); works on the meta device too. Returns the wrapped names."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module) in (nn.Linear, Linear) and re.fullmatch(targets, name):
            lora = LoRALinear(module.in_features, module.out_features, module.bias is not None, rank, alpha,
                              getattr(module, 'parts', None), layout, init, module.weight.device, module.weight.dtype)
            lora.weight, lora.bias = module.weight, module.bias
            if lora.lora_A.device.type != 'meta':
                lora.reset_lora()
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, lora)
            names.append(name)
    if not names:
        raise ValueError(f'LoRA targets {targets!r} matched no nn.Linear in the model')
    return names

def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}

def set_lora_scale(model, scale):
    for m in lora_modules(model).values():
        m.scale = scale

@torch.no_grad()
def merge_lora(model):
    """Fold scale*(alpha/rank)*B@A into the base weight and turn the LoRA branch off (scale 0)."""
    for m in lora_modules(model).values():
        if m.scale != 0:
            m.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
            m.scale = 0.0

def lora_state_dict(model):
    """Our native LoRA file: '<bfl module>.lora_A.weight', '.lora_B.weight', '.alpha' (like BFL's own LoRAs)."""
    return {k: v for name, m in lora_modules(model).items() for k, v in (
        (f'{name}.lora_A.weight', m.lora_A.detach()), (f'{name}.lora_B.weight', m.lora_B.detach()),
        (f'{name}.alpha', torch.tensor(m.alpha)))}

@torch.no_grad()
def load_lora_state_dict(model, sd, source='LoRA state dict'):
    """Inverse of lora_state_dict; every key must fit a LoRALinear of the model (applying LoRA first if needed)."""
    mods = lora_modules(model)
    if not mods:  # wrap the named linears, one apply_lora per rank and layout (imported LoRAs may mix them)
        linears, by_kind = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}, {}
        for k, v in sd.items():
            name = k.split('.lora_')[0].removesuffix('.alpha')
            if name not in linears:
                raise KeyError(f'{source}: key {k!r} does not fit the model (it has no linear layer {name!r}); '
                               f'is it a LoRA for another model?')
            if k.endswith('.lora_B.weight') and (a := sd.get(f'{name}.lora_A.weight')) is not None:
                kind = (v.shape[1], 'split' if a.shape[0] > v.shape[1] else 'fused')  # A stacks one (r, in) per part
                by_kind.setdefault(kind, []).append(re.escape(name))
        for (rank, layout), names in by_kind.items():
            apply_lora(model, rank, targets='|'.join(names), layout=layout)
        mods = lora_modules(model)
    seen = set()
    for key, value in sd.items():
        name, _, kind = key.rpartition('.lora_') if '.lora_' in key else (key.rpartition('.')[0], '', 'alpha')
        if name not in mods:
            raise KeyError(f'{source}: key {key!r} does not fit the model (no LoRA-wrapped linear {name!r})')
        if kind == 'alpha':
            mods[name].alpha = float(value)
        elif (param := mods[name].lora_A if kind.startswith('A') else mods[name].lora_B).shape != value.shape:
            raise ValueError(f'{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}')
        else:
            param.copy_(value)
            seen.add(name)
    missing = sorted(set(mods) - seen)
    if missing:
        raise KeyError(f'{source}: no LoRA weights for {len(missing)} module(s), e.g. {missing[:3]}')

# ----------------------------------------------------------------------------------------------------------
# The FLUX.1 autoencoder (BFL's modules/autoencoder.py): 8x downsampling to 16 latent channels, module names as in
# BFL's ae.safetensors (diffusers weights go through convert_weights.py); BFL's empty per-level `attn` lists left out

@dataclass
class AutoEncoderConfig:
    resolution: int = 256  # stored by BFL, unused in the forward pass
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32  # 32 in Flux; configurable so tiny models can have few channels

AE_PRESETS = {
    'flux': AutoEncoderConfig(),  # 83,819,683 parameters
    'tiny': AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), norm_groups=8),  # the same latent shape, ~1.8M params
}

def group_norm(c, groups):
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)

class AttnBlock(nn.Module):  # single-head self-attention over all H*W positions, 1x1-conv projections
    def __init__(self, c, groups):
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)

class ResnetBlock(nn.Module):  # (GN, swish, conv3x3) twice plus a residual (a 1x1 conv when the width changes)
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h

class Resample(nn.Module):  # stride-2 conv after a right/bottom pad (down) or nearest 2x then conv (up)
    def __init__(self, c, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode='nearest'))

def mid_block(c, groups):
    mid = nn.Sequential()  # BFL's names: mid.block_1, mid.attn_1, mid.block_2
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)
    return mid

def level(blocks, resample_name=None, resample=None):
    out = nn.Module()
    out.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(out, resample_name, resample)
    return out

class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        ins = [cfg.ch] + chs[:-1]
        self.down = nn.ModuleList(  # no downsampling after the deepest level
            level([ResnetBlock(ins[i] if r == 0 else c, c, g) for r in range(cfg.num_res_blocks)], 'downsample',
                  Resample(c, down=True) if i < len(chs) - 1 else None) for i, c in enumerate(chs))
        self.mid = mid_block(chs[-1], g)
        self.norm_out = group_norm(chs[-1], g)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for block in lvl.block:
                h = block(h)
            if hasattr(lvl, 'downsample'):
                h = lvl.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = mid_block(chs[-1], g)
        # up[i] runs deepest-first, indexed like the encoder levels (BFL): diffusers' up_blocks are in reverse order
        ins = chs[1:] + chs[-1:]
        self.up = nn.ModuleList(
            level([ResnetBlock(ins[i] if r == 0 else c, c, g) for r in range(cfg.num_res_blocks + 1)], 'upsample',
                  Resample(c, down=False) if i > 0 else None) for i, c in enumerate(chs))
        self.norm_out = group_norm(chs[0], g)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            for block in lvl.block:
                h = block(h)
            if hasattr(lvl, 'upsample'):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

class AutoEncoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    @torch.no_grad()
    def encode(self, x):  # the posterior mean (deterministic), scaled to roughly unit variance
        return self.cfg.scale_factor * (self.encoder(x).chunk(2, dim=1)[0] - self.cfg.shift_factor)

    def decode(self, z):
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)

    def forward(self, x):
        return self.decode(self.encode(x))
