"""What the network predicts: eps, x0 or v, with exact conversions between them.

With a = sqrt(abar_t), s = sqrt(1 - abar_t):  x_t = a x0 + s eps,  v = a eps - s x0  (Salimans & Ho 2022,
arXiv 2202.00512, Sec. 4 and App. D). Hence x0 = a x_t - s v and eps = s x_t + a v.
`Prediction` is the interface every prediction type implements (mixed x0, stepwise/mixed_x0.py, included).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .loss_weights import LossWeight


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - s eps) / a (Ho et al. 2020, arXiv 2006.11239, Eq. 4 inverted)."""
    return (x_t - s * eps) / a


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - a x0) / s (Ho et al. 2020, Eq. 4 inverted)."""
    return (x_t - a * x0) / s


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """v = a eps - s x0 (Salimans & Ho 2022, arXiv 2202.00512, Sec. 4)."""
    return a * eps - s * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0 = a x_t - s v (Salimans & Ho 2022, App. D)."""
    return a * x_t - s * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """eps = s x_t + a v (Salimans & Ho 2022, App. D)."""
    return s * x_t + a * v


class Prediction(nn.Module):
    """One network output type: the interface through which Diffusion and the training loop use it, unaware of the type.

    - `out_channels_factor`: the network outputs C * factor channels for C-channel images;
    - `target(x0, eps, a, s)`: the regression target of the output (same shape as the output);
    - `to_x0_eps(out, x_t, a, s, t)`: (x0_hat, eps_hat) implied by the output at (x_t, t);
    - `losses(out, x0, eps, a, s, t)`: (per-example loss the optimiser minimises (B,), diagnostics {name: (B,)});
      diagnostics["mse"] is the unweighted MSE of the output on its target (what loss-aware timestep samplers and the
      per-t-bin loss log see); any other entry is logged per t-bin as `<name>_bin/kk`;
    - `update(t, diagnostics)`: after each optimiser step, with the (all-gathered) diagnostics of the global batch;
    - trainable state is the module's own: parameters (found by `Diffusion.parameters()`) and buffers (saved in
      `Diffusion.state_dict()` under 'prediction.').

    Here a = sqrt(abar_t), s = sqrt(1 - abar_t) broadcast against the images (B, ...), t the timesteps (B,).
    """

    name = ""
    space = ""  # the loss space of `target` (stepwise.loss_weights.LOSS_SPACES)
    out_channels_factor = 1
    legacy_state_prefixes: tuple[str, ...] = ()  # keys of this type's state that older files keep at Diffusion's top

    def __init__(self, loss_weight: LossWeight | None = None):
        super().__init__()
        self.loss_weight = loss_weight  # None: unweighted

    @classmethod
    def build(cls, T: int, loss_weight: LossWeight | None = None, **options) -> "Prediction":
        """This type for a T-step schedule. `options` are the diffusion config's prediction-specific settings
        (mixing, mixing_args); a type uses those its `build` names and ignores the rest."""
        return cls(loss_weight)

    def weight(self, t: torch.Tensor, space: str) -> torch.Tensor:
        """Loss weight w(SNR_t) (B,) of an MSE in `space` (stepwise.loss_weights), 1 without a loss weight."""
        return self.loss_weight(t, space) if self.loss_weight is not None else torch.ones(len(t), device=t.device)

    def target(self, x0, eps, a, s):
        """The regression target for the network output."""
        raise NotImplementedError

    def to_x0_eps(self, out, x_t, a, s, t):
        """(x0_hat, eps_hat) implied by network output `out` at x_t, timesteps t (B,)."""
        raise NotImplementedError

    def losses(self, out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
               t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(w(SNR_t) x MSE (B,), {'mse': MSE (B,)}): the weighted regression onto `target` (Ho et al. 2020, Eq. 14)."""
        mse = (out - self.target(x0, eps, a, s).float()).pow(2).flatten(1).mean(1)  # (B,)
        return mse * self.weight(t, self.space).to(mse), {"mse": mse}  # (B,)

    def update(self, t: torch.Tensor, diagnostics: dict) -> None:
        """Observe the diagnostics {name: (B,)} of `losses` at t (B,) after an optimiser step; stateless types ignore it."""


class EpsPrediction(Prediction):
    """Predict the noise eps (Ho et al. 2020, Eq. 14)."""

    name = space = "eps"

    def target(self, x0, eps, a, s):
        return eps

    def to_x0_eps(self, out, x_t, a, s, t):
        return x0_from_eps(x_t, out, a, s), out


class X0Prediction(Prediction):
    """Predict the clean image x0 directly (Ho et al. 2020, Sec. 3.2 'mean/x0' variant)."""

    name = space = "x0"

    def target(self, x0, eps, a, s):
        return x0

    def to_x0_eps(self, out, x_t, a, s, t):
        return out, eps_from_x0(x_t, out, a, s)


class VPrediction(Prediction):
    """Predict the velocity v = a eps - s x0 (Salimans & Ho 2022, Sec. 4)."""

    name = space = "v"

    def target(self, x0, eps, a, s):
        return v_from_x0_eps(x0, eps, a, s)

    def to_x0_eps(self, out, x_t, a, s, t):
        return x0_from_v(x_t, out, a, s), eps_from_v(x_t, out, a, s)


PREDICTIONS = {p.name: p for p in (EpsPrediction, X0Prediction, VPrediction)}


def get_prediction(name: str, loss_weight: LossWeight | None = None) -> Prediction:
    """Instantiate a prediction type from PREDICTIONS by name (unweighted unless `loss_weight` is given)."""
    if name not in PREDICTIONS:
        raise ConfigError(f"unknown prediction type {name!r}; valid: {sorted(PREDICTIONS)}")
    return PREDICTIONS[name](loss_weight)
