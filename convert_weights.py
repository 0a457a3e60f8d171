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
from dataclasses import asdict, fields

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
                kind = ("a zip/torch.save pickle" if head[:2] == b"PK" else
                        "a pickle" if head[:1] == b"\x80" else "not safetensors")
                raise ConvertError(f"{path}: not a safetensors file (first bytes {head[:8]!r} look like {kind}); "
                                   "refusing to load it (pickles can run code) - re-save it as .safetensors")
            try:
                header = json.loads(f.read(n))
                assert isinstance(header, dict)
            except Exception:
                raise ConvertError(f"{path}: not a safetensors file (header is not a JSON object)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start, self.info = 8 + n, header
        for k, v in header.items():
            b, e = v["data_offsets"]
            if v["dtype"] not in DTYPES or self.data_start + e > size:
                raise ConvertError(f"{path}: tensor {k!r} has dtype {v['dtype']} / offsets {b}..{e} beyond the file")

    def keys(self):
        return list(self.info)

    def meta(self, k):  # shape/dtype only, no data
        v = self.info[k]
        return torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta")

    def get(self, k):
        v = self.info[k]
        b, e = v["data_offsets"]
        buf = torch.empty(e - b, dtype=torch.uint8)
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
                self.where[name] = (f, k)
        self.metadata = self.files[0].metadata if self.files else {}
        self.path = paths[0] if len(paths) == 1 else os.path.dirname(paths[0])

    def keys(self):
        return list(self.where)

    def meta(self, k):
        f, key = self.where[k]
        return f.meta(key)

    def get(self, k):
        f, key = self.where[k]
        return f.get(key)


# A plan is a list of groups (out_keys, fn, src_keys): fn(list of source tensors) -> list of output tensors.
# Running fn on meta tensors gives the output shapes, so the header can be written before any data is read.

def plan_meta(plan, src):
    return {o: t for outs, fn, keys in plan for o, t in zip(outs, fn([src.meta(k) for k in keys]))}


def run_plan(plan, src, dtype=None, progress=False):
    """Yields (name, tensor) one group at a time."""
    it = plan
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, unit="group", desc="converting")
    for outs, fn, keys in it:
        for o, t in zip(outs, fn([src.get(k) for k in keys])):
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
            for name, t in run_plan(plan, src, dtype, progress):
                assert list(t.shape) == header[name]["shape"], name
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t  # free before reading the next group
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
