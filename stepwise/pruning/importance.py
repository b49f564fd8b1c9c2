"""Channel-group importances for structural pruning: random, magnitude, Taylor over all t, Diff-Pruning.

Diff-Pruning (Fang, Ma & Wang 2023, arXiv 2305.10924; code VainF/Diff-Pruning `ddpm_prune.py`) scores channels by a
first-order Taylor expansion of the denoising loss accumulated only over the informative low-noise steps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..diffusion import Diffusion
from ..errors import ConfigError


@dataclass
class GradientBatch:
    """One batch of clean images with fixed noise, and the t-range [lo, hi) whose losses score the channels."""

    diffusion: Diffusion
    images: torch.Tensor  # (B, C, H, W)
    noise: torch.Tensor  # (B, C, H, W)
    t_range: tuple[int, int]
    t_stride: int = 1
    thr: float = 0.05

    def __post_init__(self):
        lo, hi = self.t_range
        if self.images.shape != self.noise.shape:
            raise ConfigError(f"pruning noise shape {tuple(self.noise.shape)} must equal the image batch shape "
                              f"{tuple(self.images.shape)}")
        if not 0 <= lo < hi <= self.diffusion.T:
            raise ConfigError(f"pruning t_range={self.t_range} must satisfy 0 <= lo < hi <= T={self.diffusion.T}")
        if self.t_stride < 1:
            raise ConfigError(f"pruning.t_stride={self.t_stride} must be a positive integer")
        if not 0 < self.thr < 1:
            raise ConfigError(f"pruning.thr={self.thr} must lie in (0, 1): the stop fraction of the largest loss")


def timestep_loss(model: nn.Module, batch: GradientBatch, t: int) -> torch.Tensor:
    """Batch-mean denoising loss L_t at one timestep with the batch's fixed noise (Ho et al. 2020, Eq. 14): ()."""
    ts = torch.full((batch.images.shape[0],), t, dtype=torch.long, device=batch.images.device)  # (B,)
    return batch.diffusion.losses(model, batch.images, ts, batch.noise).mean()


def taylor_timesteps(model: nn.Module, batch: GradientBatch) -> list[int]:
    """Accumulate dL_t/dw for every t = lo, lo+s, ... < hi (Diff-Pruning's 'taylor' baseline, arXiv 2305.10924)."""
    ts = list(range(batch.t_range[0], batch.t_range[1], batch.t_stride))
    for t in ts:
        timestep_loss(model, batch, t).backward()
    return ts


def diff_pruning_timesteps(model: nn.Module, batch: GradientBatch) -> list[int]:
    """Accumulate dL_t/dw for t = lo, lo+s, ... until L_t < thr * max_{t'<=t} L_t' (Diff-Pruning, arXiv 2305.10924)."""
    ts, loss_max = [], 0.0
    for t in range(batch.t_range[0], batch.t_range[1], batch.t_stride):
        loss = timestep_loss(model, batch, t)
        loss.backward()
        ts.append(t)
        loss_max = max(loss_max, loss.item())
        if loss.item() < batch.thr * loss_max:
            break
    return ts


IMPORTANCES = {
    "random": (tp.importance.RandomImportance, None),
    "magnitude": (lambda: tp.importance.MagnitudeImportance(p=2), None),
    "taylor": (lambda: tp.importance.TaylorImportance(multivariable=True), taylor_timesteps),
    "diff_pruning": (lambda: tp.importance.TaylorImportance(multivariable=False), diff_pruning_timesteps),
}


@dataclass
class Scorer:
    """A model copy holding the gradients its importance reads, the Torch-Pruning importance, and the t's used."""

    name: str
    model: nn.Module
    importance: tp.importance.Importance
    timesteps: list[int]


def copy_with_grads(model: nn.Module) -> nn.Module:
    """deepcopy(model) with each parameter's .grad cloned too (deepcopy drops gradients)."""
    clone = copy.deepcopy(model)
    for src, dst in zip(model.parameters(), clone.parameters()):
        dst.grad = None if src.grad is None else src.grad.detach().clone()
    return clone


def make_scorer(model: nn.Module, name: str, batch: GradientBatch | None = None) -> Scorer:
    """Copy `model`, accumulate the gradients importance IMPORTANCES[name] needs (eval mode), and pair them."""
    if name not in IMPORTANCES:
        raise ConfigError(f"pruning.importance={name!r} is not an importance; valid: {sorted(IMPORTANCES)}")
    factory, accumulate = IMPORTANCES[name]
    if accumulate is not None and batch is None:
        raise ConfigError(f"pruning.importance={name!r} needs a GradientBatch (images, fixed noise, t-range)")
    clone = copy.deepcopy(model).eval()
    clone.zero_grad(set_to_none=True)
    timesteps = []
    if accumulate is not None:
        with torch.enable_grad():
            timesteps = accumulate(clone, batch)
    return Scorer(name, clone, factory(), timesteps)
