"""
Convert FLUX.1 weights between BFL (= our format), diffusers and kohya layouts, and read them for train/sample.

    python convert_weights.py SRC OUT                    # transformer or AE, any layout -> our .safetensors
    python convert_weights.py SRC OUT_DIR --to diffusers # -> diffusers folder (config.json + weights)
    python convert_weights.py --lora SRC OUT --to kohya  # LoRA: ours <-> diffusers/PEFT <-> kohya
    python convert_weights.py --info SRC                 # print the detected format and inferred config

Key layouts: docs/method.md section 6. Read with the safetensors library (never a pickle), written one tensor group at
a time: converting a 24 GB checkpoint needs about one tensor of memory.
"""
import argparse
import json
import os
import re
import struct
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

import model

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

class ConvertError(ValueError):
    pass

# ---- safetensors I/O. A source is {name: (safe_open handle, key in that file)}; data is read only when asked for.

def open_files(paths):
    """Files (e.g. diffusers shards) -> (one source, the first file's metadata)."""
    src, metadata = {}, None
    for path in paths:
        try:
            f = safe_open(path, framework="pt")
        except Exception as e:  # never torch.load: unpickling runs code
            with open(path, "rb") as fh:
                head = fh.read(8)
            raise ConvertError(f"{path}: not a safetensors file ({e}; it starts with {head!r}); torch.save/pickle "
                               "checkpoints are never unpickled here: re-save them as .safetensors") from None
        metadata = f.metadata() or {} if metadata is None else metadata
        for k in f.keys():
            if (name := k.removeprefix("model.diffusion_model.")) in src:  # ComfyUI/community single files
                raise ConvertError(f"{path}: tensor {name!r} is also in an earlier shard")
            src[name] = (f, k)
    return src, metadata or {}

def _meta(src, k):  # shape and dtype from the header, no data read
    s = src[k][0].get_slice(src[k][1])
    return torch.empty(s.get_shape(), dtype=DTYPES[s.get_dtype()], device="meta")

def _get(src, k):
    return src[k][0].get_tensor(src[k][1])

def write_safetensors(path, metas, tensors, metadata=None):
    """Streaming writer: the header from `metas` ({name: tensor}, meta tensors do), then each (name, tensor) of the
    iterator `tensors`, in the order of metas, as it comes. Written to a temporary file, renamed when complete."""
    header, off = {}, 0
    for name, t in metas.items():
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    meta = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    head = json.dumps({**header, **meta}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # 8-byte aligned data, like the reference writer
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            names = []
            for name, t in tensors:
                names.append(name)
                if names != list(header)[:len(names)] or [list(t.shape), DTYPE_NAMES[t.dtype]] != [
                        header[name]["shape"], header[name]["dtype"]]:
                    raise ConvertError(f"{path}: tensor {name!r} does not match the header (order, shape or dtype)")
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))  # little-endian host
            if names != list(header):
                raise ConvertError(f"{path}: {len(names)} tensors written, the header lists {len(header)}")
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a missing folder, no permission: named, and the temporary removed below
        raise ConvertError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_dict(path, sd, metadata=None):
    write_safetensors(path, sd, iter(sd.items()), metadata)

def run_plan(plan, get, dtype=None):
    """A plan is a list of groups (out_names, fn, src_keys), fn(source tensors) -> output tensors. Yields (name,
    tensor) one group at a time, get(key) -> source tensor; run on meta tensors, it gives the shapes for a header."""
    for outs, fn, keys in plan:
        for o, t in zip(outs, fn([get(k) for k in keys])):
            yield o, (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()

_GROUPS = {"i": r"\d+", "j": r"\d+", "l": r"\d+", "s": "weight|bias", "e": "encoder|decoder", "q": "[qkv]"}

def _regex(template):  # "{i}" in a name template -> a named group
    return re.compile(re.sub(r"\\\{(\w)\\\}", lambda m: f"(?P<{m[1]}>{_GROUPS[m[1]]})", re.escape(template)))

def _count(keys, pattern):  # number of blocks = 1 + the largest index
    return 1 + max((int(m[1]) for k in keys if (m := re.match(pattern, k))), default=-1)

# ---- Autoencoder: BFL <-> diffusers AutoencoderKL. Pieces of a name are renamed in turn; {l} is a decoder level,
# which diffusers counts from the other end. Mid-block attention q/k/v/proj_out: 1x1 convs in BFL, linears there.

_VAE_RULES = [("{e}.norm_out.", "{e}.conv_norm_out."), (".nin_shortcut.", ".conv_shortcut."),
              ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
              ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
              ("decoder.up.{l}.block.{j}.", "decoder.up_blocks.{l}.resnets.{j}."),
              ("decoder.up.{l}.upsample.", "decoder.up_blocks.{l}.upsamplers.0."),
              (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
              (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
              (".mid.attn_1.{q}.", ".mid_block.attentions.0.to_{q}."),
              (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0.")]
_VAE_REGEX = {True: [(_regex(b), d) for b, d in _VAE_RULES], False: [(_regex(d), b) for b, d in _VAE_RULES]}
_VAE_LEGACY = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

def vae_plan(keys, to_diffusers):
    levels = _count(keys, r"decoder\.up\.(\d+)\." if to_diffusers else r"decoder\.up_blocks\.(\d+)\.")
    to_linear = (lambda x: [x[0].flatten(1)]) if to_diffusers else (lambda x: [x[0][:, :, None, None]])
    plan = []
    for k in keys:  # older diffusers files name the attention layers query/key/value/proj_attn
        out = k if to_diffusers else re.sub(r"\.(query|key|value|proj_attn)\.", lambda m: _VAE_LEGACY[m[0]], k)
        for rx, template in _VAE_REGEX[to_diffusers]:  # diffusers counts the decoder levels {l} from the other end
            out = rx.sub(lambda m: template.format(**{g: levels - 1 - int(v) if g == "l" else v
                                                      for g, v in m.groupdict().items()}), out, count=1)
        conv = re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", k if to_diffusers else out)
        plan.append(([out], to_linear if conv else list, [k]))
    return plan

# ---- Transformer: BFL <-> diffusers FluxTransformer2DModel. {i} = block index, {s} = weight|bias. A BFL tensor with
# several diffusers names is their row-concatenation ("fuse"); "swap": the two row halves are swapped.

_RULES = [("img_in.{s}", ["x_embedder.{s}"]), ("txt_in.{s}", ["context_embedder.{s}"]),
          *[(f"{b}.{io}_layer.{{s}}", [f"time_text_embed.{d}_embedder.linear_{n}.{{s}}"])
            for b, d in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance"))
            for io, n in (("in", 1), ("out", 2))],
          ("double_blocks.{i}.img_mod.lin.{s}", ["transformer_blocks.{i}.norm1.linear.{s}"]),
          ("double_blocks.{i}.txt_mod.lin.{s}", ["transformer_blocks.{i}.norm1_context.linear.{s}"]),
          ("double_blocks.{i}.img_attn.qkv.{s}", [f"transformer_blocks.{{i}}.attn.to_{x}.{{s}}" for x in "qkv"]),
          ("double_blocks.{i}.txt_attn.qkv.{s}", [f"transformer_blocks.{{i}}.attn.add_{x}_proj.{{s}}" for x in "qkv"]),
          *[(f"double_blocks.{{i}}.{x}_attn.norm.{qk}_norm.scale", [f"transformer_blocks.{{i}}.attn.norm_{d}.weight"])
            for x, qk, d in (("img", "query", "q"), ("img", "key", "k"), ("txt", "query", "added_q"),
                             ("txt", "key", "added_k"))],
          ("double_blocks.{i}.img_attn.proj.{s}", ["transformer_blocks.{i}.attn.to_out.0.{s}"]),
          ("double_blocks.{i}.txt_attn.proj.{s}", ["transformer_blocks.{i}.attn.to_add_out.{s}"]),
          *[(f"double_blocks.{{i}}.{x}_mlp.{n}.{{s}}", [f"transformer_blocks.{{i}}.{ff}.net.{d}.{{s}}"])
            for x, ff in (("img", "ff"), ("txt", "ff_context")) for n, d in (("0", "0.proj"), ("2", "2"))],
          ("single_blocks.{i}.modulation.lin.{s}", ["single_transformer_blocks.{i}.norm.linear.{s}"]),
          ("single_blocks.{i}.linear1.{s}", [f"single_transformer_blocks.{{i}}.attn.to_{x}.{{s}}" for x in "qkv"]
           + ["single_transformer_blocks.{i}.proj_mlp.{s}"]),
          *[(f"single_blocks.{{i}}.norm.{qk}_norm.scale", [f"single_transformer_blocks.{{i}}.attn.norm_{qk[0]}.weight"])
            for qk in ("query", "key")],
          ("single_blocks.{i}.linear2.{s}", ["single_transformer_blocks.{i}.proj_out.{s}"]),
          ("final_layer.linear.{s}", ["proj_out.{s}"]),
          ("final_layer.adaLN_modulation.1.{s}", ["norm_out.linear.{s}"], "swap")]
_OPS = [op[0] if op else "fuse" if len(d) > 1 else "copy" for _, d, *op in _RULES]
_BFL2DIF = [(_regex(b), d, op) for (b, d, *_), op in zip(_RULES, _OPS)]  # -> ([diffusers keys], op)
_DIF2BFL = [(_regex(t), [b], j, len(d), op)  # -> ([BFL key], part index, number of parts, op)
            for (b, d, *_), op in zip(_RULES, _OPS) for j, t in enumerate(d)]

def _rename(table, k):  # the first rule that matches all of k -> (its names filled in from the match, *the rest)
    return next((([t.format(**m.groupdict()) for t in names], *rest) for rx, names, *rest in table
                 if (m := rx.fullmatch(k))), None)

# swap: BFL's final adaLN is (shift, scale), diffusers' (scale, shift); its own inverse
_TO_BFL = {"copy": list, "fuse": lambda x: [torch.cat(x, 0)], "swap": lambda x: [torch.cat(x[0].chunk(2)[::-1])]}

def _split(x, n, hidden):  # undoes "fuse": q, k, v have `hidden` rows each, linear1's MLP input the rest
    return list(x[0].tensor_split([hidden, 2 * hidden, 3 * hidden][:n - 1]))

def diffusers_to_bfl_plan(keys, where="?"):  # every part of a fused BFL tensor must be present
    groups = {}  # BFL key -> (op, [diffusers key per part])
    for k in keys:
        if (r := _rename(_DIF2BFL, k)) is None:
            raise ConvertError(f"{where}: unexpected key {k!r} (no BFL equivalent)")
        groups.setdefault(r[0][0], (r[3], [None] * r[2]))[1][r[1]] = k
    for bfl, (op, parts) in groups.items():
        if None in parts:
            raise ConvertError(f"{where}: missing key {_rename(_BFL2DIF, bfl)[0][parts.index(None)]!r} (needed "
                               f"with {[p for p in parts if p]} to build {bfl!r})")
    return [([bfl], _TO_BFL[op], parts) for bfl, (op, parts) in groups.items()]

def bfl_to_diffusers_plan(keys, hidden, where="?"):
    plan = []
    for k in keys:
        if (r := _rename(_BFL2DIF, k)) is None:
            raise ConvertError(f"{where}: key {k!r} has no diffusers equivalent")
        fn = partial(_split, n=len(r[0]), hidden=hidden) if r[1] == "fuse" else _TO_BFL[r[1]]  # swap: own inverse
        plan.append((r[0], fn, [k]))
    return plan

# ---- Config inference and validation. `hint` (our metadata or diffusers' config.json) gives what the weights lack:
# Flux's axes_dim (else a preset's with that head_dim, else 1:7:7) and theta, the AE's scale/shift and norm groups.

def infer_flux_config(shapes, hint=None):
    hint, hidden = hint or {}, shapes["img_in.weight"][0]
    depth, single = (_count(shapes, rf"{n}\.(\d+)\.") for n in ("double_blocks", "single_blocks"))
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = shapes[norm][0]  # the per-head QK-norm size is the only place the head count shows
    mlp = (shapes["double_blocks.0.img_mlp.0.weight"][0] if depth
           else shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden)
    preset = next((p.axes_dim for p in model.PRESETS.values() if sum(p.axes_dim) == head_dim), None)
    b = 2 * ((7 * head_dim // 16) // 2)
    axes = hint.get("axes_dim") or hint.get("axes_dims_rope") or ()  # ours, diffusers'
    axes = axes if sum(axes) == head_dim else preset or (head_dim - 2 * b, b, b)
    return model.FluxConfig(
        in_channels=shapes["img_in.weight"][1], out_channels=shapes["final_layer.linear.weight"][0],
        vec_in_dim=shapes["vector_in.in_layer.weight"][1], context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden, mlp_ratio=mlp / hidden, num_heads=hidden // head_dim, depth=depth,
        depth_single_blocks=single, axes_dim=tuple(axes), theta=hint.get("theta") or 10_000,
        guidance_embed="guidance_in.in_layer.weight" in shapes, step_embed="step_in.in_layer.weight" in shapes,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes if depth else True)

def infer_ae_config(shapes, hint=None):
    hint, ch = hint or {}, shapes["encoder.conv_in.weight"][0]
    names = (("scale_factor", "scaling_factor"), ("shift_factor", "shift_factor"), ("norm_groups", "norm_num_groups"),
             ("resolution", "resolution"))  # ours, diffusers'
    return model.AutoEncoderConfig(
        ch=ch, in_channels=shapes["encoder.conv_in.weight"][1], z_channels=shapes["decoder.conv_in.weight"][1],
        out_ch=shapes["decoder.conv_out.weight"][0], num_res_blocks=_count(shapes, r"encoder\.down\.0\.block\.(\d+)"),
        ch_mult=tuple(shapes[f"encoder.down.{l}.block.0.conv1.weight"][0] // ch
                      for l in range(_count(shapes, r"encoder\.down\.(\d+)\."))),
        **{ours: v for ours, dif in names if (v := hint.get(ours, hint.get(dif))) is not None})

def checkpoint_plan(path, formats=("bfl", "diffusers", "bfl-ae", "diffusers-vae")):
    """-> (format, source, plan of BFL names in model order, config), checked against the model built on meta."""
    fmt, src, hint = open_checkpoint(path)
    if fmt not in formats:
        raise ConvertError(f"{path}: detected format {fmt}, expected {' or '.join(formats)}")
    where = f"{path} (detected format: {fmt})"
    plan = (diffusers_to_bfl_plan(list(src), where) if fmt == "diffusers" else vae_plan(list(src), False)
            if fmt == "diffusers-vae" else [([k], list, [k]) for k in src])
    shapes = {}
    for outs, fn, keys in plan:  # group by group, so a bad fusion names its keys
        metas = [_meta(src, k) for k in keys]
        try:
            shapes.update({o: tuple(t.shape) for o, t in zip(outs, fn(metas))})
        except RuntimeError as e:
            raise ConvertError(f"{where}: cannot combine {keys}: {e}") from None
    infer, cls = (infer_ae_config, model.AutoEncoder) if fmt.endswith("ae") else (infer_flux_config, model.Flux)
    try:  # KeyError: a key needed to infer the config is missing; also wrong ranks, a head count that does not divide
        cfg = infer(shapes, hint)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    except Exception as e:
        raise ConvertError(f"{where}: cannot infer a valid config from the tensor shapes: {e!r}") from None
    problems = [f"missing key {k!r} (expected shape {s})" for k, s in expected.items() if k not in shapes]
    problems += [f"unexpected key {k!r} (shape {s})" for k, s in shapes.items() if k not in expected]
    problems += [f"wrong shape for {k!r}: expected {expected[k]}, found {s}"
                 for k, s in shapes.items() if k in expected and s != expected[k]]
    if problems:
        more = f" (+{len(problems) - 5} more problems)" if len(problems) > 5 else ""
        raise ConvertError(f"{where}: " + "; ".join(problems[:5]) + more)
    order = {k: i for i, k in enumerate(expected)}
    return fmt, src, sorted(plan, key=lambda g: order[g[0][0]]), cfg

# ---- Format detection, the readers and the model loaders

_FORMATS = {  # the first format with a key that starts with one of its prefixes
    "bfl": tuple({b[:b.index(".") + 1] for b, *_ in _RULES}),
    "diffusers": tuple({t[:t.index(".") + 1] for _, d, *_ in _RULES for t in d}),
    "bfl-ae": ("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid."),
    "diffusers-vae": ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")}

def _folder_files(path):
    """A diffusers model folder (or a pipeline root with transformer/) -> (its shards, its config.json or None)."""
    path = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
    names = sorted(os.listdir(path))
    if index := [n for n in names if n.endswith(".safetensors.index.json")]:
        shards = sorted(set(json.loads(Path(path, index[0]).read_text())["weight_map"].values()))
        if missing := [s for s in shards if s not in names]:
            raise ConvertError(f"{path}: {index[0]} lists shard {missing[0]!r}, which is not in the folder")
    else:
        shards = ([n for n in names if n == "diffusion_pytorch_model.safetensors"]
                  or [n for n in names if n.endswith(".safetensors")])
        if len(shards) != 1:
            pickles = [n for n in names if n.endswith((".bin", ".pt", ".ckpt", ".pth"))]
            raise ConvertError(f"{path}: expected one .safetensors file or an index json, found {shards or 'none'}"
                               + (f" (refusing pickle files {pickles})" if pickles else ""))
    hint = json.loads(Path(path, "config.json").read_text()) if "config.json" in names else None
    return [os.path.join(path, s) for s in shards], hint

def open_checkpoint(path):
    """-> (format, source, config hint); formats: bfl, diffusers, bfl-ae, diffusers-vae, lora-ours/-diffusers/-kohya"""
    if not os.path.exists(path):
        raise ConvertError(f"{path}: no such file or folder")
    files, hint = _folder_files(path) if os.path.isdir(path) else ([path], None)
    src, metadata = open_files(files)
    hint = hint or (json.loads(metadata["config"]) if "config" in metadata else None)
    fmt = next((f for f, prefixes in _FORMATS.items() if any(k.startswith(prefixes) for k in src)), None)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in src):
        fmt = "lora-kohya"
    elif any(".lora_A." in k or ".lora_B." in k for k in src):
        fmt = "lora-ours" if fmt == "bfl" else "lora-diffusers"
    if fmt is None:
        raise ConvertError(f"{path}: unknown format: {len(src)} tensors, e.g. {sorted(src)[:4]}; expected a BFL or "
                           "diffusers transformer (img_in.*, double_blocks.* / x_embedder.*, transformer_blocks.*), "
                           "an AE (encoder.down.* / encoder.down_blocks.*) or a LoRA (*.lora_A.weight, *.lora_down.*)")
    return fmt, src, hint

def read_flux(path, dtype=None, formats=("bfl", "diffusers")):
    """Our/BFL transformer file or a diffusers folder -> (FluxConfig, iterator of (BFL name, tensor) in model order,
    read one tensor group at a time). Floating tensors are cast to dtype unless it is None."""
    _, src, plan, cfg = checkpoint_plan(path, formats)
    return cfg, run_plan(plan, partial(_get, src), dtype)

# our/BFL ae.safetensors or a diffusers vae folder -> (AutoEncoderConfig, iterator of (BFL name, tensor))
read_ae = partial(read_flux, formats=("bfl-ae", "diffusers-vae"))

def _build(cls, cfg, tensors, device):  # built on the meta device, each tensor assigned as it is read
    with torch.device("meta"):
        net = cls(cfg)
    net.load_state_dict({k: t.to(device) for k, t in tensors}, strict=True, assign=True)
    return net

def load_transformer(path, device="cpu", dtype=torch.float32, lora=None, lora_scale=1.0, merge=False):
    """The one model loader: a train.py export, BFL file or diffusers folder; optionally a LoRA file (ours,
    diffusers/PEFT or kohya), kept as a separate branch scaled by lora_scale, or merged into the weights."""
    net = _build(model.Flux, *read_flux(path, dtype), device)
    if lora:
        lora_sd, _ = load_lora(lora)
        model.load_lora_state_dict(net, {k: v.to(device, dtype) for k, v in lora_sd.items()}, source=lora)
        model.set_lora_scale(net, lora_scale)
        if merge:
            model.merge_lora(net)
    return net.eval().requires_grad_(False)

def load_ae(path, device="cpu", dtype=torch.float32):
    return _build(model.AutoEncoder, *read_ae(path, dtype), device).eval().requires_grad_(False)

# ---- Whole-checkpoint conversion (streaming)

def _diffusers_config(cfg):
    if isinstance(cfg, model.AutoEncoderConfig):
        n = len(cfg.ch_mult)
        return dict(_class_name="AutoencoderKL", in_channels=cfg.in_channels, out_channels=cfg.out_ch, act_fn="silu",
                    block_out_channels=[cfg.ch * m for m in cfg.ch_mult], down_block_types=["DownEncoderBlock2D"] * n,
                    up_block_types=["UpDecoderBlock2D"] * n, layers_per_block=cfg.num_res_blocks, use_quant_conv=False,
                    latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scale_factor,
                    shift_factor=cfg.shift_factor, use_post_quant_conv=False, mid_block_add_attention=True)
    if cfg.mlp_ratio != 4.0 or not cfg.qkv_bias or cfg.step_embed:
        raise ConvertError(f"diffusers FluxTransformer2DModel hard-codes mlp_ratio 4 and qkv bias, and has no "
                           f"step-size input (step_embed); config {cfg}")
    return dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=cfg.in_channels,
                out_channels=cfg.out_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
                attention_head_dim=cfg.hidden_size // cfg.num_heads, num_attention_heads=cfg.num_heads,
                joint_attention_dim=cfg.context_in_dim, pooled_projection_dim=cfg.vec_in_dim,
                guidance_embeds=cfg.guidance_embed, axes_dims_rope=list(cfg.axes_dim))

def convert(src_path, out_path, to="ours", dtype=None, progress=False):
    """Transformer or AE checkpoint, any supported layout -> our single file (to='ours') or a diffusers folder."""
    fmt, src, plan, cfg = checkpoint_plan(src_path)
    meta = {"format": "flux-bfl", "model": "ae" if fmt.endswith("ae") else "flux", "config": json.dumps(asdict(cfg))}
    if to == "diffusers":  # compose with the BFL -> diffusers split, still one group at a time
        config, meta, names = _diffusers_config(cfg), {"format": "pt"}, [g[0][0] for g in plan]
        post = vae_plan(names, True) if fmt.endswith("ae") else bfl_to_diffusers_plan(names, cfg.hidden_size)
        plan = [(outs, lambda x, fn=fn, f2=f2: f2(fn(x)), keys) for (_, fn, keys), (outs, f2, _) in zip(plan, post)]
        os.makedirs(out_path, exist_ok=True)
    path = os.path.join(out_path, "diffusion_pytorch_model.safetensors") if to == "diffusers" else out_path
    metas = dict(run_plan(plan, partial(_meta, src), dtype))
    plan = tqdm(plan, unit="group", desc="converting", disable=not progress)
    write_safetensors(path, metas, run_plan(plan, partial(_get, src), dtype), meta)
    if to == "diffusers":
        Path(out_path, "config.json").write_text(json.dumps(config, indent=2))
    return fmt, cfg

# ---- LoRA files. Ours (= model.lora_state_dict): '<BFL module>.lora_A.weight' (r, in), '.lora_B.weight' (out, r),
# '.alpha'; delta W = alpha/r * B @ A. kohya: 'lora_unet_<module, _ for .>.lora_down/up.weight'. diffusers: see below.

_KOHYA = [(_regex("lora_unet_" + b[:-4].replace(".", "_")), [b[:-4]], 0, 1, "copy")  # kohya names lose the dots
          for b, *_ in _RULES if b.endswith(".{s}")]
_LORA_KINDS = {"lora_A.weight": 0, "lora_down.weight": 0, "lora_B.weight": 1, "lora_up.weight": 1, "alpha": 2}

def _fold(b, scale):  # alpha/r folded into B, so that alpha = r
    return b if scale == 1 else (b.float() * scale).to(b.dtype)

def load_lora(path):
    """Any supported LoRA file -> (our LoRA state dict, detected format); alpha defaults to the rank. diffusers/PEFT
    parts of one fused BFL linear are re-fused exactly: one shared A is kept and the Bs stacked (fused layout), else
    one adapter per part (split layout: As stacked, ranks zero-padded to the largest). A part without a LoRA: zeros."""
    fmt, src, _ = open_checkpoint(path)
    if not fmt.startswith("lora"):
        raise ConvertError(f"{path}: detected format {fmt}, not a LoRA")
    parts, part_of = {}, {}  # BFL module -> (parts, op, {file's module: [A, B, alpha]}); file's module -> its part
    for k in src:
        found = re.fullmatch(rf"(.+)\.({'|'.join(map(re.escape, _LORA_KINDS))})", k)
        name = found[1] if found else k
        r = found and (([name], 0, 1, "copy") if fmt == "lora-ours" else _rename(_KOHYA, name) if fmt == "lora-kohya"
                       else _rename(_DIF2BFL, name.removeprefix("transformer.") + ".weight"))
        if not r:
            raise ConvertError(f"{path}: {k!r} is not a transformer LoRA tensor of the {fmt} layout (expected "
                               "<module>.lora_A.weight/.lora_B.weight/.alpha; kohya: lora_unet_*.lora_down.weight/...)")
        group = parts.setdefault(r[0][0].removesuffix(".weight"), (r[2], r[3], {}))[2]
        group.setdefault(name, [None] * 3)[_LORA_KINDS[found[2]]] = _get(src, k)
        part_of[name] = r[1]
    sd = {}
    for m, (n, op, got) in parts.items():
        A, B = {}, {}
        for name, (a, b, alpha) in got.items():
            if a is None or b is None or (a.shape[0] % b.shape[1] if fmt == "lora-ours" else a.shape[0] != b.shape[1]):
                raise ConvertError(f"{path}: LoRA module {name!r} needs lora_A (r, in) and lora_B (out, r), found "
                                   f"{[None if t is None else tuple(t.shape) for t in (a, b)]}")
            alpha = float(b.shape[1] if alpha is None else alpha)
            A[part_of[name]], B[part_of[name]] = a, b if n == 1 else _fold(b, alpha / b.shape[1])  # stackable Bs
        a0 = A[min(A)]
        if any(a.shape[1] != a0.shape[1] for a in A.values()):
            raise ConvertError(f"{path}: the parts of {m!r} have LoRAs with different input sizes")
        same, r = all(torch.equal(a, a0) for a in A.values()), max(b.shape[1] for b in B.values())
        pad = torch.nn.functional.pad
        Bs = [pad(B[j], (0, r - B[j].shape[1])) if j in B else a0.new_zeros(a0.shape[1] * (4 if j == 3 else 1), r)
              for j in range(n)]
        As = [pad(A[j], (0, 0, 0, r - A[j].shape[0])) if j in A else a0.new_zeros(r, a0.shape[1]) for j in range(n)]
        sd.update({f"{m}.lora_A.weight": a0 if same else torch.cat(As, 0),
                   f"{m}.lora_B.weight": _TO_BFL[op]([torch.cat(Bs, 0)])[0],
                   f"{m}.alpha": torch.tensor(alpha if n == 1 else float(r))})  # folded: alpha = rank
    return sd, fmt

def convert_lora(src_path, out_path, to="ours"):
    """Any LoRA file -> ours, kohya or diffusers/PEFT (on the split diffusers linears: alpha/r folded into B, as PEFT
    loads it with alpha = r; B split by rows like the weight, each part with its own A or the shared one)."""
    sd, fmt = load_lora(src_path)
    out = dict(sd) if to == "ours" else {}
    for m in [k.removesuffix(".alpha") for k in sd if k.endswith(".alpha")]:
        a, b, alpha = sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"], sd[f"{m}.alpha"]
        n = a.shape[0] // b.shape[1]  # adapters: 1, or one per part of a fused BFL linear (split layout)
        if to == "kohya":  # one adapter per BFL linear: a split LoRA exactly as rank n*r with B block-diagonal
            b, alpha = (torch.block_diag(*_split([b], n, a.shape[1])), alpha * n) if n > 1 else (b, alpha)
            name = "lora_unet_" + m.replace(".", "_")
            out.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": alpha})
        elif to == "diffusers":
            [(dif, split, _)] = bfl_to_diffusers_plan([m + ".weight"], a.shape[1], src_path)
            for j, (d, bj) in enumerate(zip(dif, split([_fold(b, float(alpha) / b.shape[1])]))):
                out.update({f"transformer.{d[:-7]}.lora_A.weight": a.chunk(n)[j % n],
                            f"transformer.{d[:-7]}.lora_B.weight": bj})
    write_dict(out_path, {k: v.contiguous() for k, v in out.items()}, {"format": "flux-lora" if to == "ours" else "pt"})
    return fmt

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a .safetensors file or a diffusers folder (model folder or pipeline root)")
    p.add_argument("out", nargs="?", help="output .safetensors file (or folder with --to diffusers)")
    p.add_argument("--to", choices=["ours", "diffusers", "kohya"], default="ours", help="target (kohya: LoRA only)")
    p.add_argument("--lora", action="store_true", help="the source is a LoRA (ours, diffusers/PEFT or kohya)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors (default: keep)")
    p.add_argument("--info", action="store_true", help="only print the detected format and config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    fmt, src, _ = open_checkpoint(args.src)
    print(f"{args.src}: detected {fmt} ({len(src)} tensors)")
    if args.info and fmt.startswith("lora"):
        ranks = [v.shape[1] for k, v in load_lora(args.src)[0].items() if k.endswith(".lora_B.weight")]
        print(f"{len(ranks)} LoRA'd linears, ranks {sorted(set(ranks))}")
    elif args.info:
        print(checkpoint_plan(args.src)[3])
    elif args.out is None:
        p.error("OUT is required unless --info")
    elif args.lora or fmt.startswith("lora"):
        print(f"{convert_lora(args.src, args.out, args.to)} -> {args.to}: wrote {args.out}")
    elif args.to == "kohya":
        p.error("--to kohya is for LoRAs only")
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
        print(convert(args.src, args.out, args.to, dtype, progress=not args.quiet)[1], f"\nwrote {args.out}")

if __name__ == "__main__":
    from checks import one_line_errors
    with one_line_errors():  # ConvertError, and an output path that is a folder or cannot be made
        main()
