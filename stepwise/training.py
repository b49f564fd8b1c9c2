"""The denoiser training loop: resumable, deterministic per step, with per-timestep-bin loss statistics.

Every random draw of step k (batch indices, noise, dropout) comes from a generator seeded by (seed, k), and the
timestep sampler carries its own generator in its state, so a run killed and resumed from a checkpoint continues
exactly as the uninterrupted run would.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Callable

import torch
from timm.utils.model_ema import ModelEmaV3
from tqdm.auto import tqdm

from .checkpoint import checkpoint_paths, load_latest_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import to_model_range
from .diffusion import Diffusion
from .errors import CheckpointError, ConfigError
from .seeding import derive_seed
from .timestep_samplers import TimestepSampler, build_timestep_sampler

log = logging.getLogger(__name__)
LogFn = Callable[[dict, int], None]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup_steps, then constant (DDPM App. B)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


class BinStats:
    """Running sum, sum of squares and count of per-example losses in `bins` equal-width t-bins, kept on device."""

    def __init__(self, bins: int, T: int, device):
        self.bins, self.T = bins, T
        self.stats = torch.zeros(3, bins, device=device, dtype=torch.float64)  # (3, bins): n, sum, sumsq

    def add(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        b = (t * self.bins // self.T).clamp(max=self.bins - 1)  # (B,)
        l64 = losses.detach().double()  # (B,)
        self.stats.index_add_(1, b, torch.stack([torch.ones_like(l64), l64, l64 * l64]))

    def pop(self) -> dict:
        """{'loss_bin/k': mean, 'loss_var_bin/k': variance} for non-empty bins; resets the counters."""
        n, s, ss = self.stats.cpu().unbind(0)
        self.stats.zero_()
        out = {}
        for k in range(self.bins):
            if n[k] > 0:
                mean = s[k] / n[k]
                out[f"loss_bin/{k:02d}"] = float(mean)
                out[f"loss_var_bin/{k:02d}"] = float(max(ss[k] / n[k] - mean * mean, 0.0))
        return out


def train(
    model: torch.nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    cfg: TrainConfig,
    ckpt_dir,
    *,
    fingerprint: str,
    sampler: TimestepSampler | None = None,
    log_fn: LogFn | None = None,
    progress: bool = True,
) -> dict:
    """Train `model` on uint8 images (N, C, H, W) for cfg.steps steps, resuming from ckpt_dir when possible.

    Returns {'model', 'ema' (the EMA nn.Module), 'history' (logged rows), 'resumed_from' (step or None),
    'images_seen'}.
    """
    device = resolve_device(cfg.device)
    if cfg.batch_size > len(images):
        raise ConfigError(f"train.batch_size={cfg.batch_size} is larger than the dataset ({len(images)} images)")
    bf16 = cfg.precision == "bf16"
    if bf16 and device.type != "cuda":
        log.warning("train.precision=bf16 requested on %s: bf16 autocast is used on CUDA only, running fp32", device)
        bf16 = False
    model = model.to(device)
    data = images.to(device)  # (N, C, H, W) uint8, resident on the device
    sampler = sampler or build_timestep_sampler(cfg.timestep_sampler, diffusion.T, seed=derive_seed(cfg.seed, 7),
                                                **cfg.timestep_sampler_args)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
    history: list[dict] = []
    start, resumed_from = 0, None

    state = load_latest_checkpoint(ckpt_dir, fingerprint)
    if state is None and checkpoint_paths(ckpt_dir):
        log.warning("checkpoints in %s come from a different configuration: starting afresh", ckpt_dir)
        for p in checkpoint_paths(ckpt_dir):
            p.unlink()
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.module.load_state_dict(state["ema"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint in {ckpt_dir} does not fit the configured model: "
                                  f"{str(e).splitlines()[0]}") from None
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        history, start = state["history"], state["step"]
        resumed_from = start
        log.info("resumed from %s at step %d", ckpt_dir, start)

    stats = BinStats(cfg.loss_bins, diffusion.T, device)
    window = torch.zeros(2, device=device, dtype=torch.float64)  # (2,): sum of batch losses, count
    cuda_gen = torch.Generator(device) if device.type == "cuda" else None

    def checkpoint(step: int) -> None:
        save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict(), "ema": ema.module.state_dict(),
                         "optimizer": opt.state_dict(), "sampler": sampler.state_dict(), "history": history,
                         "config": asdict(cfg)}, ckpt_dir, step, keep=cfg.keep_checkpoints)

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress)
    for step in bar:
        g = cuda_gen.manual_seed(derive_seed(cfg.seed, step)) if cuda_gen else \
            torch.Generator().manual_seed(derive_seed(cfg.seed, step))
        torch.manual_seed(derive_seed(cfg.seed, step, 1))  # dropout and any other global-RNG use
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g, device=device)  # (B,)
        x0 = to_model_range(data[idx])  # (B, C, H, W)
        eps = torch.randn(x0.shape, generator=g, device=device)  # (B, C, H, W)
        t, w = sampler.sample(cfg.batch_size, step)  # (B,), (B,)
        t, w = t.to(device), w.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = diffusion.losses(model, x0, t, eps)  # (B,)
        loss = (losses * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step=step)
        sampler.update(t, losses.detach())
        stats.add(t, losses)
        window += torch.stack([loss.detach().double(), torch.ones((), device=device, dtype=torch.float64)])
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            total, count = window.tolist()
            window.zero_()
            row = {"step": done, "loss": total / count, "lr": lr_at(step, cfg), **stats.pop()}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"training loss became {row['loss']} at step {done}; lower train.lr")
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if log_fn:
                log_fn({k: v for k, v in row.items() if k != "step"}, done)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            checkpoint(done)
    return {"model": model, "ema": ema.module, "history": history, "resumed_from": resumed_from,
            "images_seen": cfg.steps * cfg.batch_size}

