"""The training objective: noise x0 to x_t, ask the network for its prediction, regress onto the target."""
from __future__ import annotations

import torch
from torch import nn

from .parameterisations import get_prediction
from .schedules import NoiseSchedule


class Diffusion:
    """A noise schedule plus a prediction type: per-example denoising losses and (x0, eps) read-outs."""

    def __init__(self, schedule: str = "linear", T: int = 1000, prediction: str = "eps"):
        self.schedule = NoiseSchedule(schedule, T)
        self.prediction = get_prediction(prediction)
        self.T = T

    @classmethod
    def from_config(cls, cfg: dict) -> "Diffusion":
        return cls(cfg.get("schedule", "linear"), int(cfg.get("T", 1000)), cfg.get("prediction", "eps"))

    def coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) = (sqrt(abar_t), sqrt(1 - abar_t)) broadcast against `like` (B, ...)."""
        abar = self.schedule.at("abar", t, like)  # (B,1,1,1)
        return abar.sqrt(), (1 - abar).sqrt()

    def losses(self, model: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example MSE between network output and target, mean over pixels (Ho et al. 2020, Eq. 14): (B,)."""
        a, s = self.coefs(t, x0)
        x_t = a * x0 + s * eps  # (B, C, H, W)
        out = model(x_t, t)  # (B, C, H, W)
        target = self.prediction.target(x0, eps, a, s)  # (B, C, H, W)
        return (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)

    def predict_x0_eps(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network at (x_t, t)."""
        a, s = self.coefs(t, x_t)
        return self.prediction.to_x0_eps(model(x_t, t).float(), x_t, a, s)
