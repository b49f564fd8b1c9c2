"""The denoiser training loop: resumable, deterministic per step, with per-timestep-bin loss statistics.

Every random draw of step k (batch indices, noise, dropout) comes from a generator seeded by (seed, k), and the
timestep sampler carries its own generator in its state, so a run killed and resumed from a checkpoint continues
exactly as the uninterrupted run would.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .artifacts import save_model
from .checkpoint import checkpoint_paths, fingerprint, load_latest_checkpoint, resume_relevant, save_checkpoint
from .config import TrainConfig
from .data import to_model_range
from .diffusion import Diffusion
from .distributed import all_gather_cat, all_gather_objects, all_reduce_mean, barrier, dist_info, resolve_device
from .ema import EMA
from .errors import CheckpointError, ConfigError, StepwiseError
from .io import exclusive_dir_lock
from .optim_schedules import MomentumDecay
from .progress import progress as progress_bar
from .schedules import bin_key, t_bin
from .models import build_model, count_params
from .seeding import derive_seed
from .threads import refresh as refresh_threads
from .timestep_samplers import TimestepSampler, build_timestep_sampler

log = logging.getLogger(__name__)
LogFn = Callable[[dict, int], None]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup_steps, then constant (DDPM App. B)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


class BinStats:
    """Running sum, sum of squares and count of per-example losses in `bins` equal-width t-bins, kept on device."""

    def __init__(self, bins: int, T: int, device):
        self.bins, self.T = bins, T
        self.stats = torch.zeros(3, bins, device=device, dtype=torch.float64)  # (3, bins): n, sum, sumsq

    def add(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        b = t_bin(t, self.T, self.bins)  # (B,)
        l64 = losses.detach().double()  # (B,)
        self.stats.index_add_(1, b, torch.stack([torch.ones_like(l64), l64, l64 * l64]))

    def pop(self, name: str = "loss") -> dict:
        """{'<name>_bin/k': mean, '<name>_var_bin/k': variance} for non-empty bins; resets the counters."""
        n, s, ss = self.stats.tolist()  # copies to host lists before the reset
        self.stats.zero_()
        out = {}
        for k in range(self.bins):
            if n[k] > 0:
                mean = s[k] / n[k]
                out[bin_key(k, self.bins, self.T, name)] = mean
                out[bin_key(k, self.bins, self.T, f"{name}_var")] = max(ss[k] / n[k] - mean * mean, 0.0)
        return out


def timestep_sampler_from_config(cfg: TrainConfig, diffusion: Diffusion, t_range=None, rank: int = 0) -> TimestepSampler:
    """The configured timestep sampler, seeded from the run seed and rank, optionally restricted to t_range."""
    return build_timestep_sampler(cfg.timestep_sampler, diffusion.T, seed=derive_seed(cfg.seed, 7, rank),
                                  t_range=t_range,
                                  default_abar=diffusion.schedule.abar, **cfg.timestep_sampler_args)


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
    ema_start: dict | None = None,
) -> dict:
    """Train `model` on uint8 images (N, C, H, W) for cfg.steps steps, resuming from ckpt_dir when possible.

    Under torchrun (an initialised process group) each rank trains on batch_size / world examples per step;
    gradients are all-reduced by DDP and the timestep sampler / prediction (`update`) learn from the all-gathered
    losses and diagnostics.

    The EMA of the weights starts as a copy of `model`, or from the state dict `ema_start` (e.g. the EMA weights of
    the model a fine-tune starts from). Loss-aware timestep samplers learn from the per-example loss that is
    optimised (cfg.sampler_feedback = "loss", before importance weights) or from the plain MSE ("mse"). Rank 0
    holds an exclusive lock on ckpt_dir for the whole run, so a second trainer on the same folder fails at once.

    Returns {'model', 'ema' (the EMA nn.Module), 'history' (logged rows), 'resumed_from' (step or None),
    'sampler', 'images_seen'}.
    """
    rank, _ = dist_info()
    if rank != 0:
        return _train(model, diffusion, images, cfg, ckpt_dir, fingerprint=fingerprint, sampler=sampler,
                      log_fn=log_fn, progress=progress, ema_start=ema_start)
    with exclusive_dir_lock(ckpt_dir):
        return _train(model, diffusion, images, cfg, ckpt_dir, fingerprint=fingerprint, sampler=sampler,
                      log_fn=log_fn, progress=progress, ema_start=ema_start)


def _train(model, diffusion, images, cfg, ckpt_dir, *, fingerprint, sampler, log_fn, progress, ema_start) -> dict:
    device = resolve_device(cfg.device)
    rank, world = dist_info()
    if cfg.batch_size > len(images):
        raise ConfigError(f"train.batch_size={cfg.batch_size} is larger than the dataset ({len(images)} images)")
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    local_batch = cfg.batch_size // world
    bf16 = cfg.precision == "bf16"
    if bf16 and device.type != "cuda":
        log.warning("train.precision=bf16 requested on %s: bf16 autocast is used on CUDA only, running fp32", device)
        bf16 = False
    model, diffusion = model.to(device), diffusion.to(device)
    data = images.to(device)  # (N, C, H, W) uint8, resident on the device
    sampler = sampler or timestep_sampler_from_config(cfg, diffusion, rank=rank)
    params = list(model.parameters()) + list(diffusion.parameters())  # + the prediction's own (e.g. route logits)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    momentum = None
    if cfg.momentum_decay != "none":  # decays over momentum_decay_args.total_steps, default train.steps
        md_args = {"total_steps": cfg.steps, **cfg.momentum_decay_args}
        momentum = MomentumDecay(opt, md_args.pop("total_steps"), cfg.momentum_decay, **md_args)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup_steps, cfg.ema_warmup_power)
    if ema_start is not None:
        ema.module.load_state_dict(ema_start)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model  # gradients all-reduced
    history: list[dict] = []
    start, resumed_from = 0, None

    state = load_latest_checkpoint(ckpt_dir, fingerprint)
    if state is None and checkpoint_paths(ckpt_dir) and rank == 0:
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
        if len(state["sampler"]) != world:
            raise CheckpointError(f"checkpoint in {ckpt_dir} was written by {len(state['sampler'])} process(es); "
                                  f"resume it with the same number (now {world})")
        sampler.load_state_dict(state["sampler"][rank])
        diffusion.load_state_dict(state["diffusion"])
        if momentum is not None:
            momentum.load_state_dict(state["momentum"])
        history, start = state["history"], state["step"]
        resumed_from = start
        log.info("resumed from %s at step %d", ckpt_dir, start)

    stats = BinStats(cfg.loss_bins, diffusion.T, device)
    diag_stats: dict[str, BinStats] = {}  # per-t-bin stats of the prediction's extra diagnostics
    window = torch.zeros(2, device=device, dtype=torch.float64)  # (2,): sum of batch losses, count
    cuda_gen = torch.Generator(device) if device.type == "cuda" else None

    def checkpoint(step: int) -> None:
        samplers = all_gather_objects(sampler.state_dict())  # one state per rank: each owns its generator
        if rank == 0:
            save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict(), "ema": ema.module.state_dict(),
                             "optimizer": opt.state_dict(), "sampler": samplers, "history": history,
                             "diffusion": diffusion.state_dict(),
                             "momentum": momentum.state_dict() if momentum else None, "config": asdict(cfg),
                             "world_size": world}, ckpt_dir, step, keep=cfg.keep_checkpoints,
                            protect=set(cfg.eval_steps))
        barrier()

    model.train()
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
                       disable=not progress or rank != 0)
    for step in bar:
        g = cuda_gen.manual_seed(derive_seed(cfg.seed, step, rank)) if cuda_gen else \
            torch.Generator().manual_seed(derive_seed(cfg.seed, step, rank))
        torch.manual_seed(derive_seed(cfg.seed, step, rank, 1))  # dropout and any other global-RNG use
        idx = torch.randint(0, len(data), (local_batch,), generator=g, device=device)  # (b,) this rank's share
        x0 = to_model_range(data[idx])  # (b, C, H, W)
        eps = torch.randn(x0.shape, generator=g, device=device)  # (b, C, H, W)
        t, w = sampler.sample(local_batch, step)  # (b,), (b,)
        t, w = t.to(device), w.to(device)
        if momentum is not None:
            momentum.step(step, lr=lr_at(step, cfg))  # beta1(k) and lr(k) = warm-up lr x (1-b0)/(1-b1(k))
        else:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = diffusion.loss_terms(net, x0, t, eps)  # each (b,) or (b, 3)
        loss = (terms["loss"] * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # parameters outside the DDP wrapper (e.g. learned route-mixing logits): average by hand
            for p in diffusion.parameters():
                if p.grad is not None:
                    p.grad.copy_(all_reduce_mean(p.grad))
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        t_all = all_gather_cat(t)  # (B,): the global batch
        diagnostics = {k: all_gather_cat(v.detach()) for k, v in terms.items() if k != "loss"}  # each (B,)
        mse_all = diagnostics["mse"]  # (B,)
        feedback = mse_all if cfg.sampler_feedback == "mse" else all_gather_cat(terms["loss"].detach())  # (B,)
        sampler.update(t_all, feedback)  # every rank sees the same losses, so learned state stays identical
        stats.add(t_all, mse_all)
        diffusion.prediction.update(t_all, diagnostics)  # e.g. loss-based route mixing
        for k, v in diagnostics.items():
            if k != "mse":
                if k not in diag_stats:
                    diag_stats[k] = BinStats(cfg.loss_bins, diffusion.T, device)
                diag_stats[k].add(t_all, v)
        window += torch.stack([all_reduce_mean(loss.detach()).double(),
                               torch.ones((), device=device, dtype=torch.float64)])
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            refresh_threads()  # another stage started or ended: take a fair share of the cores again
            total, count = window.tolist()
            window.zero_()
            row = {"step": done, "loss": total / count, "lr": opt.param_groups[0]["lr"], "ema_decay": ema.last_decay,
                   **stats.pop()}
            if momentum is not None:
                row["beta1"] = momentum.beta1(step)
            for k, st in diag_stats.items():
                row.update(st.pop(k))
            if not math.isfinite(row["loss"]):
                raise StepwiseError(f"training loss became {row['loss']} at step {done}; lower train.lr or "
                                    "use train.precision=fp32")
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if log_fn and rank == 0:
                log_fn({k: v for k, v in row.items() if k != "step"}, done)
        if done % cfg.ckpt_every == 0 or done == cfg.steps or done in cfg.eval_steps:
            checkpoint(done)
    return {"model": model, "ema": ema.module, "history": history, "resumed_from": resumed_from,
            "sampler": sampler, "images_seen": cfg.steps * cfg.batch_size}


def final_loss(history: list[dict]) -> float:
    """Mean training loss over the last tenth (at least one) of the logged rows."""
    last = history[-max(1, len(history) // 10):]
    return sum(r["loss"] for r in last) / len(last)


# ---- a denoiser trained from scratch: `pretrain`'s unified model, the extra models of `consistency` --------------

INIT_SEED = 11  # stream of derive_seed(train.seed, ...) that initialises the weights


def run_fingerprint(model_cfg: dict, diffusion_cfg: dict, cfg: TrainConfig, data_sha: str) -> str:
    """Identity of a from-scratch training run: checkpoints resume only into the run with the same fingerprint.

    Includes the seeded weight initialisation (INIT_SEED stream of train.seed), so checkpoints written before weights
    were seeded, or from another init stream, are not resumed."""
    init = {"init": "seeded", "init_seed": derive_seed(cfg.seed, INIT_SEED)}
    return fingerprint(init, model_cfg, diffusion_cfg, resume_relevant(cfg), data_sha)


def train_from_scratch(model_cfg: dict, diffusion_cfg: dict, cfg: TrainConfig, images: torch.Tensor, data_sha: str,
                       out_dir, *, log_fn: LogFn | None = None, meta: dict | None = None) -> dict:
    """Train a denoiser from weights seeded by (train.seed, INIT_SEED) on uint8 images (N, C, H, W), resumable from
    out_dir/checkpoints, and save it (rank 0) as out_dir/model.pt with `meta` added to the file's meta.

    Returns train()'s result plus 'fingerprint', 'num_params' and the 'diffusion'.
    """
    diffusion = Diffusion.from_config(diffusion_cfg)
    c = images.shape[1]
    model = build_model(model_cfg, image_size=images.shape[-1], channels=c,
                        out_channels=c * diffusion.out_channels_factor, seed=derive_seed(cfg.seed, INIT_SEED))
    run_id = run_fingerprint(model_cfg, diffusion_cfg, cfg, data_sha)
    num_params = count_params(model)
    result = train(model, diffusion, images, cfg, Path(out_dir) / "checkpoints", fingerprint=run_id, log_fn=log_fn)
    if dist_info()[0] == 0:
        save_model(Path(out_dir) / "model.pt", model_cfg=model_cfg, diffusion_cfg=diffusion_cfg,
                   image_shape=images.shape[1:], state_dict=result["model"].state_dict(),
                   ema_state_dict=result["ema"].state_dict(), diffusion_state=diffusion.state_dict(),
                   meta={"steps": cfg.steps, "images_seen": result["images_seen"], "fingerprint": run_id,
                         "data_sha256": data_sha, "num_params": num_params, **(meta or {})})
    return {**result, "fingerprint": run_id, "num_params": num_params, "diffusion": diffusion}
