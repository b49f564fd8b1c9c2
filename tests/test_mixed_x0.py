import pytest
import torch

from stepwise.artifacts import load_denoiser, save_model
from stepwise.diffusion import Diffusion
from stepwise.errors import ConfigError
from stepwise.loss_weights import LossWeight
from stepwise.mixed_x0 import (HEAD_SPACES, MIXINGS, ROUTES, LearnedMixing, LossBasedMixing, MixedX0Prediction,
                               acc_from_x0_eps, build_mixing, mix_x0, mixed_x0_losses, route_targets, route_x0,
                               split_heads, x0_from_acc)
from stepwise.models import build_model
from stepwise.schedules import NoiseSchedule, t_bin

T = 100
SCHED = NoiseSchedule("linear", T)


def close(x, y, tol=1e-10):
    assert x.shape == y.shape and torch.allclose(x, y, rtol=tol, atol=tol), (x, y)


def second_derivative(path, at: torch.Tensor) -> torch.Tensor:
    """d^2 path/du^2 at u = `at` for an elementwise path R -> R^5, by double backward on one u per component."""
    u = at.detach().repeat(5).requires_grad_(True)  # (5,): component j depends on u_j only
    (d1,) = torch.autograd.grad(path(u).sum(), u, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), u)
    return d2


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (8,), generator=g)
    abar = SCHED.abar[t].view(-1, 1, 1, 1)  # float64
    x0 = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return t, x0, eps, a, s, a * x0 + s * eps


def test_oracle_heads_give_exact_x0_on_every_route(batch):
    t, x0, eps, a, s, x_t = batch
    out = route_targets(x0, eps, a, s)  # (B, 3C, H, W)
    assert out.shape == (8, 6, 4, 4)
    routes = route_x0(out, x_t, a, s)
    for r in range(len(ROUTES)):
        close(routes[:, r], x0)
    for mixing in (LearnedMixing(T), LossBasedMixing(T)):
        x0_hat, eps_hat = MixedX0Prediction(mixing).to_x0_eps(out, x_t, a, s, t)
        close(x0_hat, x0, 1e-6)
        close(eps_hat, eps, 1e-6)
        loss, diag = mixed_x0_losses(out, x0, eps, a, s, t, mixing)
        assert sorted(diag) == ["mse", "x0err_acc", "x0err_v", "x0err_x0"]
        assert loss.shape == (8,) and loss.abs().max() < 1e-10
        assert all(v.shape == (8,) and v.max() < 1e-10 for v in diag.values())


def test_acceleration_is_second_sigma_derivative_of_the_path():
    """acc = a^-3 d^2x/dsigma^2 on x(sigma) = (x0 + sigma eps)/sqrt(1 + sigma^2), and inverting it gives x0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    for abar in (0.99, 0.5, 0.02):
        a, s = torch.tensor(abar, dtype=torch.float64).sqrt(), torch.tensor(1 - abar, dtype=torch.float64).sqrt()
        d2 = second_derivative(lambda sig: (x0 + sig * eps) / torch.sqrt(1 + sig * sig), s / a)  # (5,)
        acc = acc_from_x0_eps(x0, eps, a, s)
        close(d2, a ** 3 * acc)
        close(x0_from_acc(a * x0 + s * eps, acc, a, s), x0)
        d2_phi = second_derivative(lambda p: torch.cos(p) * x0 + torch.sin(p) * eps, torch.atan2(s, a))
        close(d2_phi, -(a * x0 + s * eps))  # the angle's second derivative is -x_t: why it is not used


def test_routes_have_different_error_amplification(batch):
    """A unit head error becomes an x0 error of 1 (direct), s (velocity) and 1/2 (acceleration)."""
    t, x0, eps, a, s, x_t = batch
    exact = route_targets(x0, eps, a, s)
    delta = torch.ones_like(x0)
    for r, gain in enumerate((torch.ones_like(a), s, torch.full_like(a, 0.5))):
        out = exact.clone()
        out[:, 2 * r : 2 * r + 2] += delta
        err = route_x0(out, x_t, a, s)[:, r] - x0
        close(err.abs(), (gain * delta).expand_as(err))


@pytest.mark.parametrize("name", sorted(MIXINGS))
def test_mixing_weights_are_a_simplex_per_t(name):
    mixing = build_mixing(name, T, bins=7)
    with torch.no_grad():
        if name == "learned":
            mixing.logits.normal_(generator=torch.Generator().manual_seed(0))
        else:
            t = torch.arange(0, T, 3)
            mixing.update(t, torch.rand(len(t), 3, generator=torch.Generator().manual_seed(0)))
    table = mixing.table()
    assert table.shape == (7, 3) and (table >= 0).all() and torch.allclose(table.sum(1), torch.ones(7))
    w = mixing.weights(torch.arange(T))
    assert w.shape == (T, 3) and torch.allclose(w.sum(1), torch.ones(T))
    assert torch.equal(t_bin(torch.tensor([0, 14, 15, 99]), T, 7), torch.tensor([0, 0, 1, 6]))


def test_loss_based_weights_favour_the_lower_error_route():
    mixing = LossBasedMixing(T, bins=4, decay=0.5)
    t = torch.tensor([10, 10, 60])  # bins 0, 0, 2
    mixing.update(t, torch.tensor([[1.0, 0.25, 0.5], [1.0, 0.25, 0.5], [0.1, 1.0, 1.0]]))
    table = mixing.table()
    close(table[0].double(), torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64) / 7, 1e-6)  # inverse errors
    assert table[2].argmax() == 0 and table[0].argmax() == 1
    close(table[1].double(), torch.full((3,), 1 / 3, dtype=torch.float64), 1e-6)  # unseen bin: uniform
    mixing.update(torch.tensor([10]), torch.tensor([[0.0, 0.25, 0.5]]))  # EMA: (1 + 0)/2 = 0.5 for route 0
    close(mixing.ema[0], torch.tensor([0.5, 0.25, 0.5], dtype=torch.float64))
    state = mixing.state_dict()
    assert set(state) == {"ema", "seen"}
    fresh = LossBasedMixing(T, bins=4, decay=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.table(), mixing.table())


def test_learned_mixing_moves_towards_the_exact_route(batch):
    t, x0, eps, a, s, x_t = batch
    g = torch.Generator().manual_seed(2)
    out = route_targets(x0, eps, a, s) + torch.cat([torch.zeros_like(x0), torch.randn(8, 4, 4, 4, generator=g,
                                                                                       dtype=torch.float64)], 1)
    out.requires_grad_(True)
    mixing = LearnedMixing(T, bins=1)
    for _ in range(30):  # plain gradient descent on the logits
        loss, _ = mixed_x0_losses(out, x0, eps, a, s, t, mixing)
        mixing.logits.grad = None
        loss.mean().backward()
        with torch.no_grad():
            mixing.logits -= 1.0 * mixing.logits.grad
    assert mixing.table()[0, 0] > 0.6
    assert out.grad is not None and out.grad[:, :2].abs().max() < 1e-12  # exact head: no head gradient


def test_loss_is_head_mse_plus_mixture_mse(batch):
    t, x0, eps, a, s, x_t = batch
    out = torch.randn(8, 6, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mixing = LossBasedMixing(T)
    loss, diag = mixed_x0_losses(out, x0, eps, a, s, t, mixing)
    head = (out - route_targets(x0, eps, a, s)).pow(2).flatten(1).mean(1)
    mix = (mix_x0(route_x0(out, x_t, a, s), mixing.weights(t)) - x0).pow(2).flatten(1).mean(1)
    close(loss.double(), (head + mix).double(), 1e-5)
    close(diag["mse"], head)
    err = torch.stack([diag[f"x0err_{r}"] for r in ROUTES], 1)  # (B, 3)
    close(err.double(), (route_x0(out, x_t, a, s) - x0[:, None]).pow(2).flatten(2).mean(2).double(), 1e-5)


def test_is_a_diffusion_prediction_that_owns_its_mixing():
    """Diffusion holds the mixing only through its prediction: parameters and state are found generically."""
    learned = Diffusion("linear", T, "mixed_x0", mixing="learned", mixing_args={"bins": 4})
    assert learned.out_channels_factor == 3
    assert [n for n, _ in learned.named_parameters()] == ["prediction.mixing.logits"]
    based = Diffusion("linear", T, "mixed_x0", mixing="loss_based")
    assert list(based.state_dict()) == ["prediction.mixing.ema", "prediction.mixing.seen"]
    assert list(based.parameters()) == []


def test_prediction_uses_the_weights_of_t_bin_not_a_guess_from_a():
    """to_x0_eps is given t: each example is mixed with its own bin's weights, whatever a it is handed."""
    d = Diffusion("linear", T, "mixed_x0", mixing_args={"bins": 3})
    with torch.no_grad():
        d.prediction.mixing.logits.copy_(torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0]]) * 4)  # one route per bin
    g = torch.Generator().manual_seed(4)
    out = torch.randn(3, 6, 2, 2, generator=g)  # routes disagree
    x_t = torch.randn(3, 2, 2, 2, generator=g)
    t = torch.tensor([5, 50, 95])  # bins 0, 1, 2
    a, s = d.coefs(torch.full((3,), 50), x_t)  # the same a for all: a nearest-neighbour t would pick bin 1 for all
    x0_hat, _ = d.prediction.to_x0_eps(out, x_t, a, s, t)
    routes = route_x0(out, x_t, a, s)  # (B, 3, C, H, W)
    for i in range(3):
        close(x0_hat[i], routes[i, i], 1e-4)
    x0_hat, _ = d.predict_x0_eps(lambda x, tt: out, x_t, t)  # through Diffusion: a and t agree
    a, s = d.coefs(t, x_t)
    close(x0_hat, torch.stack([route_x0(out, x_t, a, s)[i, i] for i in range(3)]), 1e-4)


def test_update_feeds_route_errors_to_loss_based_mixing(batch):
    t, x0, eps, a, s, x_t = batch
    pred = MixedX0Prediction(LossBasedMixing(T, bins=4))
    out = torch.randn(8, 6, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, diag = pred.losses(out, x0, eps, a, s, t)
    pred.update(t, diag)
    direct = LossBasedMixing(T, bins=4)
    direct.update(t, torch.stack([diag[f"x0err_{r}"] for r in ROUTES], 1))
    assert torch.equal(pred.mixing.ema, direct.ema) and pred.mixing.seen.any()


def weighted_schedule(name):
    """A 4-step schedule with SNR_t = 10, 2, 1, 0.25 (abar = SNR/(1 + SNR)) and loss weight `name` on it."""
    sched = NoiseSchedule("linear", 4)
    sched.abar = torch.tensor([10 / 11, 2 / 3, 1 / 2, 1 / 5], dtype=torch.float64)
    return sched, LossWeight(name, sched)


@pytest.mark.parametrize("name, w_x0, w_v, w_acc", [
    # min_snr, gamma = 5: x0 min(SNR, 5), v min(SNR, 5)/(SNR+1), acc min(SNR, 5)/4
    ("min_snr", [5.0, 2.0, 1.0, 0.25], [5 / 11, 2 / 3, 1 / 2, 0.2], [1.25, 0.5, 0.25, 0.0625]),
    # p2, k = gamma = 1: x0 SNR/(1+SNR), v SNR/(1+SNR)^2, acc SNR/(1+SNR)/4
    ("p2", [10 / 11, 2 / 3, 1 / 2, 0.2], [10 / 121, 2 / 9, 1 / 4, 0.16], [10 / 44, 1 / 6, 1 / 8, 0.05]),
    ("none", [1.0] * 4, [1.0] * 4, [1.0] * 4),
])
def test_each_head_is_weighted_in_its_own_space(name, w_x0, w_v, w_acc):
    """loss = mean_r w_r(t) MSE_r + w_x0(t) MSE_mix, with hand-computed weights per head space."""
    sched, weight = weighted_schedule(name)
    pred = MixedX0Prediction(LossBasedMixing(4, bins=4), weight)
    g = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    out = torch.randn(4, 6, 3, 3, generator=g)
    t = torch.arange(4)
    abar = sched.table("abar", "cpu")[t].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    loss, _ = pred.losses(out, x0, eps, a, s, t)
    heads = (split_heads(out) - split_heads(route_targets(x0, eps, a, s))).pow(2).flatten(2).mean(2)  # (B, 3)
    mix = (mix_x0(route_x0(out, a * x0 + s * eps, a, s), torch.full((4, 3), 1 / 3)) - x0).pow(2).flatten(1).mean(1)
    w = torch.tensor([w_x0, w_v, w_acc]).T  # (B, 3)
    torch.testing.assert_close(loss, (w * heads).mean(1) + torch.tensor(w_x0) * mix, rtol=1e-5, atol=0)
    assert HEAD_SPACES == ROUTES


@pytest.mark.parametrize("name", ["min_snr", "p2"])
def test_weighted_head_loss_is_the_x0_weighted_error_of_its_route(name):
    """w_head MSE_head = w_x0 MSE(x0 of that route) for every head: one x0 objective, whatever the head's space."""
    sched, weight = weighted_schedule(name)
    t = torch.tensor([0, 1, 3])  # SNR 10, 2, 0.25
    abar = sched.abar[t].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    g = torch.Generator().manual_seed(7)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                    dtype=torch.float64)
    exact = route_targets(x0, eps, a, s)
    out = exact + torch.randn(exact.shape, generator=g, dtype=torch.float64)
    head_mse = (split_heads(out) - split_heads(exact)).pow(2).flatten(2).mean(2)  # (B, 3)
    route_mse = (route_x0(out, a * x0 + s * eps, a, s) - x0[:, None]).pow(2).flatten(2).mean(2)  # (B, 3)
    for r, space in enumerate(HEAD_SPACES):
        close(weight(t, space).double() * head_mse[:, r], weight(t, "x0").double() * route_mse[:, r], 1e-5)


@pytest.mark.parametrize("mixing", sorted(MIXINGS))
def test_model_files_with_pre_interface_keys_still_load(tmp_path, mixing):
    """Files written before the prediction owned the mixing keep its state as 'mixing.*' at Diffusion's top level."""
    g = torch.Generator().manual_seed(8)
    old_state = ({"mixing.logits": torch.randn(4, 3, generator=g)} if mixing == "learned" else
                 {"mixing.ema": torch.rand(4, 3, generator=g, dtype=torch.float64),
                  "mixing.seen": torch.tensor([True, False, True, False])})
    cfg = dict(schedule="linear", T=T, prediction="mixed_x0", loss_weight="none", loss_weight_args={},
               mixing=mixing, mixing_args={"bins": 4})
    model_cfg = dict(name="unet", base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[])
    net = build_model(model_cfg, 8, 1, out_channels=3)
    save_model(tmp_path / "model.pt", model_cfg=model_cfg, diffusion_cfg=cfg, image_shape=(1, 8, 8),
               state_dict=net.state_dict(), ema_state_dict=net.state_dict(), meta={}, diffusion_state=old_state)
    _, loaded, _ = load_denoiser(tmp_path / "model.pt")
    state = loaded.state_dict()
    assert sorted(state) == sorted("prediction." + k for k in old_state)
    assert all(torch.equal(state["prediction." + k], v) for k, v in old_state.items())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Diffusion("linear", T, "eps").load_state_dict(old_state)  # the key map is mixed x0's, not a catch-all


@pytest.mark.parametrize("name, kwargs, needle", [
    ("softmax", {}, "unknown mixed_x0 mixing 'softmax'; valid: ['learned', 'loss_based']"),
    ("learned", {"bins": 0}, "bins=0 must be an integer in [1, T=100]"),
    ("loss_based", {"decay": 1.0}, "decay=1.0"),
    ("learned", {"decay": 0.9}, "decay"),
])
def test_config_errors(name, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        build_mixing(name, T, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
