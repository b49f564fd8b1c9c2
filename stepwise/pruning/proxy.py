"""The default cheap proxy that scores a pruned candidate in TDC's multi-round search (arXiv 2312.13307).

TDC does not publish its scoring metric; we use the denoising loss on the expert's own t-range after a short
fine-tune there, since a pruned model's loss right after pruning mostly reflects the damage, not what it recovers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion import Diffusion
from ..errors import ConfigError


def eval_timesteps(t_range: tuple[int, int], points: int) -> torch.Tensor:
    """`points` evenly spaced integer t in [lo, hi): (points,)."""
    lo, hi = t_range
    return torch.linspace(lo, hi - 1, points).round().long().unique()  # (<= points,)


def short_finetune_loss(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, t_range: tuple[int, int],
                        steps: int = 20, lr: float = 1e-4, batch_size: int = 16, eval_points: int = 8,
                        seed: int = 0) -> float:
    """Mean loss (Ho et al. 2020, Eq. 14) over `eval_points` t in [lo, hi) with fixed noise, after `steps` Adam
    steps on t ~ U[lo, hi); fine-tunes `model` in place (pass the candidate copy)."""
    lo, hi = t_range
    if not 0 <= lo < hi <= diffusion.T:
        raise ConfigError(f"proxy t_range={t_range} must satisfy 0 <= lo < hi <= T={diffusion.T}")
    if steps < 0 or batch_size < 1 or eval_points < 1:
        raise ConfigError(f"proxy steps={steps}, batch_size={batch_size}, eval_points={eval_points} must be "
                          ">= 0, >= 1, >= 1")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = images.shape[0]
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)  # (b,)
        t = torch.randint(lo, hi, (batch_size,), generator=gen).to(images.device)  # (b,)
        eps = torch.randn(images[idx].shape, generator=gen).to(images.device)  # (b, C, H, W)
        loss = diffusion.losses(model, images[idx], t, eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    x0 = images[:batch_size]  # (b, C, H, W)
    eps = torch.randn(x0.shape, generator=gen).to(images.device)  # (b, C, H, W)
    with torch.no_grad():
        losses = [diffusion.losses(model, x0, torch.full((x0.shape[0],), int(t), device=images.device), eps).mean()
                  for t in eval_timesteps(t_range, eval_points)]
    return float(torch.stack(losses).mean())
