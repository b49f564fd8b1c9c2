import pytest
import torch

from stepwise.diffusion import Diffusion
from stepwise.errors import ConfigError
from stepwise.mixed_x0 import (MIXINGS, ROUTES, LearnedMixing, LossBasedMixing, MixedX0Prediction, acc_from_x0_eps,
                               build_mixing, mix_x0, mixed_x0_losses, route_targets, route_x0, t_bin, x0_from_acc)
from stepwise.schedules import NoiseSchedule

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
    for mixing in (LearnedMixing(SCHED.abar), LossBasedMixing(SCHED.abar)):
        x0_hat, eps_hat = MixedX0Prediction(mixing).to_x0_eps(out, x_t, a, s)
        close(x0_hat, x0, 1e-6)
        close(eps_hat, eps, 1e-6)
        loss, err = mixed_x0_losses(out, x0, eps, a, s, t, mixing)
        assert loss.shape == (8,) and err.shape == (8, 3) and loss.abs().max() < 1e-10 and err.max() < 1e-10


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
    mixing = build_mixing(name, SCHED.abar, bins=7)
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
    mixing = LossBasedMixing(SCHED.abar, bins=4, decay=0.5)
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
    fresh = LossBasedMixing(SCHED.abar, bins=4, decay=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.table(), mixing.table())


def test_learned_mixing_moves_towards_the_exact_route(batch):
    t, x0, eps, a, s, x_t = batch
    g = torch.Generator().manual_seed(2)
    out = route_targets(x0, eps, a, s) + torch.cat([torch.zeros_like(x0), torch.randn(8, 4, 4, 4, generator=g,
                                                                                       dtype=torch.float64)], 1)
    out.requires_grad_(True)
    mixing = LearnedMixing(SCHED.abar, bins=1)
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
    mixing = LossBasedMixing(SCHED.abar)
    loss, err = mixed_x0_losses(out, x0, eps, a, s, t, mixing)
    head = (out - route_targets(x0, eps, a, s)).pow(2).flatten(1).mean(1)
    mix = (mix_x0(route_x0(out, x_t, a, s), mixing.weights(t)) - x0).pow(2).flatten(1).mean(1)
    close(loss.double(), (head + mix).double(), 1e-5)
    close(err.double(), (route_x0(out, x_t, a, s) - x0[:, None]).pow(2).flatten(2).mean(2).double(), 1e-5)


def test_works_as_a_diffusion_prediction():
    diffusion = Diffusion("linear", T, "x0")
    mixing = LearnedMixing(diffusion.schedule.abar)
    diffusion.prediction = MixedX0Prediction(mixing)
    conv = torch.nn.Conv2d(2, 2 * MixedX0Prediction.out_channels_factor, 1)
    model = lambda x, t: conv(x)  # noqa: E731
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([0, 30, 60, 99])
    assert diffusion.losses(model, x0, t, eps).shape == (4,)
    a, _ = diffusion.coefs(t, x0)  # float32 a from the schedule table
    assert torch.equal(mixing.t_from_a(a), t)
    x0_hat, eps_hat = diffusion.predict_x0_eps(model, x0, t)
    assert x0_hat.shape == eps_hat.shape == (4, 2, 4, 4)


@pytest.mark.parametrize("name, kwargs, needle", [
    ("softmax", {}, "unknown mixed_x0 mixing 'softmax'; valid: ['learned', 'loss_based']"),
    ("learned", {"bins": 0}, "bins=0 must be an integer in [1, T=100]"),
    ("loss_based", {"decay": 1.0}, "decay=1.0"),
    ("learned", {"decay": 0.9}, "decay"),
])
def test_config_errors(name, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        build_mixing(name, SCHED.abar, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
