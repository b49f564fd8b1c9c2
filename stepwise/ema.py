"""Exponential moving average of model weights (DDPM App. B; Polyak averaging) with a warm-up that reaches the
configured decay.

Warm-up (the inverse-power form of Crowson/timm, made to end at a given step): with the update index k = 0, 1, ...
    decay(k) = 0                                            for k = 0 (the EMA starts as a copy of the weights),
    decay(k) = min(d, 1 - (1 + k / gamma)^(-p))             for k >= 1,
    gamma    = W / ((1 - d)^(-1/p) - 1),
so decay(W) = d exactly: the configured decay d is reached after W = `warmup_steps` updates (timm's ModelEmaV3 with
gamma = 1, p = 2/3 reaches 0.999 only after 31.6k steps and 0.9999 after 10^6). warmup_steps = 0: constant d.
Buffers that are not floating point are copied; floating-point ones are averaged like parameters.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def warmup_gamma(decay: float, warmup_steps: int, power: float) -> float:
    """gamma such that 1 - (1 + W/gamma)^(-p) = d at W = warmup_steps."""
    return warmup_steps / ((1.0 - decay) ** (-1.0 / power) - 1.0)


def ema_decay_at(k: int, decay: float, warmup_steps: int, power: float = 2 / 3) -> float:
    """The EMA decay of update k (0-based): 0 at k = 0, the inverse-power warm-up, d from k = W on."""
    if k <= 0:
        return 0.0
    if warmup_steps <= 0 or k >= warmup_steps:
        return decay
    return min(decay, 1.0 - (1.0 + k / warmup_gamma(decay, warmup_steps, power)) ** (-power))


class EMA(nn.Module):
    """`module` holds the averaged copy; `update(model, k)` averages with decay `ema_decay_at(k, ...)`."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0, power: float = 2 / 3):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay, self.warmup_steps, self.power = decay, warmup_steps, power
        self.last_decay = 0.0
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, k: int) -> float:
        return ema_decay_at(k, self.decay, self.warmup_steps, self.power)

    @torch.no_grad()
    def update(self, model: nn.Module, k: int) -> float:
        """ema <- decay ema + (1 - decay) model for floating-point tensors, copy the others; returns the decay."""
        d = self.decay_at(k)
        floats_ema, floats_model = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                floats_ema.append(e)
                floats_model.append(m.to(e.dtype))
            else:
                e.copy_(m)
        if floats_ema:
            torch._foreach_lerp_(floats_ema, floats_model, 1.0 - d)
        self.last_decay = d
        return d
