"""
Convert FLUX.1 weights between BFL (= our format), diffusers and kohya layouts, and load them for train/sample.

    python convert_weights.py SRC OUT                    # transformer or AE, any layout -> our .safetensors
    python convert_weights.py SRC OUT_DIR --to diffusers # -> diffusers folder (config.json + weights)
    python convert_weights.py --lora SRC OUT --to kohya  # LoRA: ours <-> diffusers/PEFT <-> kohya
    python convert_weights.py --info SRC                 # print the detected format and inferred config

Key rules: /work/shared/docs/flux.md §6. Tensors are streamed one group at a time through a hand-written
safetensors reader/writer (plain file reads, no mmap, never a pickle), so converting a 24 GB checkpoint needs
roughly one tensor of RAM, not the whole file.
"""
import argparse
import json
import os
import re
import struct
import sys
from dataclasses import asdict

import torch

# ----------------------------------------------------------------------------------------------------------
# safetensors I/O: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw bytes

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ConvertError(ValueError):
    pass


class SafeFile:
    """Reads one tensor at a time with plain file reads (mmap would keep every touched page in RSS)."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 << 20):
                kind = ("; it looks like a torch.save/pickle checkpoint, which is never unpickled here (pickles can "
                        "run code): re-save it as .safetensors" if head[:2] == b"PK" or head[:1] == b"\x80" else "")
                raise ConvertError(f"{path}: not a safetensors file (it starts with {head!r}){kind}")
            try:
                header = json.loads(f.read(n))
                assert isinstance(header, dict)
            except Exception:
                raise ConvertError(f"{path}: not a safetensors file (header is not a JSON object)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start, self.info = 8 + n, header
        for k, v in header.items():
            b, e = v["data_offsets"]
            if (v["dtype"] not in DTYPES or not 0 <= b <= e or self.data_start + e > size
                    or (e - b) != torch.Size(v["shape"]).numel() * DTYPES[v["dtype"]].itemsize):
                raise ConvertError(f"{path}: corrupt safetensors entry {k!r}: {v}")

    def keys(self):
        return list(self.info)

    def meta(self, k):  # shape/dtype only, no data
        v = self.info[k]
        return torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta")

    def get(self, k, buf=None):
        """buf: optional uint8 scratch tensor to read into (the result is then a view of it)."""
        v = self.info[k]
        b, e = v["data_offsets"]
        buf = torch.empty(e - b, dtype=torch.uint8) if buf is None else buf[: e - b]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b)
            f.readinto(memoryview(buf.numpy()))
        return buf.view(DTYPES[v["dtype"]]).reshape(v["shape"])


class Source:
    """The union of one or more safetensors files (sharded diffusers folders), with an optional key prefix stripped."""

    def __init__(self, paths, strip=()):
        self.files, self.where = [SafeFile(p) for p in paths], {}
        for f in self.files:
            for k in f.keys():
                name = next((k[len(p):] for p in strip if k.startswith(p)), k)
                if name in self.where:
                    raise ConvertError(f"{f.path}: tensor {name!r} is also in {self.where[name][0].path}")
                self.where[name] = (f, k)
        self.metadata = self.files[0].metadata if self.files else {}

    def keys(self):
        return list(self.where)

    def meta(self, k):
        f, key = self.where[k]
        return f.meta(key)

    def get(self, k, buf=None):
        f, key = self.where[k]
        return f.get(key, buf)


# A plan is a list of groups (out_keys, fn, src_keys): fn(list of source tensors) -> list of output tensors.
# Running fn on meta tensors gives the output shapes, so the header can be written before any data is read.

def plan_meta(plan, src):
    return {o: t for outs, fn, keys in plan for o, t in zip(outs, fn([src.meta(k) for k in keys]))}


def run_plan(plan, src, dtype=None, progress=False, reuse=False):
    """Yields (name, tensor) one group at a time. reuse=True reads into scratch buffers, sized once for the largest
    group and overwritten by the next group (streaming writes: no allocation, page faults or RSS growth per tensor)."""
    it, scratch = plan, None
    if reuse and isinstance(src, Source):
        nbytes = lambda k: src.meta(k).numel() * src.meta(k).element_size()  # noqa: E731
        slots = max((len(keys) for _, _, keys in plan), default=0)
        scratch = [torch.empty(max((nbytes(keys[i]) for _, _, keys in plan if i < len(keys)), default=0),
                               dtype=torch.uint8) for i in range(slots)]
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, unit="group", desc="converting")
    for outs, fn, keys in it:
        xs = [src.get(k, scratch[i]) if scratch else src.get(k) for i, k in enumerate(keys)]
        for o, t in zip(outs, fn(xs)):
            yield o, (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()


def write_safetensors(path, plan, src, metadata=None, dtype=None, progress=False):
    """Streaming safetensors writer: header from meta shapes, then tensor bytes in plan order; atomic rename."""
    header, off = {}, 0
    for name, t in plan_meta(plan, src).items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the reference writer pads the header to 8 bytes so data stays aligned
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for name, t in run_plan(plan, src, dtype, progress, reuse=True):
                assert list(t.shape) == header[name]["shape"], name
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # little-endian host assumed
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_dict(path, sd, metadata=None):
    """Small in-memory dicts (LoRAs) through the same writer."""
    src = DictSource(sd)
    write_safetensors(path, [([k], lambda x: x, [k]) for k in sd], src, metadata)


class DictSource:
    def __init__(self, sd):
        self.sd = sd

    def keys(self):
        return list(self.sd)

    def meta(self, k):
        return self.sd[k].to("meta")

    def get(self, k):
        return self.sd[k]


def read_all(path):
    f = SafeFile(path)
    return {k: f.get(k) for k in f.keys()}, f.metadata


# ----------------------------------------------------------------------------------------------------------
# Autoencoder: BFL ae.safetensors <-> diffusers AutoencoderKL (flux.md §6.2)

_VAE_RULES = [  # (BFL regex, diffusers template); the decoder level index is reversed separately
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.{L\1}.resnets.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.{L\1}.upsamplers.0."),
    (r"\.mid\.block_1\.", r".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", r".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", r".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", r".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
]
_VAE_RULES_BACK = [  # diffusers -> BFL; also accepts the legacy diffusers attention names
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{L\1}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{L\1}.upsample."),
    (r"\.mid_block\.resnets\.0\.", r".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", r".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", r".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.(?:to_|)(q|k|v)(?:uery|ey|alue|)\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.", r".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", r".nin_shortcut."),
]
_VAE_ATTN_W = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")  # matched on the BFL name


def _vae_levels(keys, pat):
    return 1 + max((int(m[1]) for k in keys if (m := re.match(pat, k))), default=3)


def vae_key(k, to_diffusers, levels):
    """Rename one AE key; the decoder level index l <-> levels-1-l."""
    for a, b in (_VAE_RULES if to_diffusers else _VAE_RULES_BACK):
        k = re.sub(a, b, k)
    return re.sub(r"\{L(\d+)\}", lambda m: str(levels - 1 - int(m[1])), k)


def _vae_fn(bfl_key, to_diffusers):
    """Mid-block attention q/k/v/proj_out are 1x1 convs in BFL and linears in diffusers."""
    if not _VAE_ATTN_W.search(bfl_key):
        return lambda x: x
    if to_diffusers:
        return lambda x: [x[0][:, :, 0, 0] if x[0].dim() == 4 else x[0]]
    return lambda x: [x[0][:, :, None, None] if x[0].dim() == 2 else x[0]]


def vae_plan(keys, to_diffusers):
    levels = _vae_levels(keys, r"decoder\.up\.(\d+)\." if to_diffusers else r"decoder\.up_blocks\.(\d+)\.")
    plan = []
    for k in keys:
        out = vae_key(k, to_diffusers, levels)
        plan.append(([out], _vae_fn(k if to_diffusers else out, to_diffusers), [k]))
    return plan


def vae_bfl_to_diffusers(sd):
    return {o: t for o, t in run_plan(vae_plan(list(sd), True), DictSource(sd))}


def vae_diffusers_to_bfl(sd):
    return {o: t for o, t in run_plan(vae_plan(list(sd), False), DictSource(sd))}


# ----------------------------------------------------------------------------------------------------------
# Transformer: BFL <-> diffusers FluxTransformer2DModel (flux.md §6.1, §2.13). {i} = block index, {s} = weight|bias.
# "fuse": one BFL tensor = row-concatenation of the diffusers ones; "swap": the two row halves are swapped.

_RULES = [
    ("img_in.{s}", ["x_embedder.{s}"]),
    ("txt_in.{s}", ["context_embedder.{s}"]),
    ("time_in.in_layer.{s}", ["time_text_embed.timestep_embedder.linear_1.{s}"]),
    ("time_in.out_layer.{s}", ["time_text_embed.timestep_embedder.linear_2.{s}"]),
    ("vector_in.in_layer.{s}", ["time_text_embed.text_embedder.linear_1.{s}"]),
    ("vector_in.out_layer.{s}", ["time_text_embed.text_embedder.linear_2.{s}"]),
    ("guidance_in.in_layer.{s}", ["time_text_embed.guidance_embedder.linear_1.{s}"]),
    ("guidance_in.out_layer.{s}", ["time_text_embed.guidance_embedder.linear_2.{s}"]),
    ("double_blocks.{i}.img_mod.lin.{s}", ["transformer_blocks.{i}.norm1.linear.{s}"]),
    ("double_blocks.{i}.txt_mod.lin.{s}", ["transformer_blocks.{i}.norm1_context.linear.{s}"]),
    ("double_blocks.{i}.img_attn.qkv.{s}", [f"transformer_blocks.{{i}}.attn.to_{x}.{{s}}" for x in "qkv"], "fuse"),
    ("double_blocks.{i}.txt_attn.qkv.{s}", [f"transformer_blocks.{{i}}.attn.add_{x}_proj.{{s}}" for x in "qkv"],
     "fuse"),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", ["transformer_blocks.{i}.attn.norm_q.weight"]),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", ["transformer_blocks.{i}.attn.norm_k.weight"]),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", ["transformer_blocks.{i}.attn.norm_added_q.weight"]),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", ["transformer_blocks.{i}.attn.norm_added_k.weight"]),
    ("double_blocks.{i}.img_attn.proj.{s}", ["transformer_blocks.{i}.attn.to_out.0.{s}"]),
    ("double_blocks.{i}.txt_attn.proj.{s}", ["transformer_blocks.{i}.attn.to_add_out.{s}"]),
    ("double_blocks.{i}.img_mlp.0.{s}", ["transformer_blocks.{i}.ff.net.0.proj.{s}"]),
    ("double_blocks.{i}.img_mlp.2.{s}", ["transformer_blocks.{i}.ff.net.2.{s}"]),
    ("double_blocks.{i}.txt_mlp.0.{s}", ["transformer_blocks.{i}.ff_context.net.0.proj.{s}"]),
    ("double_blocks.{i}.txt_mlp.2.{s}", ["transformer_blocks.{i}.ff_context.net.2.{s}"]),
    ("single_blocks.{i}.modulation.lin.{s}", ["single_transformer_blocks.{i}.norm.linear.{s}"]),
    ("single_blocks.{i}.linear1.{s}", [f"single_transformer_blocks.{{i}}.attn.to_{x}.{{s}}" for x in "qkv"]
     + ["single_transformer_blocks.{i}.proj_mlp.{s}"], "fuse"),
    ("single_blocks.{i}.norm.query_norm.scale", ["single_transformer_blocks.{i}.attn.norm_q.weight"]),
    ("single_blocks.{i}.norm.key_norm.scale", ["single_transformer_blocks.{i}.attn.norm_k.weight"]),
    ("single_blocks.{i}.linear2.{s}", ["single_transformer_blocks.{i}.proj_out.{s}"]),
    ("final_layer.linear.{s}", ["proj_out.{s}"]),
    ("final_layer.adaLN_modulation.1.{s}", ["norm_out.linear.{s}"], "swap"),
]


def _regex(template):
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", r"(?P<s>weight|bias)"))


_BFL2DIF = [(_regex(b), d, (r + ["copy"])[0]) for b, d, *r in _RULES]
_DIF2BFL = [(_regex(t), b, j, len(d), (r + ["copy"])[0]) for b, d, *r in _RULES for j, t in enumerate(d)]


def bfl_to_diffusers_key(k):
    """BFL key -> ([diffusers keys], op) or None."""
    for rx, dif, op in _BFL2DIF:
        if m := rx.fullmatch(k):
            return [t.format(**m.groupdict()) for t in dif], op
    return None


def diffusers_to_bfl_key(k):
    """diffusers key -> (BFL key, part index, number of parts, op) or None."""
    for rx, bfl, j, n, op in _DIF2BFL:
        if m := rx.fullmatch(k):
            return bfl.format(**m.groupdict()), j, n, op
    return None


def _swap(t):  # BFL final adaLN is (shift, scale), diffusers (scale, shift); its own inverse
    a, b = t.chunk(2, 0)
    return torch.cat([b, a], 0)


def _ident(x):
    return x


_TO_BFL = {"copy": _ident, "fuse": lambda x: [torch.cat(x, 0)], "swap": lambda x: [_swap(x[0])]}


def _split(t, n, hidden):
    """Undo a row fusion: qkv = 3 equal parts; linear1 = q, k, v (hidden rows each) + the MLP input."""
    return list(t.chunk(3, 0)) if n == 3 else list(t.split([hidden] * 3 + [t.shape[0] - 3 * hidden], 0))


def diffusers_to_bfl_plan(keys, where="?"):
    """Groups diffusers keys by the BFL key they form; every part of a fused tensor must be present."""
    groups = {}  # BFL key -> (op, [diffusers key per part])
    for k in keys:
        if (r := diffusers_to_bfl_key(k)) is None:
            raise ConvertError(f"{where} (detected format: diffusers): unexpected key {k!r} (no BFL equivalent)")
        bfl, j, n, op = r
        groups.setdefault(bfl, (op, [None] * n))[1][j] = k
    for bfl, (op, parts) in groups.items():
        if None in parts:
            missing = bfl_to_diffusers_key(bfl)[0][parts.index(None)]
            raise ConvertError(f"{where} (detected format: diffusers): missing key {missing!r} "
                               f"(needed with {[p for p in parts if p]} to build {bfl!r})")
    return [([bfl], _TO_BFL[op], parts) for bfl, (op, parts) in groups.items()]


def bfl_to_diffusers_plan(keys, hidden, where="?"):
    plan = []
    for k in keys:
        if (r := bfl_to_diffusers_key(k)) is None:
            raise ConvertError(f"{where}: key {k!r} has no diffusers equivalent")
        dif, op = r
        fn = (lambda x, n=len(dif): _split(x[0], n, hidden)) if op == "fuse" else _TO_BFL[op]  # swap: own inverse
        plan.append((dif, fn, [k]))
    return plan


# ----- config inference and validation -----

def _count(keys, pattern):  # number of blocks = 1 + the largest index
    return 1 + max((int(m[1]) for k in keys if (m := re.match(pattern, k))), default=-1)


def infer_flux_config(shapes, hint=None, where="?"):
    """FluxConfig from BFL key -> shape. axes_dim and theta are not in the weights: taken from `hint` (file metadata
    or diffusers config.json), else from a preset with the same head_dim, else split head_dim like Flux (1:7:7)."""
    import model

    def shape(k):
        if k not in shapes:
            raise ConvertError(f"{where}: missing key {k!r}, needed to infer the model config")
        return shapes[k]

    hidden, in_ch = shape("img_in.weight")
    depth, single = (_count(shapes, rf"{n}\.(\d+)\.") for n in ("double_blocks", "single_blocks"))
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = shape(norm)[0]  # the per-head QK-norm size is the only place the head count shows
    mlp = (shape("double_blocks.0.img_mlp.0.weight")[0] if depth
           else shape("single_blocks.0.linear1.weight")[0] - 3 * hidden)
    cfg = dict(in_channels=in_ch, out_channels=shape("final_layer.linear.weight")[0],
               vec_in_dim=shape("vector_in.in_layer.weight")[1], context_in_dim=shape("txt_in.weight")[1],
               hidden_size=hidden, mlp_ratio=mlp / hidden, num_heads=hidden // head_dim, depth=depth,
               depth_single_blocks=single, guidance_embed="guidance_in.in_layer.weight" in shapes,
               qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes if depth else True)
    preset = next((p for p in model.PRESETS.values() if sum(p.axes_dim) == head_dim), None)
    b = 2 * ((7 * head_dim // 16) // 2)
    cfg["axes_dim"], cfg["theta"] = tuple(preset.axes_dim) if preset else (head_dim - 2 * b, b, b), 10_000
    for k in ("axes_dim", "theta"):
        if hint and hint.get(k) is not None and (k != "axes_dim" or sum(hint[k]) == head_dim):
            cfg[k] = tuple(hint[k]) if k == "axes_dim" else hint[k]
    return model.FluxConfig(**cfg)


def validate(got, expected, fmt, where):
    """got/expected: name -> shape. Raises naming the first offending keys, the file and the detected format."""
    problems = [f"missing key {k!r} (expected shape {tuple(s)})" for k, s in expected.items() if k not in got]
    problems += [f"unexpected key {k!r} (shape {tuple(s)})" for k, s in got.items() if k not in expected]
    problems += [f"wrong shape for {k!r}: expected {tuple(expected[k])}, found {tuple(s)}"
                 for k, s in got.items() if k in expected and tuple(s) != tuple(expected[k])]
    if problems:
        more = f" (+{len(problems) - 5} more problems)" if len(problems) > 5 else ""
        raise ConvertError(f"{where} (detected format: {fmt}): " + "; ".join(problems[:5]) + more)


def expected_shapes(cls, cfg, where="?"):
    """Parameter shapes of model.Flux / model.AutoEncoder built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            m = cls(cfg)
    except Exception as e:  # e.g. a hidden size that the inferred head count does not divide
        raise ConvertError(f"{where}: the shapes give an impossible config {cfg}: {e!r}") from None
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def flux_expected_shapes(cfg, where="?"):
    import model
    return expected_shapes(model.Flux, cfg, where)


def _infer(fn, shapes, hint, where):
    try:
        return fn(shapes, hint, where)
    except ConvertError:
        raise
    except Exception as e:  # a key with an unexpected number of dimensions, a zero size, ...
        raise ConvertError(f"{where}: cannot infer the config from the tensor shapes: {e!r}") from None


def _meta_shapes(plan, src, fmt, where):
    shapes = {}
    for outs, fn, keys in plan:  # group by group, so a bad fusion names its keys
        try:
            res = fn([src.meta(k) for k in keys])
        except RuntimeError as e:
            raise ConvertError(f"{where} (detected format: {fmt}): cannot combine {keys} with shapes "
                               f"{[tuple(src.meta(k).shape) for k in keys]}: {e}") from None
        shapes.update({o: tuple(t.shape) for o, t in zip(outs, res)})
    return shapes


def transformer_plan(fmt, src, hint, where):
    """-> (plan producing BFL keys in model order, FluxConfig), validated against Flux(cfg) on the meta device."""
    plan = [([k], _ident, [k]) for k in src.keys()] if fmt == "bfl" else diffusers_to_bfl_plan(src.keys(), where)
    shapes = _meta_shapes(plan, src, fmt, where)
    cfg = _infer(infer_flux_config, shapes, hint, f"{where} (detected format: {fmt})")
    expected = flux_expected_shapes(cfg, f"{where} (detected format: {fmt})")
    validate(shapes, expected, fmt, where)
    order = {k: i for i, k in enumerate(expected)}
    return sorted(plan, key=lambda g: order[g[0][0]]), cfg


# ----- autoencoder config -----

def infer_ae_config(shapes, hint=None, where="?"):
    """AutoEncoderConfig from BFL key -> shape; scale/shift factors and the GroupNorm group count are not in the
    weights: from `hint` (our metadata or diffusers config.json), else the defaults (Flux's values)."""
    import model

    def shape(k):
        if k not in shapes:
            raise ConvertError(f"{where}: missing key {k!r}, needed to infer the AE config")
        return shapes[k]

    ch = shape("encoder.conv_in.weight")[0]
    c = dict(in_channels=shape("encoder.conv_in.weight")[1], ch=ch, out_ch=shape("decoder.conv_out.weight")[0],
             ch_mult=tuple(shape(f"encoder.down.{l}.block.0.conv1.weight")[0] // ch
                           for l in range(_count(shapes, r"encoder\.down\.(\d+)\."))),
             num_res_blocks=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
             z_channels=shape("decoder.conv_in.weight")[1])
    for ours, dif in (("scale_factor", "scaling_factor"), ("shift_factor", "shift_factor"),
                      ("norm_groups", "norm_num_groups"), ("resolution", "resolution")):
        if (hint or {}).get(ours, (hint or {}).get(dif)) is not None:
            c[ours] = hint.get(ours, hint.get(dif))
    return model.AutoEncoderConfig(**c)


def ae_plan(fmt, src, hint, where):
    import model
    plan = [([k], _ident, [k]) for k in src.keys()] if fmt == "bfl-ae" else vae_plan(src.keys(), False)
    shapes = _meta_shapes(plan, src, fmt, where)
    cfg = _infer(infer_ae_config, shapes, hint, f"{where} (detected format: {fmt})")
    expected = expected_shapes(model.AutoEncoder, cfg, f"{where} (detected format: {fmt})")
    validate(shapes, expected, fmt, where)
    return plan, cfg


# ----------------------------------------------------------------------------------------------------------
# Format detection (never unpickles: anything that is not safetensors is refused by SafeFile)

_STRIP = ("model.diffusion_model.",)  # ComfyUI/community single files (flux.md §6.1)
_BFL_TOP = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "double_blocks.", "single_blocks.",
            "final_layer.")


def _folder_files(path):
    """A diffusers model folder (or a pipeline root with transformer/): its shards and its config.json."""
    if os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")
    names = sorted(os.listdir(path))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(path, index[0])) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise ConvertError(f"{path}: {index[0]} lists shard {missing[0]!r}, which is not in the folder")
    else:
        shards = [n for n in names if n.endswith(".safetensors")]
        if len(shards) > 1 and "diffusion_pytorch_model.safetensors" in shards:
            shards = ["diffusion_pytorch_model.safetensors"]
        if len(shards) != 1:
            pickles = [n for n in names if n.endswith((".bin", ".pt", ".ckpt", ".pth"))]
            raise ConvertError(f"{path}: expected one .safetensors file or an index json, found {shards or 'none'}"
                               + (f" (refusing pickle files {pickles})" if pickles else ""))
    hint = None
    if os.path.exists(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            hint = json.load(f)
        if "axes_dims_rope" in hint:
            hint["axes_dim"] = hint["axes_dims_rope"]
    return [os.path.join(path, s) for s in shards], hint


def _detect_keys(keys, where):
    def has(pred):
        return any(pred(k) for k in keys)
    if has(lambda k: k.endswith((".lora_down.weight", ".lora_up.weight"))):
        return "lora-kohya"
    if has(lambda k: ".lora_A." in k or ".lora_B." in k):
        return "lora-ours" if has(lambda k: k.startswith(_BFL_TOP)) else "lora-diffusers"
    if has(lambda k: k.startswith(_BFL_TOP)):
        return "bfl"
    if has(lambda k: k.startswith(("x_embedder.", "transformer_blocks.", "single_transformer_blocks.",
                                   "time_text_embed.", "context_embedder."))):
        return "diffusers"
    if has(lambda k: k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid."))):
        return "bfl-ae"
    if has(lambda k: k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block."))):
        return "diffusers-vae"
    raise ConvertError(f"{where}: unknown format: {len(keys)} tensors, e.g. {sorted(keys)[:4]}; expected a BFL "
                       "transformer (img_in.weight, double_blocks.*), a diffusers transformer (x_embedder.weight, "
                       "transformer_blocks.*), an AE (encoder.down.* / encoder.down_blocks.*) or a LoRA "
                       "(*.lora_A.weight / *.lora_down.weight)")


def open_source(path):
    """-> (format, Source, hint dict or None)."""
    if not os.path.exists(path):
        raise ConvertError(f"{path}: no such file or folder")
    files, hint = _folder_files(path) if os.path.isdir(path) else ([path], None)
    src = Source(files, strip=_STRIP)
    if hint is None and "config" in src.metadata:
        hint = json.loads(src.metadata["config"])
    return _detect_keys(src.keys(), path), src, hint


def detect_format(path):
    """One of: bfl, diffusers (transformer), bfl-ae, diffusers-vae, lora-ours, lora-diffusers, lora-kohya."""
    return open_source(path)[0]


# ----------------------------------------------------------------------------------------------------------
# Loaders for train.py / sample.py (validated, BFL keys)

def load_flux_state_dict(path, dtype=None, device=None):
    """A BFL/our file or a diffusers folder -> (state dict with BFL keys, FluxConfig). With device='cuda' each
    tensor moves to the GPU as soon as it is read, so host memory holds one tensor at a time."""
    fmt, src, hint = open_source(path)
    if fmt not in ("bfl", "diffusers"):
        raise ConvertError(f"{path}: detected format {fmt}, expected a transformer checkpoint (bfl or diffusers)")
    plan, cfg = transformer_plan(fmt, src, hint, path)
    return {k: t.to(device) for k, t in run_plan(plan, src, dtype)}, cfg


def load_ae_state_dict(path, dtype=None, device=None):
    """A BFL ae.safetensors / our file or a diffusers vae folder -> (state dict with BFL keys, AutoEncoderConfig)."""
    fmt, src, hint = open_source(path)
    if fmt not in ("bfl-ae", "diffusers-vae"):
        raise ConvertError(f"{path}: detected format {fmt}, expected an autoencoder (bfl-ae or diffusers-vae)")
    plan, cfg = ae_plan(fmt, src, hint, path)
    return {k: t.to(device) for k, t in run_plan(plan, src, dtype)}, cfg


# ----------------------------------------------------------------------------------------------------------
# Whole-checkpoint conversion (streaming)

def _diffusers_transformer_config(cfg):
    if cfg.mlp_ratio != 4.0 or not cfg.qkv_bias:
        raise ConvertError(f"diffusers FluxTransformer2DModel hard-codes mlp_ratio 4 and qkv bias; config {cfg}")
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks,
            "attention_head_dim": cfg.hidden_size // cfg.num_heads, "num_attention_heads": cfg.num_heads,
            "joint_attention_dim": cfg.context_in_dim, "pooled_projection_dim": cfg.vec_in_dim,
            "guidance_embeds": cfg.guidance_embed, "axes_dims_rope": list(cfg.axes_dim)}


def _diffusers_vae_config(cfg):
    c = asdict(cfg)
    n = len(c["ch_mult"])
    return {"_class_name": "AutoencoderKL", "in_channels": c["in_channels"], "out_channels": c["out_ch"],
            "block_out_channels": [c["ch"] * m for m in c["ch_mult"]], "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": c["num_res_blocks"],
            "latent_channels": c["z_channels"], "norm_num_groups": c["norm_groups"], "act_fn": "silu",
            "scaling_factor": c["scale_factor"], "shift_factor": c["shift_factor"],
            "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True}


def convert(src_path, out_path, to="ours", dtype=None, progress=False):
    """Transformer or AE checkpoint, any supported layout -> our single file (to='ours') or a diffusers folder."""
    fmt, src, hint = open_source(src_path)
    if fmt.startswith("lora"):
        raise ConvertError(f"{src_path}: detected format {fmt}; convert LoRAs with --lora")
    is_ae = fmt.endswith(("ae", "vae"))
    plan, cfg = (ae_plan if is_ae else transformer_plan)(fmt, src, hint, src_path)
    if to == "ours":
        meta = {"format": "flux-bfl", "model": "ae" if is_ae else "flux", "config": json.dumps(asdict(cfg))}
        write_safetensors(out_path, plan, src, meta, dtype, progress)
        return fmt, cfg
    # to diffusers: compose the BFL plan with the BFL -> diffusers split, still one group at a time
    if is_ae:
        levels = len(cfg.ch_mult)
        post = {k: ([vae_key(k, True, levels)], _vae_fn(k, True)) for (k,), _, _ in plan}
        config = _diffusers_vae_config(cfg)
    else:
        post = {k: (d, f) for (d, f, (k,)) in bfl_to_diffusers_plan([g[0][0] for g in plan], cfg.hidden_size, src_path)}
        config = _diffusers_transformer_config(cfg)
    plan2 = [(post[o][0], lambda x, fn=fn, f2=post[o][1]: f2(fn(x)), keys) for (o,), fn, keys in plan]
    os.makedirs(out_path, exist_ok=True)
    write_safetensors(os.path.join(out_path, "diffusion_pytorch_model.safetensors"), plan2, src, {"format": "pt"},
                      dtype, progress)
    with open(os.path.join(out_path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return fmt, cfg


# ----------------------------------------------------------------------------------------------------------
# LoRA files. Ours (= model.lora_state_dict): '<bfl module>.lora_A.weight' (r, in), '.lora_B.weight' (out, r),
# '.alpha'; delta W = alpha/r * B @ A. kohya is the same with other names. diffusers/PEFT sits on the split
# diffusers linears, with alpha/r folded into B (PEFT then loads it with alpha = r).

def _lora_groups(sd, where):
    """Ours -> {module: (A, B, alpha)}."""
    g = {}
    for k, v in sd.items():
        for suffix, i in ((".lora_A.weight", 0), (".lora_B.weight", 1), (".alpha", 2)):
            if k.endswith(suffix):
                g.setdefault(k[: -len(suffix)], [None, None, None])[i] = v
                break
        else:
            raise ConvertError(f"{where}: unexpected LoRA key {k!r} (ours has .lora_A.weight/.lora_B.weight/.alpha)")
    for m, (a, b, alpha) in g.items():
        if a is None or b is None or a.shape[0] != b.shape[1]:
            raise ConvertError(f"{where}: LoRA module {m!r} needs lora_A (r, in) and lora_B (out, r), found "
                               f"{None if a is None else tuple(a.shape)} and {None if b is None else tuple(b.shape)}")
        g[m][2] = float(alpha) if alpha is not None else float(a.shape[0])  # alpha defaults to rank
    return g


def _ours(m, a, b, alpha):
    return {f"{m}.lora_A.weight": a, f"{m}.lora_B.weight": b, f"{m}.alpha": torch.tensor(alpha)}


def lora_to_kohya(sd, where="LoRA"):
    out = {}
    for m, (a, b, alpha) in _lora_groups(sd, where).items():
        n = "lora_unet_" + m.replace(".", "_")
        out.update({f"{n}.lora_down.weight": a, f"{n}.lora_up.weight": b, f"{n}.alpha": torch.tensor(alpha)})
    return out


# kohya names lose the dots; rebuild them from the BFL module templates of the rules table
_KOHYA = [(re.compile(re.escape(b[:-4].replace(".", "_")).replace(r"\{i\}", r"(?P<i>\d+)")), b[:-4])
          for b, *_ in _RULES if b.endswith(".{s}")]


def lora_from_kohya(sd, where="LoRA"):
    out = {}
    for k, v in sd.items():
        name, _, kind = k.partition(".")
        if not name.startswith("lora_unet_"):
            raise ConvertError(f"{where}: key {k!r} is not a transformer LoRA (only lora_unet_* is supported)")
        m = next((t.format(**mt.groupdict()) for rx, t in _KOHYA if (mt := rx.fullmatch(name[10:]))), None)
        kind = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}.get(kind)
        if m is None or kind is None:
            raise ConvertError(f"{where}: kohya key {k!r} has no BFL linear equivalent")
        out[f"{m}.{kind}"] = v
    _lora_groups(out, where)  # checks shapes
    return out


def lora_to_diffusers(sd, where="LoRA"):
    """Fused BFL linears are split: A is copied to every part, B is split by rows; alpha/r is folded into B."""
    out = {}
    for m, (a, b, alpha) in _lora_groups(sd, where).items():
        if (r := bfl_to_diffusers_key(m + ".weight")) is None:
            raise ConvertError(f"{where}: LoRA module {m!r} has no diffusers equivalent")
        dif, op = r
        if alpha != a.shape[0]:
            b = (b.float() * (alpha / a.shape[0])).to(b.dtype)
        bs = _split(b, len(dif), a.shape[1]) if op == "fuse" else [_swap(b)] if op == "swap" else [b]
        for d, bj in zip(dif, bs):
            out[f"transformer.{d[:-7]}.lora_A.weight"] = a.clone()
            out[f"transformer.{d[:-7]}.lora_B.weight"] = bj.contiguous()
    return out


def lora_from_diffusers(sd, where="LoRA"):
    """Re-fuse the split parts. If every part has the same A (as our export writes), keep A and stack the Bs:
    exact, rank kept. Otherwise stack the As vertically and make B block-diagonal: also exact, but the rank is the
    sum of the parts' ranks. A part without a LoRA gets zero rows in B. alpha/r is folded into B; alpha = rank."""
    parts = {}
    for k, v in sd.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        mod, _, kind = k.rpartition(".lora_") if ".lora_" in k else (k[:-6], "", "alpha")
        if kind not in ("A.weight", "B.weight", "alpha") or (r := diffusers_to_bfl_key(mod + ".weight")) is None:
            raise ConvertError(f"{where}: diffusers LoRA key {k!r} is not a supported transformer LoRA tensor")
        bfl, j, n, op = r
        slot = parts.setdefault(bfl[:-7], [n, op, {}])[2].setdefault(j, {})
        slot[kind] = v
    out = {}
    for m, (n, op, got) in parts.items():
        A, B = [], []
        for j in sorted(got):
            a, b = got[j].get("A.weight"), got[j].get("B.weight")
            if a is None or b is None or a.shape[0] != b.shape[1] or (A and a.shape[1] != A[0].shape[1]):
                raise ConvertError(f"{where}: part {j} of {m!r} needs lora_A (r, in) and lora_B (out, r) with one "
                                   f"`in` for all parts; found {({k: tuple(v.shape) for k, v in got[j].items()})}")
            alpha = float(got[j].get("alpha", a.shape[0]))
            A.append(a)
            B.append(b if alpha == a.shape[0] else (b.float() * (alpha / a.shape[0])).to(b.dtype))
        # rows of each part; a part without a LoRA: q/k/v have `hidden` rows, proj_mlp 4*hidden (diffusers' mlp_ratio)
        hidden = A[0].shape[1]
        rows = [hidden] * 3 + [4 * hidden] if n == 4 else [B[0].shape[0]] * n
        for j, b in zip(sorted(got), B):
            rows[j] = b.shape[0]
        same = all(torch.equal(a, A[0]) for a in A)
        rank = A[0].shape[0] if same else sum(a.shape[0] for a in A)
        Bf = torch.zeros(sum(rows), rank, dtype=B[0].dtype)
        col = 0
        for j, b in zip(sorted(got), B):
            r0 = sum(rows[:j])
            Bf[r0:r0 + rows[j], col:col + b.shape[1]] = b
            col += 0 if same else b.shape[1]
        Af = A[0] if same else torch.cat(A, 0)
        out.update(_ours(m, Af.contiguous(), _swap(Bf) if op == "swap" else Bf, float(rank)))
    return out


def load_lora(path):
    """Any supported LoRA file -> (our LoRA state dict, detected format)."""
    fmt, src, _ = open_source(path)
    sd = {k: src.get(k) for k in src.keys()}
    if fmt == "lora-ours":
        _lora_groups(sd, path)
        return sd, fmt
    if fmt == "lora-kohya":
        return lora_from_kohya(sd, path), fmt
    if fmt == "lora-diffusers":
        return lora_from_diffusers(sd, path), fmt
    raise ConvertError(f"{path}: detected format {fmt}, not a LoRA")


def convert_lora(src_path, out_path, to="ours"):
    sd, fmt = load_lora(src_path)
    out = {"ours": lambda s: s, "kohya": lora_to_kohya, "diffusers": lora_to_diffusers}[to](sd)
    meta = {"format": "flux-lora"} if to == "ours" else {"format": "pt"}
    write_dict(out_path, {k: v.contiguous() for k, v in out.items()}, meta)
    return fmt


# ----------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = argparse.ArgumentParser(
        description="Convert FLUX.1 transformer / AE / LoRA weights between BFL (= ours), diffusers and kohya "
                    "layouts. The source format is detected from the tensor names; tensors are streamed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  convert_weights.py FLUX.1-dev/transformer flux1-dev.safetensors   # diffusers folder -> ours\n"
               "  convert_weights.py FLUX.1-dev/vae ae.safetensors                  # diffusers vae -> ours\n"
               "  convert_weights.py flux1-dev.safetensors out_dir --to diffusers   # ours -> diffusers folder\n"
               "  convert_weights.py --lora my_lora.safetensors lora_kohya.safetensors --to kohya\n"
               "  convert_weights.py --info some_checkpoint.safetensors")
    p.add_argument("src", help="a .safetensors file or a diffusers folder (model folder or pipeline root)")
    p.add_argument("out", nargs="?", help="output .safetensors file (or folder with --to diffusers)")
    p.add_argument("--to", choices=["ours", "diffusers", "kohya"], default="ours",
                   help="target layout (kohya: LoRA only; default: ours = BFL names)")
    p.add_argument("--lora", action="store_true", help="the source is a LoRA (ours, diffusers/PEFT or kohya)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors (default: keep)")
    p.add_argument("--info", action="store_true", help="only print the detected format and config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    fmt, src, hint = open_source(a.src)
    print(f"{a.src}: detected {fmt} ({len(src.keys())} tensors)")
    if a.info:
        if fmt.startswith("lora"):
            sd, _ = load_lora(a.src)
            ranks = sorted({v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")})
            print(f"{len(sd) // 3} LoRA'd linears, ranks {ranks}")
        else:
            print((ae_plan if fmt.endswith("ae") else transformer_plan)(fmt, src, hint, a.src)[1])
        return
    if a.out is None:
        p.error("OUT is required unless --info")
    if a.lora or fmt.startswith("lora"):
        convert_lora(a.src, a.out, a.to)
    else:
        if a.to == "kohya":
            p.error("--to kohya is for LoRAs only")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(a.dtype)
        _, cfg = convert(a.src, a.out, a.to, dtype, progress=not a.quiet)
        print(cfg)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    try:
        main()
    except ConvertError as e:
        sys.exit(f"error: {e}")
