import pytest
import torch

from stepwise.errors import ConfigError
from stepwise.loss_weights import LOSS_WEIGHTS, build_loss_weight
from stepwise.parameterisations import eps_from_x0, v_from_x0_eps

SNR = torch.tensor([10.0, 2.0, 0.0, 4.5], dtype=torch.float64)


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("prediction, expected", [
    ("x0", [5.0, 2.0, 1.0, 4.5]),              # min(SNR, 5); SNR=0 -> 1
    ("eps", [0.5, 1.0, 1.0, 1.0]),             # min(SNR, 5)/SNR
    ("v", [5 / 11, 2 / 3, 1.0, 4.5 / 5.5]),    # min(SNR, 5)/(SNR+1); not diffusers' min(SNR+1, 5)/(SNR+1) = 5/5.5
    ("mixed_x0", [5.0, 2.0, 1.0, 4.5]),        # an x0-space loss
])
def test_min_snr_hand_values(prediction, expected):
    assert build_loss_weight("min_snr", prediction)(SNR).tolist() == approx(expected)


def test_min_snr_gamma_and_not_speed_bug():
    w = build_loss_weight("min_snr", "v", gamma=1.0)(torch.tensor([100.0, 0.5], dtype=torch.float64))
    assert w.tolist() == approx([1 / 101, 0.5 / 1.5])  # SpeeD's bug would give 1/(SNR+1) everywhere


@pytest.mark.parametrize("prediction, expected", [
    ("eps", [1 / 11, 1 / 3, 1.0, 1 / 5.5]),                     # 1/(1+SNR)
    ("x0", [10 / 11, 2 / 3, 0.0, 4.5 / 5.5]),                   # SNR/(1+SNR): same objective in x0-space
    ("v", [10 / 121, 2 / 9, 0.0, 4.5 / 5.5 ** 2]),              # SNR/(1+SNR)^2
])
def test_p2_hand_values(prediction, expected):
    assert build_loss_weight("p2", prediction)(SNR).tolist() == approx(expected)


def test_p2_k_gamma():
    assert build_loss_weight("p2", "eps", k=1.0, gamma=0.5)(torch.tensor([3.0])).tolist() == approx([0.5])
    assert build_loss_weight("p2", "eps", k=2.0, gamma=2.0)(torch.tensor([2.0])).tolist() == approx([1 / 16])


def test_none_is_ones():
    w = build_loss_weight("none", "v")(SNR.float())
    assert w.dtype == torch.float32 and w.tolist() == [1.0] * 4


@pytest.mark.parametrize("name", ["min_snr", "p2"])
def test_same_objective_in_every_prediction_space(name):
    """w_pred * MSE_pred is the same number for eps, x0 and v read-outs of one network output."""
    g = torch.Generator().manual_seed(0)
    abar = torch.rand(6, generator=g, dtype=torch.float64) * 0.98 + 0.01  # (B,)
    a, s = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    x0, eps, x0_hat = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = a * x0 + s * eps
    eps_hat = eps_from_x0(x_t, x0_hat, a, s)
    mse = {"x0": (x0 - x0_hat).pow(2).mean(1), "eps": (eps - eps_hat).pow(2).mean(1),
           "v": (v_from_x0_eps(x0, eps, a, s) - v_from_x0_eps(x0_hat, eps_hat, a, s)).pow(2).mean(1)}
    snr = abar / (1 - abar)
    objective = {p: build_loss_weight(name, p)(snr) * mse[p] for p in mse}
    assert torch.allclose(objective["eps"], objective["x0"]) and torch.allclose(objective["v"], objective["x0"])


@pytest.mark.parametrize("name, prediction, kwargs, needle", [
    ("huber", "eps", {}, "unknown loss weight 'huber'; valid: ['min_snr', 'none', 'p2']"),
    ("min_snr", "score", {}, "unknown prediction type 'score'; valid: ['eps', 'mixed_x0', 'v', 'x0']"),
    ("min_snr", "eps", {"gamma": 0}, "gamma=0 must be a number > 0"),
    ("min_snr", "eps", {"gamma": "5"}, "gamma='5' must be a number > 0"),
    ("min_snr", "eps", {"k": 1}, "unknown argument 'k'; valid: ['gamma']"),
    ("p2", "eps", {"k": 0}, "k=0 must be a number > 0"),
    ("p2", "eps", {"gamma": -1}, "gamma=-1 must be a number >= 0"),
    ("none", "eps", {"gamma": 1}, "unknown argument 'gamma'; valid: []"),
])
def test_config_errors(name, prediction, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        build_loss_weight(name, prediction, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_registry():
    assert sorted(LOSS_WEIGHTS) == ["min_snr", "none", "p2"]
