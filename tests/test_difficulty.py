import math

import pytest

from stepwise.schedules import bin_key
import torch
from torch import nn

from stepwise.diffusion import Diffusion
from stepwise.difficulty import (convergence_speed, data_moments, gaussian_kl, gradient_similarity, per_timestep_loss,
                                 relative_entropy, relative_entropy_mc, snr_db_at, timestep_grid)
from stepwise.errors import ConfigError, DataError
from stepwise.schedules import NoiseSchedule


class Tiny(nn.Module):
    """conv(x) + per-channel bias scaled by t/T: a t-dependent denoiser small enough for CPU tests."""

    def __init__(self, seed=0, T=100):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.temb = nn.Linear(1, 1)
        self.T = T

    def forward(self, x, t):
        return self.conv(x) * self.temb((t.float() / self.T)[:, None]).view(-1, 1, 1, 1)


class Zero(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.fixture
def images():
    return torch.randint(0, 256, (12, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_per_timestep_loss_uses_common_noise(images):
    d = Diffusion("linear", 100)
    mean, var = per_timestep_loss(Zero(), d, images, [0, 50, 99], num_examples=8, seed=3, batch_size=5)
    # zero eps-prediction: loss = mean(eps^2), identical at every t because eps is shared across t
    assert mean.shape == var.shape == (3,)
    assert torch.allclose(mean, mean[0].expand(3)) and torch.allclose(var, var[0].expand(3))
    mean2, _ = per_timestep_loss(Zero(), d, images.float() / 127.5 - 1, [0, 50, 99], num_examples=8, seed=3)
    assert torch.allclose(mean, mean2)  # uint8 and [-1, 1] float inputs agree; batch size does not matter


def test_per_timestep_loss_deterministic_and_restores_mode(images):
    d, m = Diffusion("linear", 100), Tiny()
    m.train()
    a = per_timestep_loss(m, d, images, [1, 10, 90], num_examples=6, seed=0)
    b = per_timestep_loss(m, d, images, [1, 10, 90], num_examples=6, seed=0)
    c = per_timestep_loss(m, d, images, [1, 10, 90], num_examples=6, seed=1)
    assert m.training and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    with pytest.raises(ConfigError):
        per_timestep_loss(m, d, images, [100], num_examples=4)
    with pytest.raises(ConfigError):
        per_timestep_loss(m, d, images, [1], num_examples=13)


def test_timestep_grid_and_snr_db():
    assert timestep_grid(1000, 4).tolist() == [125, 375, 625, 875]
    s = NoiseSchedule("linear", 1000)
    assert torch.equal(snr_db_at(s, [0, 500]), s.snr_db()[[0, 500]])


def history(decay_steps, steps=range(100, 5001, 100)):
    return [{"step": s, "loss": 0.0, **{bin_key(k, len(decay_steps), 1000): 0.1 + math.exp(-s / tau)
                                        for k, tau in enumerate(decay_steps)}} for s in steps]


def test_convergence_speed_orders_slow_and_fast_bins():
    speed = convergence_speed(history([2000, 200]), smoothing=0.0)
    assert speed.shape == (2,) and speed[0] > speed[1] and 0 < speed[1] and speed[0] <= 1
    # step-function curve: converges exactly when the drop happens
    rows = [{"step": s, bin_key(0, 1, 1000): 1.0 if s < 1000 else 0.2} for s in range(100, 4001, 100)]
    assert convergence_speed(rows, smoothing=0.0).item() == pytest.approx(1000 / 4000)


def test_convergence_speed_errors():
    with pytest.raises(DataError):
        convergence_speed([{"step": 1, "loss": 1.0}])
    with pytest.raises(DataError):
        convergence_speed(history([10]), bins=3)


def test_gaussian_kl_matches_torch():
    p = torch.distributions.Normal(torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]))
    q = torch.distributions.Normal(torch.tensor([0.0, 0.5]), torch.tensor([1.5, 0.7]))
    ours = gaussian_kl(p.mean, p.variance, q.mean, q.variance)
    assert torch.allclose(ours, torch.distributions.kl_divergence(p, q))


def test_relative_entropy_closed_form_vs_monte_carlo():
    s = NoiseSchedule("linear", 100)
    x0 = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)  # one image: p_t is exactly Gaussian
    closed = relative_entropy(s.abar, x0.flatten().double(), torch.zeros(16, dtype=torch.float64))
    mc = relative_entropy_mc(s.abar, x0, [1, 5, 50], num_samples=4000, seed=0)
    assert torch.allclose(mc[:2], closed[[1, 5]], rtol=0.05)
    assert abs(mc[2] - closed[50]) < 3 * math.sqrt(2 * closed[50] / 4000)  # MC std of a small KL ~ sqrt(2 KL / M)
    assert closed[1] > closed[50] > 0  # low t: consecutive marginals differ more (Kim et al.)
    with pytest.raises(ConfigError):
        relative_entropy_mc(s.abar, x0, [0])


def test_relative_entropy_for_dataset_moments(images):
    mean, var = data_moments(images)
    kl = relative_entropy(NoiseSchedule("linear", 100).abar, mean, var)
    assert kl.shape == (100,) and torch.all(torch.isfinite(kl)) and torch.all(kl >= 0)


def test_gradient_similarity(images):
    d, m = Diffusion("linear", 100), Tiny()
    sim = gradient_similarity(m, d, images, [5, 5, 60, 95], num_examples=4)
    assert sim.shape == (4, 4)
    assert torch.allclose(sim, sim.T) and torch.allclose(sim.diagonal(), torch.ones(4, dtype=sim.dtype))
    assert sim[0, 1] == pytest.approx(1.0) and torch.all(sim.abs() <= 1)
    assert all(p.grad is None for p in m.parameters())
