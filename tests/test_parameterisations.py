import pytest
import torch

from stepwise.diffusion import PREDICTION_CLASSES, Diffusion
from stepwise.errors import ConfigError
from stepwise.loss_weights import build_loss_weight
from stepwise.parameterisations import (PREDICTIONS, Prediction, eps_from_v, eps_from_x0, get_prediction,
                                        v_from_x0_eps, x0_from_eps, x0_from_v)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    abar = torch.rand(8, 1, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x0 = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return x0, eps, a, s, a * x0 + s * eps


def test_round_trips(batch):
    x0, eps, a, s, xt = batch
    v = v_from_x0_eps(x0, eps, a, s)
    torch.testing.assert_close(x0_from_eps(xt, eps, a, s), x0)
    torch.testing.assert_close(eps_from_x0(xt, x0, a, s), eps)
    torch.testing.assert_close(x0_from_v(xt, v, a, s), x0)
    torch.testing.assert_close(eps_from_v(xt, v, a, s), eps)


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_perfect_prediction_recovers_x0_eps(batch, name):
    x0, eps, a, s, xt = batch
    p = get_prediction(name)
    x0_hat, eps_hat = p.to_x0_eps(p.target(x0, eps, a, s), xt, a, s, torch.zeros(len(x0), dtype=torch.long))
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_hand_computed_v():
    # abar = 0.64 -> a = 0.8, s = 0.6; x0 = 1, eps = 2 -> v = 0.8*2 - 0.6*1 = 1.0, x_t = 0.8 + 1.2 = 2.0
    one = torch.ones(1)
    a, s = 0.8 * one, 0.6 * one
    assert v_from_x0_eps(one, 2 * one, a, s).item() == pytest.approx(1.0)
    assert x0_from_v(2 * one, one, a, s).item() == pytest.approx(1.0)
    assert eps_from_v(2 * one, one, a, s).item() == pytest.approx(2.0)


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_loss_is_zero_for_oracle_model(name):
    d = Diffusion("cosine", 100, name)
    x0, eps, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.tensor([0, 10, 50, 99])

    def oracle(xt, tt):
        a, s = d.coefs(tt, xt)
        return d.prediction.target(x0, eps, a, s)

    assert d.losses(oracle, x0, t, eps).abs().max().item() < 1e-10
    x0_hat, eps_hat = d.predict_x0_eps(oracle, d.schedule.q_sample(x0, t, eps), t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)


def test_unknown_prediction():
    with pytest.raises(ConfigError, match="valid: \\['eps', 'v', 'x0'\\]"):
        get_prediction("score")


@pytest.mark.parametrize("name", sorted(PREDICTION_CLASSES))
def test_every_prediction_type_fits_the_interface(name):
    """What Diffusion and train call, generically: out_channels_factor, losses -> ((B,), {'mse': (B,), ...}), update."""
    d = Diffusion("linear", 50, name, loss_weight="min_snr")
    assert isinstance(d.prediction, Prediction) and d.out_channels_factor == d.prediction.out_channels_factor
    conv = torch.nn.Conv2d(2, 2 * d.out_channels_factor, 1)
    g = torch.Generator().manual_seed(1)
    x0, eps, t = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g), torch.tensor([0, 9, 30, 49])
    terms = d.loss_terms(lambda x, tt: conv(x), x0, t, eps)
    assert terms["loss"].shape == terms["mse"].shape == (4,) and all(v.shape == (4,) for v in terms.values())
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in d.parameters())  # the prediction's own parameters, found generically
    d.prediction.update(t, {k: v.detach() for k, v in terms.items() if k != "loss"})
    x0_hat, eps_hat = d.predict_x0_eps(lambda x, tt: conv(x), x0, t)
    assert x0_hat.shape == eps_hat.shape == x0.shape


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_loss_is_weight_times_mse_bit_exactly(name):
    """The eps / x0 / v loss is the formula used before predictions owned their loss, bit for bit: per-example
    (out - target)^2 mean times w(SNR_t) with SNR_t from the schedule's float32 abar, in the type's own space."""
    for weight in ("none", "min_snr", "p2"):
        d = Diffusion("linear", 100, name, loss_weight=weight)
        assert d.state_dict() == {} and list(d.parameters()) == []
        g = torch.Generator().manual_seed(2)
        x0, eps, out = (torch.randn(5, 1, 4, 4, generator=g) for _ in range(3))
        t = torch.tensor([0, 1, 40, 80, 99])
        terms = d.loss_terms(lambda x, tt: out, x0, t, eps)
        a, s = d.coefs(t, x0)
        mse = (out - d.prediction.target(x0, eps, a, s).float()).pow(2).flatten(1).mean(1)  # (B,)
        abar = d.schedule.table("abar", "cpu")[t]  # (B,)
        w = build_loss_weight(weight, name)(abar / (1 - abar))  # (B,)
        assert torch.equal(terms["mse"], mse) and torch.equal(terms["loss"], mse * w)
        assert torch.equal(w, torch.ones(5)) == (weight == "none")
