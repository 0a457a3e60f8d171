import pytest
import torch

from sample import denoise
from scfm import get_schedule

# the SCFM release's schedule table (4 decimals; its first value 1 - 1e-5 is written as 1)
SCFM_TABLE = {
    (3, 3.0): [1, 0.8571, 0.6, 0],
    (4, 3.0): [1, 0.9, 0.75, 0.5, 0],
    (8, 3.0): [1, .9545, .9, .8333, .75, .6429, .5, .3, 0],
    (3, 3.25): [1, 0.8667, 0.619, 0],
    (4, 3.25): [1, 0.907, 0.7647, 0.52, 0],
    (8, 3.25): [1, .9579, .907, .8442, .7647, .661, .52, .3171, 0],
}
# the table's dynamic column, 1024x768 -> (1024/16) * (768/16) = 3072 packed tokens, mu = 0.977
SCFM_DYNAMIC_1024x768 = {
    3: [1, 0.8416, 0.5704, 0],
    4: [1, 0.8885, 0.7264, 0.4696, 0],
    8: [1, .949, .8885, .8157, .7264, .6144, .4696, .275, 0],
}


@pytest.mark.parametrize('n,s', list(SCFM_TABLE))
def test_schedule_scfm_table(n, s):
    g = get_schedule(n, shift=s)
    assert g.shape == (n + 1,)
    assert g[0].item() == 1.0 and g[-1].item() == 0.0  # exactly, not 1 - 1e-5
    assert torch.allclose(g, torch.tensor(SCFM_TABLE[n, s], dtype=g.dtype), atol=1e-4)
    assert (g[1:] < g[:-1]).all()


@pytest.mark.parametrize('n', list(SCFM_DYNAMIC_1024x768))
def test_schedule_dynamic_1024x768(n):
    g = get_schedule(n, shift=None, image_seq_len=3072)
    assert torch.allclose(g, torch.tensor(SCFM_DYNAMIC_1024x768[n], dtype=g.dtype), atol=1e-4)


def test_schedule_flux_test_vectors():
    # FLUX.1-dev's dynamic shift: 512^2 = 1024 packed tokens (mu = 0.63), 1024^2 = 4096 tokens (mu = 1.15), 4 steps
    ref512 = torch.tensor([1.0, 0.8492, 0.6525, 0.3849, 0.0], dtype=torch.float64)
    ref1024 = torch.tensor([1.0, 0.9045, 0.7595, 0.5128, 0.0], dtype=torch.float64)
    assert torch.allclose(get_schedule(4, shift=None, image_seq_len=1024), ref512, atol=1e-4)
    assert torch.allclose(get_schedule(4, shift=None, image_seq_len=4096), ref1024, atol=1e-4)
    g50 = get_schedule(50, shift=None, image_seq_len=4096)
    assert torch.allclose(g50[:4], torch.tensor([1.0, 0.9936, 0.987, 0.9802], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(g50[-3:], torch.tensor([0.1163, 0.0606, 0.0], dtype=torch.float64), atol=1e-4)


def test_schedule_unshifted_is_linspace():
    # schnell: shift off -> [1, .75, .5, .25, 0]
    assert get_schedule(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        get_schedule(4, shift=None)


class ConstantVelocity(torch.nn.Module):
    """A linear toy 'model': v = const regardless of input; records the times it is called at."""

    def __init__(self, v):
        super().__init__()
        self.v, self.calls = v, []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        assert img.shape[0] == txt.shape[0] == y.shape[0] == timesteps.shape[0]
        self.calls.append((timesteps.clone(), None if guidance is None else guidance.clone()))
        return self.v.expand_as(img)


@pytest.mark.parametrize('n,s', [(1, 1.0), (4, 1.0), (8, 3.0), (3, None)])
def test_denoise_constant_velocity(n, s):
    torch.manual_seed(0)
    B, L, C = 3, 16, 4
    x, v = torch.randn(B, L, C), torch.randn(1, L, C)
    if s == 1.0:  # small integers and dyadic steps: every Euler update is exact in float32
        x, v = torch.randint(-8, 8, (B, L, C)).float(), torch.randint(-8, 8, (1, L, C)).float()
    model = ConstantVelocity(v)
    ts = get_schedule(n, shift=s, image_seq_len=1024)
    out = denoise(model, x, torch.zeros(L, 3), torch.randn(B, 5, 8), torch.zeros(5, 3), torch.randn(B, 8), ts, guidance=3.5)
    # Euler with a constant velocity integrates exactly: the steps sum to t_end - t_start = -1
    if s == 1.0:
        assert torch.equal(out, x - v)
    else:
        assert torch.allclose(out, x - v, atol=1e-6)
    assert len(model.calls) == n
    assert [c[0][0].item() for c in model.calls] == pytest.approx(ts[:-1].tolist())
    assert all(torch.all(c[1] == 3.5) for c in model.calls)
