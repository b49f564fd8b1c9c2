import pytest
import torch

from stepwise.errors import ConfigError
from stepwise.loss_weights import LOSS_SPACES, LOSS_WEIGHTS, LossWeight, build_loss_weight
from stepwise.parameterisations import eps_from_x0, v_from_x0_eps
from stepwise.schedules import NoiseSchedule

SNR = torch.tensor([10.0, 2.0, 0.0, 4.5], dtype=torch.float64)


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("space, expected", [
    ("x0", [5.0, 2.0, 1.0, 4.5]),              # min(SNR, 5); SNR=0 -> 1
    ("eps", [0.5, 1.0, 1.0, 1.0]),             # min(SNR, 5)/SNR
    ("v", [5 / 11, 2 / 3, 1.0, 4.5 / 5.5]),    # min(SNR, 5)/(SNR+1); not diffusers' min(SNR+1, 5)/(SNR+1) = 5/5.5
    ("acc", [1.25, 0.5, 1.0, 1.125]),          # min(SNR, 5)/4: mixed x0's acceleration head, x0 = (acc + 3a x_t)/2
])
def test_min_snr_hand_values(space, expected):
    assert build_loss_weight("min_snr", space)(SNR).tolist() == approx(expected)


def test_min_snr_gamma_and_not_speed_bug():
    w = build_loss_weight("min_snr", "v", gamma=1.0)(torch.tensor([100.0, 0.5], dtype=torch.float64))
    assert w.tolist() == approx([1 / 101, 0.5 / 1.5])  # SpeeD's bug would give 1/(SNR+1) everywhere


@pytest.mark.parametrize("space, expected", [
    ("eps", [1 / 11, 1 / 3, 1.0, 1 / 5.5]),                     # 1/(1+SNR)
    ("x0", [10 / 11, 2 / 3, 0.0, 4.5 / 5.5]),                   # SNR/(1+SNR): same objective in x0-space
    ("v", [10 / 121, 2 / 9, 0.0, 4.5 / 5.5 ** 2]),              # SNR/(1+SNR)^2
    ("acc", [10 / 44, 2 / 12, 0.0, 4.5 / 22]),                  # SNR/(1+SNR)/4
])
def test_p2_hand_values(space, expected):
    assert build_loss_weight("p2", space)(SNR).tolist() == approx(expected)


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


@pytest.mark.parametrize("name, space, kwargs, needle", [
    ("huber", "eps", {}, "unknown loss weight 'huber'; valid: ['min_snr', 'none', 'p2']"),
    ("min_snr", "score", {}, "unknown loss space 'score'; valid: ['acc', 'eps', 'v', 'x0']"),
    ("min_snr", "eps", {"gamma": 0}, "gamma=0 must be a number > 0"),
    ("min_snr", "eps", {"gamma": "5"}, "gamma='5' must be a number > 0"),
    ("min_snr", "eps", {"k": 1}, "unknown argument 'k'; valid: ['gamma']"),
    ("p2", "eps", {"k": 0}, "k=0 must be a number > 0"),
    ("p2", "eps", {"gamma": -1}, "gamma=-1 must be a number >= 0"),
    ("none", "eps", {"gamma": 1}, "unknown argument 'gamma'; valid: []"),
])
def test_config_errors(name, space, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        build_loss_weight(name, space, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        LossWeight(name, NoiseSchedule("linear", 10), **kwargs)(torch.tensor([3]), space)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_registry():
    assert sorted(LOSS_WEIGHTS) == ["min_snr", "none", "p2"]


@pytest.mark.parametrize("name, kwargs", [("none", {}), ("min_snr", {"gamma": 2.0}), ("p2", {"k": 0.5, "gamma": 2.0})])
def test_loss_weight_at_timesteps_reads_the_schedule_snr(name, kwargs):
    """LossWeight(t, space) is the SNR weight at SNR_t = abar_t/(1 - abar_t) of the schedule's float32 table."""
    sched = NoiseSchedule("cosine", 50)
    t = torch.tensor([0, 7, 25, 49])
    abar = sched.abar.float()[t]
    for space in LOSS_SPACES:
        expected = build_loss_weight(name, space, **kwargs)(abar / (1 - abar))
        assert torch.equal(LossWeight(name, sched, **kwargs)(t, space), expected)


def test_every_space_weights_the_same_x0_objective_by_c_out_squared():
    """A space read out as x0 = c_skip x_t + c_out y carries the x0 weight times c_out^2 (acc: c_out = 1/2)."""
    a = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    s = (1 - a * a).sqrt()
    snr = a * a / (s * s)
    c_out = {"x0": torch.ones_like(a), "eps": -s / a, "v": -s, "acc": torch.full_like(a, 0.5)}
    for name in ("min_snr", "p2"):
        w_x0 = build_loss_weight(name, "x0")(snr)
        for space in LOSS_SPACES:
            torch.testing.assert_close(build_loss_weight(name, space)(snr), w_x0 * c_out[space] ** 2)
