"""Our hand-written Flux autoencoder (BFL parameter names) must equal diffusers' AutoencoderKL in the Flux
configuration, at a small width, once the weights are read through convert_weights' diffusers<->BFL key mapping."""
import pytest
import torch
from safetensors.torch import load_file

from convert_weights import convert, read_ae
from model import AE_PRESETS, AutoEncoder, AutoEncoderConfig

diffusers = pytest.importorskip("diffusers")

CFG = AutoEncoderConfig(ch=16, ch_mult=(1, 2, 4, 4), z_channels=16, norm_groups=8)  # Flux shape, 1/8 width


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    n = len(CFG.ch_mult)
    ref = diffusers.AutoencoderKL(
        in_channels=CFG.in_channels, out_channels=CFG.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[CFG.ch * m for m in CFG.ch_mult], layers_per_block=CFG.num_res_blocks,
        act_fn="silu", latent_channels=CFG.z_channels, norm_num_groups=CFG.norm_groups,
        scaling_factor=CFG.scale_factor, shift_factor=CFG.shift_factor,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).float().eval()
    # diffusers' default init sets every GroupNorm to weight 1 / bias 0, so a misrouted norm would go unnoticed;
    # randomise all 1-D tensors (norms and biases) so that no two same-shaped tensors are interchangeable
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    tmp = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(tmp / "vae")
    cfg, tensors = read_ae(str(tmp / "vae"))  # the diffusers folder, read one tensor at a time
    assert cfg == CFG
    ours = AutoEncoder(CFG).float().eval()
    ours.load_state_dict(dict(tensors), strict=True)
    return ours, ref, tmp


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ours, ref, _ = pair
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    want = (ref.encode(x).latent_dist.mean - CFG.shift_factor) * CFG.scale_factor
    got = ours.encode(x)
    assert got.shape == (2, CFG.z_channels, 4, 6)
    assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ours, ref, _ = pair
    z = torch.randn(2, CFG.z_channels, 4, 6, generator=torch.Generator().manual_seed(2))
    want = ref.decode(z / CFG.scale_factor + CFG.shift_factor).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 32, 48)
    assert rel_err(got, want) <= 1e-5
    assert ours(torch.randn(1, 3, 16, 24)).shape == (1, 3, 16, 24)


def test_key_mapping_round_trip(pair):
    """diffusers folder -> our file -> diffusers folder: every tensor comes back, under its own name."""
    ours, ref, tmp = pair
    convert(str(tmp / "vae"), str(tmp / "ae.safetensors"))
    cfg, tensors = read_ae(str(tmp / "ae.safetensors"))
    bfl, back = ours.state_dict(), dict(tensors)
    assert cfg == CFG and list(back) == list(bfl)  # model order
    assert all(torch.equal(back[k], bfl[k]) for k in bfl)
    convert(str(tmp / "ae.safetensors"), str(tmp / "vae2"), to="diffusers")
    dif, want = load_file(str(tmp / "vae2" / "diffusion_pytorch_model.safetensors")), ref.state_dict()
    assert dif.keys() == want.keys()
    assert all(torch.equal(dif[k], want[k]) for k in want)  # ours was loaded from ref, so values match too


def test_flux_preset_size_on_meta():
    with torch.device("meta"):
        ae = AutoEncoder(AE_PRESETS["flux"])
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683
    assert len(ae.state_dict()) == 244
    assert sum(p.numel() for p in ae.encoder.parameters()) == 34_274_208
