import pytest
import torch
from torch import nn

from stepwise.consistency import (consistency_report, feature_distance, featnet_feature_fn, gaussian_window,
                                  pixel_mse, split_consistency, ssim, switch_model)
from stepwise.diffusion import Diffusion
from stepwise.errors import ConfigError, DataError
from stepwise.featnet import FeatNet
from stepwise.sampling import fixed_noise, generate

SHAPE = (1, 12, 12)
GEN = dict(sampler="ddpm", steps=5, seed=7, progress=False)


class Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.temb = nn.Linear(1, 1)

    def forward(self, x, t):
        return self.conv(x) * self.temb((t.float() / 100)[:, None]).view(-1, 1, 1, 1)


class Tag(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return torch.full_like(x, self.c)


def test_identical_seeds_give_identical_noise():
    assert torch.equal(fixed_noise(3, 2, 0, 5, SHAPE), fixed_noise(3, 2, 0, 5, SHAPE))
    assert not torch.equal(fixed_noise(3, 2, 0, 5, SHAPE), fixed_noise(4, 2, 0, 5, SHAPE))


def test_identical_models_are_perfectly_consistent():
    d, feats = Diffusion("linear", 100), featnet_feature_fn(FeatNet(1, 3, width=4, feature_dim=8))
    a = generate(Tiny(0), d, 3, SHAPE, **GEN)
    b = generate(Tiny(0), d, 3, SHAPE, **GEN)  # a separate instance with the same weights and noise
    rep = consistency_report(a, b, feats)
    assert rep["mse"] == 0 and rep["ssim"] == pytest.approx(1.0) and rep["feature_l2"] == 0 and rep["num"] == 3
    c = generate(Tiny(1), d, 3, SHAPE, **GEN)
    rep = consistency_report(a, c, feats)
    assert rep["mse"] > 0 and rep["ssim"] < 1 and rep["feature_l2"] > 0


def test_ssim_properties_and_closed_form():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ssim(x, y), ssim(y, x)) and torch.all(ssim(x, y) < 0.5)
    # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * L)^2 with L = 1 for [0, 1]
    a, b, c1 = 0.2, 0.7, 0.01**2
    s = ssim(torch.full((1, 1, 11, 11), a), torch.full((1, 1, 11, 11), b), value_range=(0, 1))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    assert gaussian_window(11, 1.5).sum().item() == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))  # window 11 > image 8
    with pytest.raises(DataError):
        pixel_mse(torch.zeros(1, 1, 8, 8), torch.zeros(2, 1, 8, 8))


def test_feature_distance_and_mse():
    a, b = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert pixel_mse(a, b).tolist() == [1.0, 1.0]
    assert feature_distance(a, b, lambda z: z.flatten(1)).tolist() == [4.0, 4.0]


def test_switch_model_routes_by_split():
    m = switch_model(Tag(1.0), Tag(2.0), 30)
    out = m(torch.zeros(4, 1, 2, 2), torch.tensor([0, 29, 30, 99]))
    assert out[:, 0, 0, 0].tolist() == [2.0, 2.0, 1.0, 1.0]
    assert switch_model(Tag(1.0), Tag(2.0), 0)(torch.zeros(1, 1, 2, 2), torch.tensor([0])).unique().tolist() == [1.0]
    with pytest.raises(ConfigError):
        switch_model(Tag(1.0), Tag(2.0), -1)


def test_split_consistency_limits():
    d, a, b = Diffusion("linear", 100), Tiny(0), Tiny(1)
    rows = split_consistency(a, b, d, [0, 100], 2, SHAPE, **GEN)
    assert [r["split_t"] for r in rows] == [0, 100]
    assert rows[0]["mse"] == 0  # never switches: model a's own samples
    full = consistency_report(generate(a, d, 2, SHAPE, **GEN), generate(b, d, 2, SHAPE, **GEN))
    assert rows[1]["mse"] == pytest.approx(full["mse"]) and rows[1]["mse"] > 0  # model b throughout
