"""What the network predicts: eps, x0 or v, with exact conversions between them.

With a = sqrt(abar_t), s = sqrt(1 - abar_t):  x_t = a x0 + s eps,  v = a eps - s x0  (Salimans & Ho 2022,
arXiv 2202.00512, Sec. 4 and App. D). Hence x0 = a x_t - s v and eps = s x_t + a v.
"""
from __future__ import annotations

import torch

from .errors import ConfigError


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


class Prediction:
    """One network output type: its regression target and how to read (x0, eps) back out of an output."""

    name = ""

    def target(self, x0, eps, a, s):
        """The regression target for the network output."""
        raise NotImplementedError

    def to_x0_eps(self, out, x_t, a, s):
        """(x0_hat, eps_hat) implied by network output `out` at x_t."""
        raise NotImplementedError


class EpsPrediction(Prediction):
    """Predict the noise eps (Ho et al. 2020, Eq. 14)."""

    name = "eps"

    def target(self, x0, eps, a, s):
        return eps

    def to_x0_eps(self, out, x_t, a, s):
        return x0_from_eps(x_t, out, a, s), out


class X0Prediction(Prediction):
    """Predict the clean image x0 directly (Ho et al. 2020, Sec. 3.2 'mean/x0' variant)."""

    name = "x0"

    def target(self, x0, eps, a, s):
        return x0

    def to_x0_eps(self, out, x_t, a, s):
        return out, eps_from_x0(x_t, out, a, s)


class VPrediction(Prediction):
    """Predict the velocity v = a eps - s x0 (Salimans & Ho 2022, Sec. 4)."""

    name = "v"

    def target(self, x0, eps, a, s):
        return v_from_x0_eps(x0, eps, a, s)

    def to_x0_eps(self, out, x_t, a, s):
        return x0_from_v(x_t, out, a, s), eps_from_v(x_t, out, a, s)


PREDICTIONS = {p.name: p for p in (EpsPrediction, X0Prediction, VPrediction)}


def get_prediction(name: str) -> Prediction:
    """Instantiate a prediction type from PREDICTIONS by name."""
    if name not in PREDICTIONS:
        raise ConfigError(f"unknown prediction type {name!r}; valid: {sorted(PREDICTIONS)}")
    return PREDICTIONS[name]()
