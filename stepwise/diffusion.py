"""The training objective: noise x0 to x_t, ask the network for its prediction, let the prediction type score it.

Diffusion knows nothing of any prediction type: it calls the stepwise.parameterisations.Prediction interface
(`losses`, `to_x0_eps`, `out_channels_factor`), and the prediction owns its loss weighting and trainable state.
Per-example terms: the optimised loss (`loss`: loss weight(SNR_t) x MSE for eps / x0 / v, the route-mixing objective
of stepwise.mixed_x0 for mixed x0) and the prediction's diagnostics (`mse`, the unweighted MSE that diagnostics and
loss-aware samplers see, plus e.g. per-route x0 errors).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .loss_weights import LossWeight
from .mixed_x0 import MixedX0Prediction
from .parameterisations import PREDICTIONS, Prediction
from .schedules import NoiseSchedule

PREDICTION_CLASSES: dict[str, type[Prediction]] = {**PREDICTIONS, MixedX0Prediction.name: MixedX0Prediction}
PREDICTION_TYPES = sorted(PREDICTION_CLASSES)


class Diffusion(nn.Module):
    """A noise schedule and a prediction type (with its loss weighting); the prediction is the one submodule.

    `mixing` and `mixing_args` are prediction-specific settings handed to the prediction type's `build` (mixed x0 uses
    them, the others ignore them).
    """

    def __init__(self, schedule: str = "linear", T: int = 1000, prediction: str = "eps", loss_weight: str = "none",
                 loss_weight_args: dict | None = None, mixing: str = "learned", mixing_args: dict | None = None):
        super().__init__()
        self.schedule = NoiseSchedule(schedule, T)
        self.T = T
        if prediction not in PREDICTION_CLASSES:
            raise ConfigError(f"unknown prediction type {prediction!r}; valid: {PREDICTION_TYPES}")
        weight = LossWeight(loss_weight, self.schedule, **(loss_weight_args or {}))
        self.prediction = PREDICTION_CLASSES[prediction].build(T, weight, mixing=mixing, mixing_args=mixing_args)
        self.register_load_state_dict_pre_hook(_move_legacy_prediction_keys)

    @classmethod
    def from_config(cls, cfg: dict) -> "Diffusion":
        return cls(**{k: v for k, v in cfg.items() if v is not None})

    @property
    def out_channels_factor(self) -> int:
        """The network outputs C * out_channels_factor channels for C-channel images."""
        return self.prediction.out_channels_factor

    def coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) = (sqrt(abar_t), sqrt(1 - abar_t)) broadcast against `like` (B, ...)."""
        abar = self.schedule.at("abar", t, like)  # (B,1,1,1)
        return abar.sqrt(), (1 - abar).sqrt()

    def loss_terms(self, model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict:
        """{'loss': optimised per-example loss (B,), 'mse': unweighted prediction MSE (B,), other diagnostics (B,)}."""
        a, s = self.coefs(t, x0)
        x_t = a * x0 + s * eps  # (B, C, H, W)
        out = model(x_t, t).float()  # (B, C * out_channels_factor, H, W)
        loss, diagnostics = self.prediction.losses(out, x0, eps, a, s, t)  # (B,), {name: (B,)}
        return {"loss": loss, **diagnostics}

    def losses(self, model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The optimised per-example loss (B,)."""
        return self.loss_terms(model, x0, t, eps)["loss"]

    def predict_x0_eps(self, model, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network at (x_t, t)."""
        a, s = self.coefs(t, x_t)
        return self.prediction.to_x0_eps(model(x_t, t).float(), x_t, a, s, t)


def _move_legacy_prediction_keys(module: Diffusion, state_dict: dict, prefix: str, *args) -> None:
    """Load-time key map: state written before the prediction became Diffusion's submodule kept the prediction's
    state at Diffusion's top level (mixed x0: 'mixing.logits'); move such keys under 'prediction.'."""
    for old in module.prediction.legacy_state_prefixes:
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + "prediction." + key[len(prefix):]] = state_dict.pop(key)
