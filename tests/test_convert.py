"""convert_weights.py: key maps (docs/method.md section 6), numerics against diffusers, LoRA formats, streaming
memory, bad input.
All CPU, offline; the 12B checks use meta tensors only."""
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_weights
import model
from convert_weights import run_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402


def detected(path):
    return convert_weights.open_checkpoint(path)[0]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------------------
# Full-size presets, shapes only

def bfl_keys_from_table(depth, single, guidance):
    """The BFL key table written out independently of convert_weights: every (module, params) row of the table."""
    wb = lambda m: [f"{m}.weight", f"{m}.bias"]  # noqa: E731
    keys = wb("img_in") + wb("txt_in")
    for e in ["time_in", "vector_in"] + (["guidance_in"] if guidance else []):
        keys += wb(f"{e}.in_layer") + wb(f"{e}.out_layer")
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            for m in ("_mod.lin", "_attn.qkv", "_attn.proj", "_mlp.0", "_mlp.2"):
                keys += wb(p + m)
            keys += [f"{p}_attn.norm.query_norm.scale", f"{p}_attn.norm.key_norm.scale"]
    for j in range(single):
        p = f"single_blocks.{j}"
        keys += wb(f"{p}.modulation.lin") + wb(f"{p}.linear1") + wb(f"{p}.linear2")
        keys += [f"{p}.norm.query_norm.scale", f"{p}.norm.key_norm.scale"]
    return keys + wb("final_layer.linear") + wb("final_layer.adaLN_modulation.1")


@pytest.mark.parametrize("name,params,ntensors", [("flux-dev", 11_901_408_320, 780),
                                                  ("flux-schnell", 11_891_178_560, 776)])
def test_full_size_presets(name, params, ntensors):
    cfg = model.PRESETS[name]
    with torch.device("meta"):
        m = model.Flux(cfg)
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == params
    keys = bfl_keys_from_table(19, 38, cfg.guidance_embed)
    assert len(keys) == len(set(keys)) == len(sd) == ntensors
    assert set(sd) == set(keys)
    table = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
             "double_blocks.0.img_mod.lin.weight": (18432, 3072), "double_blocks.18.txt_attn.qkv.weight": (9216, 3072),
             "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
             "double_blocks.0.img_mlp.2.weight": (3072, 12288), "single_blocks.37.linear1.weight": (21504, 3072),
             "single_blocks.0.linear1.bias": (21504,), "single_blocks.0.linear2.weight": (3072, 15360),
             "single_blocks.0.modulation.lin.weight": (9216, 3072),
             "final_layer.adaLN_modulation.1.weight": (6144, 3072),
             "final_layer.linear.weight": (64, 3072), "vector_in.in_layer.weight": (3072, 768)}
    for k, s in table.items():
        assert tuple(sd[k].shape) == s, k
    # inferred config round trip, and the diffusers key set/shapes equal diffusers' own model (also on meta)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert convert_weights.infer_flux_config(shapes) == cfg
    dif = dict(run_plan(convert_weights.bfl_to_diffusers_plan(list(sd), cfg.hidden_size), sd.get))  # meta tensors
    with torch.device("meta"):
        ref = FluxTransformer2DModel(guidance_embeds=cfg.guidance_embed).state_dict()
    assert {k: tuple(v.shape) for k, v in dif.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    if name == "flux-dev":
        assert len(dif) == 1160
    back = dict(run_plan(convert_weights.diffusers_to_bfl_plan(list(dif)), dif.get))
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes


def test_vae_key_map_full_size():
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=16,
                            use_quant_conv=False, use_post_quant_conv=False)
    sd = vae.state_dict()
    bfl = dict(run_plan(convert_weights.vae_plan(list(sd), False), sd.get))
    assert len(bfl) == 244 and sum(v.numel() for v in bfl.values()) == 83_819_683
    assert tuple(bfl["decoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert tuple(bfl["decoder.up.0.block.2.conv2.weight"].shape) == (128, 128, 3, 3)  # level order reversed
    assert tuple(bfl["decoder.up.1.block.0.nin_shortcut.weight"].shape) == (256, 512, 1, 1)
    assert tuple(bfl["encoder.down.1.block.0.nin_shortcut.weight"].shape) == (256, 128, 1, 1)
    assert "encoder.norm_out.weight" in bfl and "decoder.up.3.upsample.conv.weight" in bfl
    back = dict(run_plan(convert_weights.vae_plan(list(bfl), True), bfl.get))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd.items()}


@torch.no_grad()
def test_vae_folder_round_trip(tmp_path):
    """diffusers vae folder -> our file (CLI) -> model.AutoEncoder equals AutoencoderKL; ours -> diffusers folder."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[16, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=16,
                        norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    for p in vae.parameters():
        p.normal_(0, 0.1).add_(1.0 if p.ndim == 1 else 0.0)  # norms and biases differ, so mix-ups show
    vae.save_pretrained(tmp_path / "vae")
    assert detected(str(tmp_path / "vae")) == "diffusers-vae"
    convert_weights.main([str(tmp_path / "vae"), str(tmp_path / "ae.safetensors"), "--quiet"])
    assert detected(str(tmp_path / "ae.safetensors")) == "bfl-ae"
    cfg, tensors = convert_weights.read_ae(str(tmp_path / "ae.safetensors"))
    sd = dict(tensors)
    assert (cfg.ch, tuple(cfg.ch_mult), cfg.norm_groups, cfg.z_channels) == (16, (1, 2, 4, 4), 8, 16)
    ae = model.AutoEncoder(cfg).eval()
    ae.load_state_dict(sd)
    z = torch.randn(1, 16, 4, 6)
    want = vae.decode(z / 0.3611 + 0.1159).sample
    assert rel(ae.decode(z), want) <= 1e-5
    convert_weights.main([str(tmp_path / "ae.safetensors"), str(tmp_path / "vae2"), "--to", "diffusers", "--quiet"])
    vae2 = AutoencoderKL.from_pretrained(str(tmp_path / "vae2")).eval()
    assert torch.equal(vae2.decode(z / 0.3611 + 0.1159).sample, want)


# ----------------------------------------------------------------------------------------------------------
# Small random diffusers models: forward equality

def small_diffusers(guidance, seed=0):
    torch.manual_seed(seed)
    d = FluxTransformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                               joint_attention_dim=32, pooled_projection_dim=24, in_channels=16,
                               axes_dims_rope=(4, 6, 6), guidance_embeds=guidance)
    with torch.no_grad():
        for p in d.parameters():  # diffusers zero-inits some layers: make every weight matter
            p.normal_(0, 0.1)
    return d.eval()


def inputs(guidance, B=2, h=12, w=8, Lt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    Li = (h // 2) * (w // 2)  # non-square latent, Lt != Li, batch > 1
    return dict(img=torch.randn(B, Li, 16, generator=g), txt=torch.randn(B, Lt, 32, generator=g),
                y=torch.randn(B, 24, generator=g), img_ids=model.make_img_ids(h, w), txt_ids=model.make_txt_ids(Lt),
                t=torch.rand(B, generator=g), guidance=torch.full((B,), 3.5) if guidance else None)


@torch.no_grad()
def run_diffusers(d, x):
    return d(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
             img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample


@torch.no_grad()
def run_ours(m, x):
    return m(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])


def load_ours(path):
    cfg, tensors = convert_weights.read_flux(path)
    m = model.Flux(cfg)
    m.load_state_dict(dict(tensors))
    return m.eval()


@pytest.mark.parametrize("guidance", [True, False])
def test_diffusers_folder_matches(tmp_path, guidance):
    d = small_diffusers(guidance)
    d.save_pretrained(tmp_path / "dif", max_shard_size="40KB")
    assert (tmp_path / "dif" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert detected(str(tmp_path / "dif")) == "diffusers"
    x = inputs(guidance)
    ref = run_diffusers(d, x)

    convert_weights.main([str(tmp_path / "dif"), str(tmp_path / "ours.safetensors"), "--quiet"])  # the CLI path
    assert detected(str(tmp_path / "ours.safetensors")) == "bfl"
    m = load_ours(str(tmp_path / "ours.safetensors"))
    assert m.config.guidance_embed == guidance and tuple(m.config.axes_dim) == (4, 6, 6)
    assert rel(run_ours(m, x), ref) <= 1e-5
    assert rel(run_ours(load_ours(str(tmp_path / "dif")), x), ref) <= 1e-5  # loading the folder directly

    # a BFL file written by the inverse mapping (diffusers -> BFL on the state dict), with the ComfyUI prefix
    dsd = d.state_dict()
    bfl = dict(run_plan(convert_weights.diffusers_to_bfl_plan(list(dsd)), dsd.get))
    comfy = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    convert_weights.write_dict(str(tmp_path / "bfl.safetensors"), comfy)
    convert_weights.main([str(tmp_path / "bfl.safetensors"), str(tmp_path / "ours2.safetensors"), "--quiet"])
    assert rel(run_ours(load_ours(str(tmp_path / "ours2.safetensors")), x), ref) <= 1e-5

    # and back: ours -> diffusers folder, loaded by diffusers itself
    convert_weights.main([str(tmp_path / "ours.safetensors"), str(tmp_path / "dif2"), "--to", "diffusers", "--quiet"])
    d2 = FluxTransformer2DModel.from_pretrained(str(tmp_path / "dif2")).eval()
    assert torch.equal(run_diffusers(d2, x), ref)


# ----------------------------------------------------------------------------------------------------------
# LoRA

@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    d = small_diffusers(True)
    d.save_pretrained(tmp / "dif")
    base = load_ours(str(tmp / "dif"))
    m = load_ours(str(tmp / "dif"))
    model.apply_lora(m, rank=4, alpha=8)  # alpha != rank, so folding alpha/r matters
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    path = str(tmp / "lora.safetensors")
    convert_weights.write_dict(path, model.lora_state_dict(m), {"format": "flux-lora"})
    return dict(tmp=tmp, dif=d, base=base, m=m, path=path, x=inputs(True))


def test_lora_scale_zero_and_merge(lora_setup):
    s = lora_setup
    m, x = s["m"], s["x"]
    out = run_ours(m, x)
    assert rel(out, run_ours(s["base"], x)) > 1e-3  # the LoRA does something
    model.set_lora_scale(m, 0.0)
    assert torch.equal(run_ours(m, x), run_ours(s["base"], x))
    model.set_lora_scale(m, 1.0)
    merged = load_ours(str(s["tmp"] / "dif"))
    model.load_lora_state_dict(merged, model.lora_state_dict(m))
    model.merge_lora(merged)
    assert rel(run_ours(merged, x), out) <= 1e-5


def test_lora_diffusers_export_loads_in_diffusers(lora_setup):
    pytest.importorskip("peft")
    s = lora_setup
    out_path = str(s["tmp"] / "lora_diffusers.safetensors")
    convert_weights.main(["--lora", s["path"], out_path, "--to", "diffusers"])
    assert detected(out_path) == "lora-diffusers"
    from diffusers import FluxPipeline
    sd = FluxPipeline.lora_state_dict(out_path)  # the pipeline loader's own format detection
    sd = sd[0] if isinstance(sd, tuple) else sd
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in sd
    assert "transformer.norm_out.linear.lora_A.weight" in sd
    d = small_diffusers(True)
    d.load_lora_adapter(sd, prefix="transformer", adapter_name="ours")
    assert rel(run_diffusers(d, s["x"]), run_ours(s["m"], s["x"])) <= 1e-5

    # ours -> diffusers -> ours: the same output, the rank kept (identical A parts are re-fused exactly)
    back_path = str(s["tmp"] / "lora_back.safetensors")
    convert_weights.main(["--lora", out_path, back_path, "--to", "ours"])
    back, fmt = convert_weights.load_lora(back_path)
    assert fmt == "lora-ours"
    assert back["single_blocks.1.linear1.lora_A.weight"].shape[0] == 4
    m2 = load_ours(str(s["tmp"] / "dif"))
    model.load_lora_state_dict(m2, back)
    assert rel(run_ours(m2, s["x"]), run_ours(s["m"], s["x"])) <= 1e-5


def test_lora_from_peft_partial_targets(tmp_path):
    """A PEFT LoRA with independent q/k/v adapters and no proj_mlp (diffusers' dreambooth targets): one adapter per
    part of the fused BFL linear (split layout, zeros for proj_mlp); exact."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    d = small_diffusers(True, seed=3)
    d.save_pretrained(tmp_path / "dif")
    targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "norm_out.linear"]
    torch.manual_seed(0)
    d.add_adapter(peft.LoraConfig(r=3, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    sd = {"transformer." + k: v for k, v in get_peft_model_state_dict(d).items()}
    convert_weights.write_dict(str(tmp_path / "peft.safetensors"), sd)
    convert_weights.main(["--lora", str(tmp_path / "peft.safetensors"), str(tmp_path / "ours.safetensors")])
    ours, fmt = convert_weights.load_lora(str(tmp_path / "ours.safetensors"))
    assert ours["single_blocks.0.linear1.lora_A.weight"].shape == (12, 32)  # 4 parts x rank 3
    assert ours["single_blocks.0.linear1.lora_B.weight"].shape == (3 * 32 + 128, 3)
    assert ours["double_blocks.0.img_mlp.0.lora_A.weight"].shape == (3, 32)
    assert not ours["single_blocks.0.linear1.lora_B.weight"][3 * 32:].any()  # no proj_mlp LoRA
    m = load_ours(str(tmp_path / "dif"))
    model.load_lora_state_dict(m, ours)
    x = inputs(True)
    assert rel(run_ours(m, x), run_diffusers(d, x)) <= 1e-5


def test_lora_split_layout_is_peft_official(tmp_path):
    """The official SCFM run's adapters (PEFT, gaussian init, on its script's LORA_LAYERS: every linear, diffusers'
    separate q, k, v, proj_mlp included) are our split layout on every linear: the same init distribution, outputs,
    one-to-one diffusers keys both ways, an exact merge, and kohya's single adapter per BFL linear (rank 3r or 4r,
    B block-diagonal) loads back to the same model."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    d = small_diffusers(True, seed=4)
    d.save_pretrained(tmp_path / "dif")
    official = [f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "text", "guidance") for i in (1, 2)]
    official += ["context_embedder", "x_embedder", "norm.linear", "norm1.linear", "norm1_context.linear",
                 "norm_out.linear", "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                 "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                 "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
    n_linear = sum(isinstance(mod, torch.nn.Linear) for mod in d.modules())
    d.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=official, init_lora_weights="gaussian"))
    m = load_ours(str(tmp_path / "dif"))
    model.apply_lora(m, 4, 4, layout="split", init="gaussian")
    peft_sd = {"transformer." + k: v.clone() for k, v in get_peft_model_state_dict(d).items()}
    ours_sd = model.lora_state_dict(m)
    assert sum(k.endswith("lora_A.weight") for k in peft_sd) == n_linear  # every linear has an adapter
    pa = torch.cat([v.flatten() for k, v in peft_sd.items() if "lora_A" in k])
    oa = torch.cat([v.flatten() for k, v in ours_sd.items() if "lora_A" in k])
    assert pa.numel() == oa.numel() and abs(pa.std() / oa.std() - 1) < 0.05  # N(0, 1/r) both
    with torch.no_grad():
        for n, p in d.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_sd = {"transformer." + k: v.clone() for k, v in get_peft_model_state_dict(d).items()}
    convert_weights.write_dict(str(tmp_path / "peft.safetensors"), peft_sd)
    convert_weights.main(["--lora", str(tmp_path / "peft.safetensors"), str(tmp_path / "ours.safetensors")])
    ours, _ = convert_weights.load_lora(str(tmp_path / "ours.safetensors"))
    assert ours["single_blocks.0.linear1.lora_A.weight"].shape == (16, 32)  # 4 parts x rank 4
    model.load_lora_state_dict(m, ours)
    x = inputs(True)
    out = run_ours(m, x)
    assert rel(out, run_diffusers(d, x)) <= 1e-5
    convert_weights.main(["--lora", str(tmp_path / "ours.safetensors"), str(tmp_path / "dif.safetensors"),
                          "--to", "diffusers"])
    back = load_file(str(tmp_path / "dif.safetensors"))
    assert set(back) == set(peft_sd) and all(torch.equal(back[k], peft_sd[k]) for k in back)
    convert_weights.main(["--lora", str(tmp_path / "ours.safetensors"), str(tmp_path / "k.safetensors"),
                          "--to", "kohya"])
    kohya = load_file(str(tmp_path / "k.safetensors"))
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (224, 16)  # rank 4 parts x 4
    k_model = load_ours(str(tmp_path / "dif"))
    model.load_lora_state_dict(k_model, convert_weights.load_lora(str(tmp_path / "k.safetensors"))[0])
    assert rel(run_ours(k_model, x), out) <= 1e-5
    model.merge_lora(m)
    assert rel(run_ours(m, x), out) <= 1e-5


def test_lora_kohya_round_trip(lora_setup):
    s = lora_setup
    k_path, back_path = str(s["tmp"] / "kohya.safetensors"), str(s["tmp"] / "from_kohya.safetensors")
    convert_weights.main(["--lora", s["path"], k_path, "--to", "kohya"])
    assert detected(k_path) == "lora-kohya"
    k = load_file(k_path)
    ours = model.lora_state_dict(s["m"])
    assert len(k) == len(ours)
    assert k["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 32)
    assert k["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (96, 4)
    assert k["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * 32 + 128, 4)
    assert k["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"].shape == (64, 4)
    assert float(k["lora_unet_double_blocks_1_txt_mod_lin.alpha"]) == 8.0
    convert_weights.main(["--lora", k_path, back_path])
    back, fmt = convert_weights.load_lora(back_path)
    assert fmt == "lora-ours" and set(back) == set(ours)
    assert all(torch.equal(back[n], ours[n]) for n in ours)


def test_lora_alpha_and_bad_files(tmp_path):
    """alpha defaults to the rank; a diffusers file's own alphas are folded into B when parts are re-fused (with or
    without the 'transformer.' prefix); a LoRA without its lora_B names the module and the file."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g)
    path = str(tmp_path / "no_alpha.safetensors")
    convert_weights.write_dict(path, {"double_blocks.0.img_attn.qkv.lora_A.weight": a,
                                      "double_blocks.0.img_attn.qkv.lora_B.weight": b})
    sd, fmt = convert_weights.load_lora(path)
    assert fmt == "lora-ours" and float(sd["double_blocks.0.img_attn.qkv.alpha"]) == 2.0
    parts = {}
    for x, bx, prefix in zip("qkv", b.chunk(3), ("transformer.", "", "transformer.")):
        d = f"{prefix}transformer_blocks.0.attn.to_{x}"
        parts.update({f"{d}.lora_A.weight": a, f"{d}.lora_B.weight": bx, f"{d}.alpha": torch.tensor(4.0)})
    convert_weights.write_dict(str(tmp_path / "dif.safetensors"), parts)
    sd, fmt = convert_weights.load_lora(str(tmp_path / "dif.safetensors"))
    assert fmt == "lora-diffusers" and float(sd["double_blocks.0.img_attn.qkv.alpha"]) == 2.0
    assert torch.allclose(sd["double_blocks.0.img_attn.qkv.lora_B.weight"], 2 * b)  # alpha/r = 4/2 folded in
    del parts["transformer_blocks.0.attn.to_k.lora_B.weight"]
    convert_weights.write_dict(str(tmp_path / "bad.safetensors"), parts)
    with pytest.raises(convert_weights.ConvertError, match="transformer_blocks.0.attn.to_k.*lora_B") as e:
        convert_weights.load_lora(str(tmp_path / "bad.safetensors"))
    assert str(tmp_path / "bad.safetensors") in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# Streaming: the converting process never holds the checkpoint in its own (anonymous) memory. The source is
# memory-mapped, so its pages count in VmRSS/VmHWM as file or shmem pages (the page cache, which the kernel can drop);
# RssAnon is what the process itself allocated. The kernel keeps no peak for it, so a thread samples it.

RSS_CHILD = r"""
import sys, threading, time
import convert_weights
anon = lambda: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("RssAnon"))) / 1024
base, peak = anon(), [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
if sys.argv[1] == "--hold":  # the control: every tensor copied and kept, as a converter that loads everything would
    held = [t.clone() for _, t in convert_weights.read_flux(sys.argv[2])[1]]
else:
    convert_weights.main(sys.argv[1:] + ["--quiet"])
time.sleep(0.01)
print("PEAK_MB", base, max(peak[0], anon()))
"""
RSS_BOUND_MB = 512          # absolute anonymous peak of the converting process, for a >= 1 GiB checkpoint
RSS_GROWTH_FRACTION = 0.25  # anonymous peak minus the import baseline, as a fraction of the file size


def test_streaming_peak_rss(tmp_path):
    """A 1.15 GiB BFL checkpoint converted to ours and to a diffusers folder: the anonymous peak stays near import
    size + the largest tensor group, far below the file size; a control child that keeps every tensor shows that the
    measure sees a whole-file copy."""
    cfg = model.FluxConfig(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=2048,
                           num_heads=16, depth=1, depth_single_blocks=2, axes_dim=(16, 56, 56), guidance_embed=True)
    with torch.device("meta"):
        metas = model.Flux(cfg).state_dict()
    # tmpfs when there is one: it is much faster than the disk here
    d = tempfile.mkdtemp(prefix="test_convert_", dir="/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    src, ours, dif = (os.path.join(d, n) for n in ("big.safetensors", "ours.safetensors", "dif"))
    try:
        pool = torch.empty(max(t.numel() for t in metas.values())).uniform_(-0.02, 0.02)  # one tensor of memory
        convert_weights.write_safetensors(src, metas, ((k, pool[:t.numel()].view(t.shape)) for k, t in metas.items()))
        del pool
        size_mb = os.path.getsize(src) / 2**20
        assert size_mb >= 1024
        runs = ([src, ours], [src, dif, "--to", "diffusers"], ["--hold", src])
        procs = [subprocess.Popen([sys.executable, "-c", RSS_CHILD, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in runs]
        peaks = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            peaks.append([float(v) for v in out.split("PEAK_MB")[-1].split()])
        print(f"\nfile {size_mb:.0f} MB; anonymous memory (import baseline -> peak): to ours {peaks[0][0]:.0f} -> "
              f"{peaks[0][1]:.0f} MB, to diffusers {peaks[1][0]:.0f} -> {peaks[1][1]:.0f} MB, control "
              f"{peaks[2][0]:.0f} -> {peaks[2][1]:.0f} MB; bound {RSS_BOUND_MB} MB")
        for base, peak in peaks[:2]:
            assert peak < RSS_BOUND_MB and peak - base < RSS_GROWTH_FRACTION * size_mb
        assert peaks[2][1] - peaks[2][0] > 0.9 * size_mb  # the measure does see a whole-file copy
        with safe_open(ours, "pt") as f, safe_open(src, "pt") as g, \
                safe_open(os.path.join(dif, "diffusion_pytorch_model.safetensors"), "pt") as h:
            assert f.metadata()["format"] == "flux-bfl" and set(f.keys()) == set(metas)
            k = "single_blocks.1.linear1.weight"
            assert torch.equal(f.get_tensor(k), g.get_tensor(k))
            assert torch.equal(h.get_tensor("single_transformer_blocks.1.proj_mlp.weight"), g.get_tensor(k)[3 * 2048:])
    finally:
        for p in (src, ours):
            if os.path.exists(p):
                os.remove(p)
        shutil.rmtree(dif, ignore_errors=True)
        if d != tmp_path:
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Bad input: errors name the key / shape / file and the detected format

def tiny_bfl_sd():
    with torch.device("meta"):
        m = model.Flux(model.PRESETS["tiny"])
    return {k: torch.zeros(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_bad_bfl_file(tmp_path, case):
    sd = tiny_bfl_sd()
    if case == "missing":
        del sd["double_blocks.1.img_attn.proj.weight"]
        want = ["missing key 'double_blocks.1.img_attn.proj.weight'", "(64, 64)"]
    elif case == "unexpected":
        sd["double_blocks.0.img_attn.extra.weight"] = torch.zeros(3)
        want = ["unexpected key 'double_blocks.0.img_attn.extra.weight'"]
    else:
        sd["single_blocks.0.linear2.weight"] = torch.zeros(64, 100)
        want = ["wrong shape for 'single_blocks.0.linear2.weight'", "expected (64, 320)", "found (64, 100)"]
    path = str(tmp_path / "bad.safetensors")
    convert_weights.write_dict(path, sd)
    with pytest.raises(convert_weights.ConvertError) as e:
        convert_weights.convert(path, str(tmp_path / "out.safetensors"))
    for w in want + [path, "bfl"]:
        assert w in str(e.value)
    with pytest.raises(convert_weights.ConvertError):
        convert_weights.read_flux(path)
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_bad_diffusers_folder(tmp_path):
    d = small_diffusers(False)
    sd = d.state_dict()
    del sd["transformer_blocks.1.attn.to_k.weight"]
    os.makedirs(tmp_path / "dif")
    convert_weights.write_dict(str(tmp_path / "dif" / "diffusion_pytorch_model.safetensors"), sd)
    with pytest.raises(convert_weights.ConvertError) as e:
        convert_weights.convert(str(tmp_path / "dif"), str(tmp_path / "out.safetensors"))
    msg = str(e.value)
    assert "transformer_blocks.1.attn.to_k.weight" in msg and "diffusers" in msg and str(tmp_path / "dif") in msg


class Canary:
    """Unpickling this creates a file: proof that nothing was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["ckpt.safetensors", "ckpt.pt"])
@pytest.mark.parametrize("kind", ["torch.save", "pickle", "garbage", "empty", "truncated"])
def test_refuses_non_safetensors(tmp_path, name, kind):
    path, canary = str(tmp_path / name), str(tmp_path / "unpickled")
    if kind == "torch.save":
        torch.save({"img_in.weight": torch.zeros(2), "x": Canary(canary)}, path)
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"x": Canary(canary)}, f)
    elif kind == "truncated":  # a valid header whose data runs past the end of the file
        save_file({"img_in.weight": torch.zeros(64, 64)}, path)
        os.truncate(path, os.path.getsize(path) - 100)
    else:
        with open(path, "wb") as f:
            f.write(os.urandom(1000) if kind == "garbage" else b"")
    for fn in (detected, convert_weights.read_flux, convert_weights.load_lora,
               lambda p: convert_weights.main([p, str(tmp_path / "o")])):
        with pytest.raises(convert_weights.ConvertError, match="not a safetensors file") as e:
            fn(path)
        assert path in str(e.value)
    assert not os.path.exists(canary)


def test_unknown_format(tmp_path):
    path = str(tmp_path / "random.safetensors")
    convert_weights.write_dict(path, {"foo.weight": torch.zeros(3), "bar.baz": torch.zeros(2, 2)})
    with pytest.raises(convert_weights.ConvertError, match="unknown format") as e:
        convert_weights.convert(path, str(tmp_path / "o.safetensors"))
    assert path in str(e.value) and "foo.weight" in str(e.value)
    kohya = str(tmp_path / "te.safetensors")
    te = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    convert_weights.write_dict(kohya, {f"{te}.lora_down.weight": torch.zeros(2, 4),
                                       f"{te}.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(convert_weights.ConvertError, match=te):
        convert_weights.load_lora(kohya)


def test_safetensors_interop(tmp_path):
    """Our writer's files are read by the reference library (bf16, 0-d, empty); shapes and dtypes are read from the
    header without the data; a failed write leaves neither the file nor its temporary."""
    sd = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.tensor(2.5), "c": torch.zeros(0, 4),
          "d": torch.arange(7, dtype=torch.int64), "e": torch.tensor([True, False]),
          "f": torch.randn(4).to(torch.float8_e4m3fn)}
    path = str(tmp_path / "ours.safetensors")
    convert_weights.write_dict(path, sd, {"format": "flux-bfl"})
    ref = load_file(path)
    as_bytes = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731 (float8 has no torch.equal)
    assert ref.keys() == sd.keys()
    assert all(torch.equal(as_bytes(ref[k]), as_bytes(sd[k])) and ref[k].dtype == sd[k].dtype for k in sd)
    src, metadata = convert_weights.open_files([path])
    assert metadata == {"format": "flux-bfl"}
    assert all(convert_weights._meta(src, k).shape == sd[k].shape and convert_weights._meta(src, k).dtype == sd[k].dtype
               for k in sd)

    def failing():
        yield "a", sd["a"]
        raise RuntimeError("read error")
    with pytest.raises(RuntimeError, match="read error"):
        convert_weights.write_safetensors(str(tmp_path / "new.safetensors"), sd, failing())
    assert os.listdir(tmp_path) == ["ours.safetensors"]
    with pytest.raises(convert_weights.ConvertError, match="does not match the header"):  # out of order
        convert_weights.write_safetensors(str(tmp_path / "new.safetensors"), sd, iter(list(sd.items())[::-1]))
    assert os.listdir(tmp_path) == ["ours.safetensors"]


def test_cli_help_dtype_and_config_metadata(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_weights.main(["--help"])
    assert "--lora" in capsys.readouterr().out
    # axes_dim is not in the weights: a non-preset split must survive through our metadata
    cfg = model.FluxConfig(in_channels=8, out_channels=4, vec_in_dim=12, context_in_dim=20, hidden_size=32,
                           num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(2, 6, 8), guidance_embed=False)
    m = model.Flux(cfg)
    m.init_weights()
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    convert_weights.write_dict(a, m.state_dict(), {"config": json.dumps(dataclasses.asdict(cfg))})
    convert_weights.main([a, b, "--dtype", "bf16", "--quiet"])
    cfg2, tensors = convert_weights.read_flux(str(tmp_path / "b.safetensors"))
    sd = dict(tensors)
    assert cfg2 == cfg and all(v.dtype == torch.bfloat16 for v in sd.values())
    convert_weights.main(["--info", str(tmp_path / "b.safetensors")])
    assert "axes_dim=(2, 6, 8)" in capsys.readouterr().out
