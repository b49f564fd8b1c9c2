"""Per-example loss weights as functions of SNR(t) and the prediction type (what the MSE is measured on).

With SNR = abar/(1-abar) and the network read back as x0_hat, the per-example MSEs of the three targets are tied by
    ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2,    ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2,
so a weighting defined in one space is carried to another by these factors (Hang et al. 2023, arXiv 2303.09556).
Each weight is chosen so that w_pred * MSE_pred is the same function of the x0 error whatever the prediction type.
"mixed_x0" (stepwise/mixed_x0.py) measures its loss on x0, so it is weighted as "x0".
"""
from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable

import torch

from .errors import ConfigError

LOSS_SPACES = {"eps": "eps", "x0": "x0", "v": "v", "mixed_x0": "x0"}


def to_space(weight_x0: torch.Tensor, snr: torch.Tensor, space: str) -> torch.Tensor:
    """A weight on the x0-MSE (B,) re-expressed on the `space` MSE via eps: /SNR, v: /(SNR+1) (arXiv 2303.09556)."""
    return {"x0": weight_x0, "eps": weight_x0 / snr, "v": weight_x0 / (snr + 1)}[space]  # (B,)


def no_weight(snr: torch.Tensor, prediction: str = "eps") -> torch.Tensor:
    """w = 1: the plain ('simple') objective of Ho et al. 2020 (arXiv 2006.11239, Eq. 14) in each prediction space."""
    return torch.ones_like(snr)  # (B,)


def min_snr_weight(snr: torch.Tensor, prediction: str = "eps", gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma: x0 min(SNR, g), eps min(SNR, g)/SNR, v min(SNR, g)/(SNR+1); 1 at SNR=0 (arXiv 2303.09556)."""
    w = to_space(snr.clamp(max=gamma), snr, LOSS_SPACES[prediction])  # (B,)
    return torch.where(snr == 0, torch.ones_like(w), w)  # (B,)


def p2_weight(snr: torch.Tensor, prediction: str = "eps", k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2: lambda = 1/(k + SNR)^gamma on the eps-MSE (Choi et al. 2022, arXiv 2204.00227), carried to x0 and v."""
    lam_eps, space = (k + snr).pow(-gamma), LOSS_SPACES[prediction]  # (B,)
    return lam_eps if space == "eps" else to_space(lam_eps * snr, snr, space)  # (B,)


LOSS_WEIGHTS = {"none": no_weight, "min_snr": min_snr_weight, "p2": p2_weight}

# Valid range of every hyper-parameter: (predicate, description).
_RANGES = {
    ("min_snr", "gamma"): (lambda x: 0 < x < math.inf, "> 0"),
    ("p2", "k"): (lambda x: 0 < x < math.inf, "> 0"),
    ("p2", "gamma"): (lambda x: 0 <= x < math.inf, ">= 0"),
}


def build_loss_weight(name: str, prediction: str, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight function snr (B,) -> w (B,) registered as `name` in LOSS_WEIGHTS, for prediction type `prediction`."""
    if name not in LOSS_WEIGHTS:
        raise ConfigError(f"unknown loss weight {name!r}; valid: {sorted(LOSS_WEIGHTS)}")
    if prediction not in LOSS_SPACES:
        raise ConfigError(f"loss weight {name!r}: unknown prediction type {prediction!r}; valid: {sorted(LOSS_SPACES)}")
    fn = LOSS_WEIGHTS[name]
    valid = [p for p in inspect.signature(fn).parameters if p not in ("snr", "prediction")]
    for key, value in kwargs.items():
        if key not in valid:
            raise ConfigError(f"loss weight {name!r}: unknown argument {key!r}; valid: {valid}")
        ok, text = _RANGES[(name, key)]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ConfigError(f"loss weight {name!r}: {key}={value!r} must be a number {text}")
    return partial(fn, prediction=prediction, **kwargs)
