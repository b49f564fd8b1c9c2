"""The training objective: noise x0 to x_t, ask the network for its prediction, regress onto the target.

Per-example terms: the plain MSE of the prediction (`mse`, what diagnostics and loss-aware samplers see) and the
optimised loss (`loss` = loss weight(SNR_t) x MSE; for mixed x0 the route-mixing objective of stepwise.mixed_x0).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .loss_weights import build_loss_weight
from .mixed_x0 import MixedX0Prediction, build_mixing, mixed_x0_losses
from .parameterisations import PREDICTIONS, get_prediction
from .schedules import NoiseSchedule

PREDICTION_TYPES = sorted([*PREDICTIONS, MixedX0Prediction.name])


class Diffusion(nn.Module):
    """A noise schedule, a prediction type and a loss weighting; holds the mixed-x0 route mixing when used."""

    def __init__(self, schedule: str = "linear", T: int = 1000, prediction: str = "eps", loss_weight: str = "none",
                 loss_weight_args: dict | None = None, mixing: str = "learned", mixing_args: dict | None = None):
        super().__init__()
        self.schedule = NoiseSchedule(schedule, T)
        self.T = T
        if prediction == MixedX0Prediction.name:
            self.mixing = build_mixing(mixing, self.schedule.abar, **(mixing_args or {}))
            self.prediction = MixedX0Prediction(self.mixing)
        elif prediction in PREDICTIONS:
            self.mixing = None
            self.prediction = get_prediction(prediction)
        else:
            raise ConfigError(f"unknown prediction type {prediction!r}; valid: {PREDICTION_TYPES}")
        self.out_channels_factor = getattr(self.prediction, "out_channels_factor", 1)
        self.loss_weight = build_loss_weight(loss_weight, prediction, **(loss_weight_args or {}))

    @classmethod
    def from_config(cls, cfg: dict) -> "Diffusion":
        return cls(**{k: v for k, v in cfg.items() if v is not None})

    def coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) = (sqrt(abar_t), sqrt(1 - abar_t)) broadcast against `like` (B, ...)."""
        abar = self.schedule.at("abar", t, like)  # (B,1,1,1)
        return abar.sqrt(), (1 - abar).sqrt()

    def loss_terms(self, model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict:
        """{'loss': optimised per-example loss (B,), 'mse': unweighted prediction MSE (B,), ['route_err': (B, 3)]}."""
        a, s = self.coefs(t, x0)
        x_t = a * x0 + s * eps  # (B, C, H, W)
        out = model(x_t, t).float()  # (B, C * out_channels_factor, H, W)
        target = self.prediction.target(x0, eps, a, s)  # same shape as out
        mse = (out - target.float()).pow(2).flatten(1).mean(1)  # (B,) (Ho et al. 2020, Eq. 14)
        terms = {"mse": mse}
        if self.mixing is not None:
            terms["loss"], terms["route_err"] = mixed_x0_losses(out, x0, eps, a, s, t, self.mixing)
        else:
            terms["loss"] = mse
        snr = self.schedule.table("abar", t.device)[t]  # (B,) abar_t
        terms["loss"] = terms["loss"] * self.loss_weight(snr / (1 - snr)).to(mse)  # (B,)
        return terms

    def losses(self, model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The optimised per-example loss (B,)."""
        return self.loss_terms(model, x0, t, eps)["loss"]

    def predict_x0_eps(self, model, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network at (x_t, t)."""
        a, s = self.coefs(t, x_t)
        return self.prediction.to_x0_eps(model(x_t, t).float(), x_t, a, s)
