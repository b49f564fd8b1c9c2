"""Mixed x0 prediction from three routes: direct, velocity, acceleration (Xie & Agam, arXiv 2502.01990).

The paper proposes, without formulas, to estimate x0 along three routes and mix them per timestep. Our definition:
the network has 3C output channels, heads (x0_direct, v, acc), with a = sqrt(abar_t), s = sqrt(1 - abar_t):

  direct        x0 = x0_direct;
  velocity      x0 = a x_t - s v, v = a eps - s x0 = dx/dphi on x = cos(phi) x0 + sin(phi) eps (Salimans & Ho 2022,
                arXiv 2202.00512, App. D);
  acceleration  x0 = (acc + 3 a x_t)/2, acc = a^-3 d^2x/dsigma^2 = 2 x0 - 3 a x_t = (2 - 3a^2) x0 - 3 a s eps.

"Acceleration" is the second derivative of the per-example forward path with respect to the EDM/DDIM noise level
sigma = s/a (Karras et al. 2022, arXiv 2206.00364; the ODE time of DDIM, arXiv 2010.02502): the path
x(sigma) = (x0 + sigma eps)/sqrt(1 + sigma^2) has d^2x/dsigma^2 = a^3 [(2s^2 - a^2) x0 - 3 a s eps]. The factor
a^-3 preconditions the target to O(1) variance (else the x0 error would be amplified by 1/(2a^3) at high noise).
The second derivative in the angle phi is rejected: d^2x/dphi^2 = -x_t is known from the input and determines nothing.
Every route is x0 = c_skip x_t + c_out head: direct (0, 1), velocity (a, -s), acceleration (3a/2, 1/2), so a head
error e becomes an x0 error of e, s e and e/2; and the heads learn different content: direct always x0; v ~ eps at
low noise and ~ -x0 at high noise; acc ~ -x0 - 3 s eps at low noise, 0.5 x0 - 1.5 eps at SNR = 1, ~ 2 x0 at high noise.
(The eps route x0 = (x_t - s eps)/a, c_out = -s/a, is the second derivative in a; it is not used: it blows up at
high noise.)

Mixing x0_mix = sum_r w_r(t) x0_r with w(t) on the simplex, per t-bin (`bins` equal-width bins of [0, T)):
  "learned":    w = softmax(logits[bin]), a learnable (bins, 3) table trained by the mixture's x0 MSE;
  "loss_based": w ∝ 1/EMA(x0 MSE of route r in the bin) (inverse-variance weighting), updated from training.

Loss (`mixed_x0_losses`), per example: mean over routes of each head's MSE on its own target (each head trains as its
own prediction type, which is what gives the routes different error profiles) + the x0 MSE of the mixture computed
from detached route estimates (so it trains only the learned logits). Per-route x0 MSEs (B, 3) come back for logging
and for `LossBasedMixing.update`, which under data parallelism must be given all-gathered values.
"""
from __future__ import annotations

import torch
from torch import nn

from . import schedules
from .errors import ConfigError
from .parameterisations import Prediction, eps_from_x0, v_from_x0_eps, x0_from_v

ROUTES = ("x0", "v", "acc")


def acc_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """acc = a^-3 d^2x/dsigma^2 = (2 - 3a^2) x0 - 3 a s eps, sigma = s/a (our reading of arXiv 2502.01990)."""
    return (2 - 3 * a * a) * x0 - 3 * a * s * eps


def x0_from_acc(x_t: torch.Tensor, acc: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0 = (acc + 3 a x_t)/2, inverting acc = 2 x0 - 3 a x_t (our reading of arXiv 2502.01990)."""
    return 0.5 * (acc + 3 * a * x_t)


def split_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, 3C, ...) network output -> (B, 3, C, ...) heads in ROUTES order."""
    return out.unflatten(1, (len(ROUTES), -1))


def route_targets(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Regression targets of the three heads, concatenated on channels: (B, 3C, ...)."""
    return torch.cat([x0, v_from_x0_eps(x0, eps, a, s), acc_from_x0_eps(x0, eps, a, s)], 1)


def route_x0(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The three x0 estimates implied by the heads: (B, 3, C, ...)."""
    direct, v, acc = split_heads(out).unbind(1)  # 3 x (B, C, ...)
    return torch.stack([direct, x0_from_v(x_t, v, a, s), x0_from_acc(x_t, acc, a, s)], 1)


def mix_x0(x0_routes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x0_mix = sum_r w_r x0_r for x0_routes (B, 3, C, ...) and simplex weights (B, 3): (B, C, ...)."""
    return (weights.view(*weights.shape, *[1] * (x0_routes.dim() - 2)).to(x0_routes.dtype) * x0_routes).sum(1)


def route_errors(x0_routes: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-example, per-route x0 MSE, mean over pixels: (B, 3)."""
    return (x0_routes - x0.unsqueeze(1)).pow(2).flatten(2).mean(2)


def t_bin(t: torch.Tensor, T: int, bins: int) -> torch.Tensor:
    """Equal-width bin index of each t (B,) among `bins` bins of [0, T): (B,) (`stepwise.schedules.t_bin`)."""
    return schedules.t_bin(t, T, bins)


class RouteMixing(nn.Module):
    """Per-t-bin mixing weights over ROUTES; knows the schedule so it can recover t from a = sqrt(abar_t)."""

    learned = False

    def __init__(self, abar: torch.Tensor, bins: int = 10):
        super().__init__()
        abar = torch.as_tensor(abar, dtype=torch.float64)
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= len(abar):
            raise ConfigError(f"mixed_x0: bins={bins!r} must be an integer in [1, T={len(abar)}]")
        self.T, self.bins = len(abar), bins
        self.register_buffer("sqrt_abar", abar.sqrt(), persistent=False)  # (T,)

    def table(self) -> torch.Tensor:
        """Mixing weights of every bin, rows on the simplex: (bins, 3)."""
        raise NotImplementedError

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Mixing weights for timesteps t (B,): (B, 3)."""
        return self.table()[t_bin(t.to(self.sqrt_abar.device), self.T, self.bins)]

    def t_from_a(self, a: torch.Tensor) -> torch.Tensor:
        """The t whose sqrt(abar_t) is nearest to a (B, ...), first element per example: (B,)."""
        a = a.reshape(len(a), -1)[:, 0].to(self.sqrt_abar)  # (B,)
        return (self.sqrt_abar[None, :] - a[:, None]).abs().argmin(1)  # (B,)

    def update(self, t: torch.Tensor, route_err: torch.Tensor) -> None:
        """Observe per-route x0 errors (B, 3) at t (B,); only loss-based mixing uses them."""


class LearnedMixing(RouteMixing):
    """w(t) = softmax(logits[bin(t)]), logits a learnable (bins, 3) table initialised to uniform weights."""

    learned = True

    def __init__(self, abar: torch.Tensor, bins: int = 10):
        super().__init__(abar, bins)
        self.logits = nn.Parameter(torch.zeros(bins, len(ROUTES)))  # (bins, 3)

    def table(self) -> torch.Tensor:
        return self.logits.softmax(-1)  # (bins, 3)


class LossBasedMixing(RouteMixing):
    """w_r(t) ∝ 1/EMA_r(bin(t)), the inverse of each route's smoothed x0 MSE in the t-bin; uniform in unseen bins."""

    def __init__(self, abar: torch.Tensor, bins: int = 10, decay: float = 0.99, eps: float = 1e-12):
        super().__init__(abar, bins)
        if not 0 <= decay < 1:
            raise ConfigError(f"mixed_x0: decay={decay!r} (EMA decay of route errors) must be in [0, 1)")
        if not eps > 0:
            raise ConfigError(f"mixed_x0: eps={eps!r} must be > 0")
        self.decay, self.eps = float(decay), float(eps)
        self.register_buffer("ema", torch.ones(bins, len(ROUTES), dtype=torch.float64))  # (bins, 3)
        self.register_buffer("seen", torch.zeros(bins, dtype=torch.bool))  # (bins,)

    def table(self) -> torch.Tensor:
        inv = 1.0 / (self.ema + self.eps)  # (bins, 3)
        w = inv / inv.sum(1, keepdim=True)  # (bins, 3)
        return torch.where(self.seen[:, None], w, torch.full_like(w, 1 / len(ROUTES))).float()

    @torch.no_grad()
    def update(self, t: torch.Tensor, route_err: torch.Tensor) -> None:
        """EMA of each bin's batch-mean route errors (B, 3); a bin's first observation initialises it."""
        b = t_bin(t.to(self.ema.device), self.T, self.bins)  # (B,)
        sums = torch.zeros_like(self.ema).index_add_(0, b, route_err.detach().to(self.ema))  # (bins, 3)
        counts = torch.bincount(b, minlength=self.bins).to(self.ema)  # (bins,)
        present = counts > 0  # (bins,)
        mean = sums / counts.clamp(min=1)[:, None]  # (bins, 3)
        smoothed = self.decay * self.ema + (1 - self.decay) * mean  # (bins, 3)
        new = torch.where(self.seen[:, None], smoothed, mean)  # (bins, 3)
        self.ema.copy_(torch.where(present[:, None], new, self.ema))
        self.seen |= present


MIXINGS = {"learned": LearnedMixing, "loss_based": LossBasedMixing}


def build_mixing(name: str, abar: torch.Tensor, **kwargs) -> RouteMixing:
    """Instantiate a route mixing from MIXINGS by name for a schedule's abar (T,)."""
    if name not in MIXINGS:
        raise ConfigError(f"unknown mixed_x0 mixing {name!r}; valid: {sorted(MIXINGS)}")
    try:
        return MIXINGS[name](abar, **kwargs)
    except TypeError as e:
        raise ConfigError(f"mixed_x0 mixing {name!r}: {e}") from None


def mixed_x0_losses(out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                    t: torch.Tensor, mixing: RouteMixing) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), per-route x0 MSE (B, 3)): mean head MSE + x0 MSE of the detached-route mixture."""
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # half-precision outputs: compute the loss in fp32
    x_t = a * x0 + s * eps  # (B, C, ...)
    heads, targets = split_heads(out), split_heads(route_targets(x0, eps, a, s))  # (B, 3, C, ...)
    head_mse = (heads - targets).pow(2).flatten(2).mean(2)  # (B, 3)
    x0_routes = route_x0(out, x_t, a, s)  # (B, 3, C, ...)
    x0_mix = mix_x0(x0_routes.detach(), mixing.weights(t).to(out.device))  # (B, C, ...)
    mix_mse = (x0_mix - x0).pow(2).flatten(1).mean(1)  # (B,)
    return head_mse.mean(1) + mix_mse, route_errors(x0_routes, x0).detach()


class MixedX0Prediction(Prediction):
    """Three heads (x0, v, acc) mixed per timestep into one x0 (our reading of arXiv 2502.01990, see module doc).

    `target` is the concatenated head targets, so the plain per-example MSE of stepwise.diffusion trains the heads
    (without the mixture term of `mixed_x0_losses`); `to_x0_eps` recovers t from a through the mixing's schedule.
    """

    name = "mixed_x0"
    out_channels_factor = len(ROUTES)

    def __init__(self, mixing: RouteMixing):
        self.mixing = mixing

    def target(self, x0, eps, a, s):
        return route_targets(x0, eps, a, s)  # (B, 3C, ...)

    def to_x0_eps(self, out, x_t, a, s):
        w = self.mixing.weights(self.mixing.t_from_a(a)).to(out.device)  # (B, 3)
        x0 = mix_x0(route_x0(out, x_t, a, s), w)  # (B, C, ...)
        return x0, eps_from_x0(x_t, x0, a, s)
