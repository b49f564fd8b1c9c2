"""Ancestral DDPM and deterministic DDIM sampling with reproducible, batch-size-independent noise.

Both samplers are one update on a respaced timestep subsequence (Song et al. 2021, DDIM, arXiv 2010.02502, Eq. 12):
    x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_hat + sigma z,
    sigma  = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}),
with eta = 0 for DDIM and eta = 1 for DDPM (the posterior variance beta_tilde of Ho et al. 2020, Eq. 7).
Noise for example i at step k depends only on (seed, k, i), so every model compared sees identical noise.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .errors import ConfigError
from .progress import progress as progress_bar
from .seeding import derive_seed

SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}  # name -> default eta
NOISE_BLOCK = 64  # examples per independently seeded noise block


def fixed_noise(seed: int, step: int, start: int, count: int, shape: tuple, device="cpu") -> torch.Tensor:
    """Noise for examples [start, start+count) at sampling step `step` (-1 = initial x_T): (count, *shape)."""
    first, last = start // NOISE_BLOCK, (start + count - 1) // NOISE_BLOCK
    blocks = []
    for b in range(first, last + 1):
        g = torch.Generator().manual_seed(derive_seed(seed, step, b))
        blocks.append(torch.randn((NOISE_BLOCK, *shape), generator=g))  # (NOISE_BLOCK, C, H, W)
    noise = torch.cat(blocks)[start - first * NOISE_BLOCK :][:count]  # (count, C, H, W)
    return noise.to(device)


def timestep_subsequence(T: int, steps: int) -> torch.Tensor:
    """`steps` evenly spaced timesteps from T-1 down to 0 (DDIM Sec. 4.2, 'uniform' skip): (steps,)."""
    if not 1 <= steps <= T:
        raise ConfigError(f"sample.steps={steps} must be in [1, T={T}]")
    return torch.linspace(T - 1, 0, steps).round().long()


@torch.no_grad()
def sample_batch(model, diffusion, start: int, count: int, shape: tuple, *, steps: int, eta: float, seed: int,
                 device="cpu", clip: bool = True, amp_dtype=None, progress: bool = False) -> torch.Tensor:
    """Generate examples [start, start+count) from x_T noise; returns images in [-1, 1] on the CPU: (count, C, H, W)."""
    abar_all = diffusion.schedule.abar  # (T,) float64
    ts = timestep_subsequence(diffusion.T, steps)  # (S,)
    x = fixed_noise(seed, -1, start, count, shape, device)  # (count, C, H, W)
    autocast = torch.autocast(device.type if isinstance(device, torch.device) else str(device).split(":")[0],
                              dtype=amp_dtype) if amp_dtype else nullcontext()
    for k, t in enumerate(ts.tolist()):
        tb = torch.full((count,), t, device=device, dtype=torch.long)  # (count,)
        with autocast:
            x0, eps = diffusion.predict_x0_eps(model, x, tb)  # 2 x (count, C, H, W)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - abar_all[t].sqrt().item() * x0) / (1 - abar_all[t]).sqrt().item()
        abar_t = abar_all[t].item()
        abar_next = abar_all[ts[k + 1]].item() if k + 1 < len(ts) else 1.0
        sigma = eta * ((1 - abar_next) / (1 - abar_t) * (1 - abar_t / abar_next)) ** 0.5
        x = abar_next**0.5 * x0 + max(1 - abar_next - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * fixed_noise(seed, k, start, count, shape, device)
    return x.float().cpu()


def generate(model, diffusion, num: int, shape: tuple, *, sampler: str = "ddim", steps: int = 50, eta=None,
             seed: int = 0, batch_size: int = 256, device="cpu", amp_dtype=None, progress: bool = True) -> torch.Tensor:
    """`num` samples in [-1, 1] with the named sampler (SAMPLERS), batched: (num, C, H, W) on the CPU."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sample.sampler={sampler!r} is not a sampler; valid: {sorted(SAMPLERS)}")
    eta = SAMPLERS[sampler] if eta is None else float(eta)
    out = []
    was_training = model.training if hasattr(model, "training") else False
    if hasattr(model, "eval"):
        model.eval()
    for start in progress_bar(range(0, num, batch_size), desc=f"{sampler} x{steps}", disable=not progress):
        count = min(batch_size, num - start)
        out.append(sample_batch(model, diffusion, start, count, shape, steps=steps, eta=eta, seed=seed,
                                device=device, amp_dtype=amp_dtype))
    if was_training:
        model.train()
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
