"""Per-example loss weights as functions of SNR(t) and the loss space (the quantity whose MSE is weighted).

With SNR = abar/(1-abar) and the network read back as x0_hat, the per-example MSEs of the targets are tied by
    ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2,    ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2,
so a weighting defined in one space is carried to another by these factors (Hang et al. 2023, arXiv 2303.09556).
In general a space whose read-out is x0 = c_skip x_t + c_out y has ||y - y_hat||^2 = ||x0 - x0_hat||^2 / c_out^2, so
its weight is w_x0 c_out^2: eps c_out = -s/a (1/SNR), v c_out = -s (1/(SNR+1)), and the acceleration head of mixed x0
(stepwise/mixed_x0.py) c_out = 1/2 (1/4). Each weight is chosen so that w_space * MSE_space is the same function of
the x0 error whatever the space. A prediction type asks for the weight of each space it regresses in
(stepwise/parameterisations.py: one space per type, one per head for mixed x0).
"""
from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable

import torch

from .errors import ConfigError

LOSS_SPACES = ("acc", "eps", "v", "x0")


def to_space(weight_x0: torch.Tensor, snr: torch.Tensor, space: str) -> torch.Tensor:
    """A weight on the x0-MSE (B,) re-expressed on the `space` MSE, times c_out^2: eps /SNR, v /(SNR+1) (arXiv
    2303.09556), acc /4 (ours, x0 = (acc + 3 a x_t)/2)."""
    return {"x0": weight_x0, "eps": weight_x0 / snr, "v": weight_x0 / (snr + 1), "acc": weight_x0 / 4}[space]  # (B,)


def no_weight(snr: torch.Tensor, space: str = "eps") -> torch.Tensor:
    """w = 1: the plain ('simple') objective of Ho et al. 2020 (arXiv 2006.11239, Eq. 14) in each space."""
    return torch.ones_like(snr)  # (B,)


def min_snr_weight(snr: torch.Tensor, space: str = "eps", gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma: x0 min(SNR, g), eps min(SNR, g)/SNR, v min(SNR, g)/(SNR+1), acc min(SNR, g)/4; 1 at SNR=0
    (arXiv 2303.09556; the acc space is ours)."""
    w = to_space(snr.clamp(max=gamma), snr, space)  # (B,)
    return torch.where(snr == 0, torch.ones_like(w), w)  # (B,)


def p2_weight(snr: torch.Tensor, space: str = "eps", k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2: lambda = 1/(k + SNR)^gamma on the eps-MSE (Choi et al. 2022, arXiv 2204.00227), carried to x0, v, acc."""
    lam_eps = (k + snr).pow(-gamma)  # (B,)
    return lam_eps if space == "eps" else to_space(lam_eps * snr, snr, space)  # (B,)


LOSS_WEIGHTS = {"none": no_weight, "min_snr": min_snr_weight, "p2": p2_weight}

# Valid range of every hyper-parameter: (predicate, description).
_RANGES = {
    ("min_snr", "gamma"): (lambda x: 0 < x < math.inf, "> 0"),
    ("p2", "k"): (lambda x: 0 < x < math.inf, "> 0"),
    ("p2", "gamma"): (lambda x: 0 <= x < math.inf, ">= 0"),
}


def build_loss_weight(name: str, space: str, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight function snr (B,) -> w (B,) registered as `name` in LOSS_WEIGHTS, for an MSE in `space`."""
    if name not in LOSS_WEIGHTS:
        raise ConfigError(f"unknown loss weight {name!r}; valid: {sorted(LOSS_WEIGHTS)}")
    if space not in LOSS_SPACES:
        raise ConfigError(f"loss weight {name!r}: unknown loss space {space!r}; valid: {sorted(LOSS_SPACES)}")
    fn = LOSS_WEIGHTS[name]
    valid = [p for p in inspect.signature(fn).parameters if p not in ("snr", "space")]
    for key, value in kwargs.items():
        if key not in valid:
            raise ConfigError(f"loss weight {name!r}: unknown argument {key!r}; valid: {valid}")
        ok, text = _RANGES[(name, key)]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ConfigError(f"loss weight {name!r}: {key}={value!r} must be a number {text}")
    return partial(fn, space=space, **kwargs)


class LossWeight:
    """A loss weighting read at timesteps of a schedule: `weight(t, space)` = w(SNR_t) for an MSE in `space`, (B,).

    What a prediction type (stepwise.parameterisations.Prediction) multiplies each of its per-example MSEs by;
    SNR_t = abar_t / (1 - abar_t) from the schedule's float32 abar table on t's device.
    """

    def __init__(self, name: str, schedule, **kwargs):
        self.by_space = {space: build_loss_weight(name, space, **kwargs) for space in LOSS_SPACES}
        self.name, self.schedule = name, schedule

    def __call__(self, t: torch.Tensor, space: str) -> torch.Tensor:
        if space not in self.by_space:
            raise ConfigError(f"loss weight {self.name!r}: unknown loss space {space!r}; valid: {sorted(LOSS_SPACES)}")
        abar = self.schedule.table("abar", t.device)[t]  # (B,)
        return self.by_space[space](abar / (1 - abar))  # (B,)
