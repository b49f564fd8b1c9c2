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

Mixing x0_mix = sum_r w_r(t) x0_r with w(t) on the simplex, per t-bin (`bins` equal-width bins of [0, T),
stepwise.schedules.t_bin):
  "learned":    w = softmax(logits[bin]), a learnable (bins, 3) table trained by the mixture's x0 MSE;
  "loss_based": w ∝ 1/EMA(x0 MSE of route r in the bin) (inverse-variance weighting), updated from training.

Loss (`mixed_x0_losses`), per example: mean over routes of each head's MSE on its own target, times that head's loss
weight in its own space (each head trains as its own prediction type, which is what gives the routes different error
profiles; weights from stepwise.loss_weights in the spaces HEAD_SPACES = x0, v, acc) + the x0 MSE of the mixture
computed from detached route estimates (so it trains only the learned logits), times the x0-space weight. Per-route
x0 MSEs come back as diagnostics `x0err_<route>` for logging and for `LossBasedMixing.update`, which under data
parallelism must be given all-gathered values.

`MixedX0Prediction` is a stepwise.parameterisations.Prediction: it owns the mixing (a submodule, so learned logits
are found by `Diffusion.parameters()` and loss-based EMAs saved in `Diffusion.state_dict()`), its loss and its
post-step `update`; it receives t, so the mixing never has to recover t from a.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .loss_weights import LossWeight
from .parameterisations import Prediction, eps_from_x0, v_from_x0_eps, x0_from_v
from .schedules import t_bin

ROUTES = ("x0", "v", "acc")
HEAD_SPACES = ("x0", "v", "acc")  # loss space of each head (stepwise.loss_weights), ROUTES order


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


class RouteMixing(nn.Module):
    """Per-t-bin mixing weights over ROUTES for a T-step schedule."""

    learned = False

    def __init__(self, T: int, bins: int = 10):
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= T:
            raise ConfigError(f"mixed_x0: bins={bins!r} must be an integer in [1, T={T}]")
        self.T, self.bins = T, bins

    def table(self) -> torch.Tensor:
        """Mixing weights of every bin, rows on the simplex: (bins, 3)."""
        raise NotImplementedError

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Mixing weights for timesteps t (B,): (B, 3)."""
        table = self.table()  # (bins, 3)
        return table[t_bin(t.to(table.device), self.T, self.bins)]  # (B, 3)

    def update(self, t: torch.Tensor, route_err: torch.Tensor) -> None:
        """Observe per-route x0 errors (B, 3) at t (B,); only loss-based mixing uses them."""


class LearnedMixing(RouteMixing):
    """w(t) = softmax(logits[bin(t)]), logits a learnable (bins, 3) table initialised to uniform weights."""

    learned = True

    def __init__(self, T: int, bins: int = 10):
        super().__init__(T, bins)
        self.logits = nn.Parameter(torch.zeros(bins, len(ROUTES)))  # (bins, 3)

    def table(self) -> torch.Tensor:
        return self.logits.softmax(-1)  # (bins, 3)


class LossBasedMixing(RouteMixing):
    """w_r(t) ∝ 1/EMA_r(bin(t)), the inverse of each route's smoothed x0 MSE in the t-bin; uniform in unseen bins."""

    def __init__(self, T: int, bins: int = 10, decay: float = 0.99, eps: float = 1e-12):
        super().__init__(T, bins)
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


def build_mixing(name: str, T: int, **kwargs) -> RouteMixing:
    """Instantiate a route mixing from MIXINGS by name for a T-step schedule."""
    if name not in MIXINGS:
        raise ConfigError(f"unknown mixed_x0 mixing {name!r}; valid: {sorted(MIXINGS)}")
    try:
        return MIXINGS[name](T, **kwargs)
    except TypeError as e:
        raise ConfigError(f"mixed_x0 mixing {name!r}: {e}") from None


def mixed_x0_losses(out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                    t: torch.Tensor, mixing: RouteMixing, head_weights: torch.Tensor | None = None,
                    mix_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(loss (B,), diagnostics): mean over heads of w_head x head MSE + w_x0 x x0 MSE of the detached-route mixture.

    head_weights (B, 3): each head's loss weight in its own space (HEAD_SPACES); mix_weight (B,): the x0-space weight;
    both 1 when None. Diagnostics: 'mse' (B,), the unweighted MSE over all 3C output channels, and 'x0err_<route>'
    (B,), each route's detached x0 MSE.
    """
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # half-precision outputs: compute the loss in fp32
    x_t = a * x0 + s * eps  # (B, C, ...)
    sq = (out - route_targets(x0, eps, a, s)).pow(2)  # (B, 3C, ...)
    head_mse = split_heads(sq).flatten(2).mean(2)  # (B, 3)
    if head_weights is not None:
        head_mse = head_mse * head_weights.to(head_mse)  # (B, 3)
    x0_routes = route_x0(out, x_t, a, s)  # (B, 3, C, ...)
    x0_mix = mix_x0(x0_routes.detach(), mixing.weights(t).to(out.device))  # (B, C, ...)
    mix_mse = (x0_mix - x0).pow(2).flatten(1).mean(1)  # (B,)
    if mix_weight is not None:
        mix_mse = mix_mse * mix_weight.to(mix_mse)  # (B,)
    route_err = route_errors(x0_routes, x0).detach()  # (B, 3)
    diagnostics = {"mse": sq.flatten(1).mean(1), **{f"x0err_{r}": route_err[:, i] for i, r in enumerate(ROUTES)}}
    return head_mse.mean(1) + mix_mse, diagnostics


class MixedX0Prediction(Prediction):
    """Three heads (x0, v, acc) mixed per timestep into one x0 (our reading of arXiv 2502.01990, see module doc).

    `target` is the concatenated head targets; `losses` is `mixed_x0_losses` with each head weighted in its own space;
    `to_x0_eps` mixes the three routes with the weights of t's bin; `update` feeds the route errors to the mixing.
    """

    name = "mixed_x0"
    out_channels_factor = len(ROUTES)
    legacy_state_prefixes = ("mixing.",)  # model files written before the prediction owned the mixing

    def __init__(self, mixing: RouteMixing, loss_weight: LossWeight | None = None):
        super().__init__(loss_weight)
        self.mixing = mixing  # submodule: its logits / EMAs are the prediction's state

    @classmethod
    def build(cls, T: int, loss_weight: LossWeight | None = None, mixing: str = "learned",
              mixing_args: dict | None = None, **options) -> "MixedX0Prediction":
        return cls(build_mixing(mixing, T, **(mixing_args or {})), loss_weight)

    def target(self, x0, eps, a, s):
        return route_targets(x0, eps, a, s)  # (B, 3C, ...)

    def to_x0_eps(self, out, x_t, a, s, t):
        w = self.mixing.weights(t).to(out.device)  # (B, 3)
        x0 = mix_x0(route_x0(out, x_t, a, s), w)  # (B, C, ...)
        return x0, eps_from_x0(x_t, x0, a, s)

    def losses(self, out, x0, eps, a, s, t):
        head_weights = torch.stack([self.weight(t, space) for space in HEAD_SPACES], 1)  # (B, 3)
        return mixed_x0_losses(out, x0, eps, a, s, t, self.mixing, head_weights, self.weight(t, "x0"))

    def update(self, t, diagnostics):
        """Route errors (B, 3) of the global batch to the mixing (loss-based mixing learns from them)."""
        self.mixing.update(t, torch.stack([diagnostics[f"x0err_{r}"] for r in ROUTES], 1))  # (B, 3)
