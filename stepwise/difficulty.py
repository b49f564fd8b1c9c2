"""Per-timestep difficulty: loss profile, convergence speed, relative entropy, SNR_dB, gradient similarity.

Kim et al. (arXiv 2403.10348, difficulty analysis) gauge denoising-task difficulty by (i) how fast each timestep's loss
converges and (ii) the relative entropy between consecutive marginals p_{t-1}, p_t; TDC (arXiv 2312.13307) uses
SNR_dB(t) and the similarity of per-timestep gradients ("task similarity"). docs/methods.md states exactly what
each function computes where the papers are silent.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .data import to_model_range
from .diffusion import Diffusion
from .errors import ConfigError, DataError
from .sampling import fixed_noise
from .progress import progress
from .schedules import NoiseSchedule, parse_bin_key, t_bin
from .seeding import derive_seed

log = logging.getLogger(__name__)
DEQUANT_VAR = (2 / 255) ** 2 / 12  # variance of uniform dequantisation noise of 8-bit pixels mapped to [-1, 1]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def as_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float [-1, 1]; float images are taken to be in [-1, 1] already: (N, C, H, W)."""
    if images.dim() != 4:
        raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    return to_model_range(images) if images.dtype == torch.uint8 else images.float()


def check_timesteps(timesteps, T: int) -> torch.Tensor:
    """Timesteps as a (K,) long tensor, ConfigError unless every one lies in [0, T)."""
    ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()  # (K,)
    if ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ConfigError(f"timesteps must be a non-empty list of integers in [0, {T}), got {ts.tolist()[:8]}...")
    return ts


def timestep_grid(T: int, K: int) -> torch.Tensor:
    """K evenly spaced timesteps covering [0, T), each the centre of one of K equal bins: (K,)."""
    if not 1 <= K <= T:
        raise ConfigError(f"number of profiled timesteps K={K} must be in [1, T={T}]")
    return ((torch.arange(K, dtype=torch.float64) + 0.5) * T / K).floor().long()  # (K,)


def fixed_examples(images: torch.Tensor, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps): `num_examples` images drawn without replacement and their noise, both fixed by `seed`.

    The same (x0, eps) pair is used at every timestep and for every model (common random numbers), so profiles
    of different timesteps and different models differ only through the model and t.
    """
    x = as_model_range(images)  # (N, C, H, W)
    if not 1 <= num_examples <= len(x):
        raise ConfigError(f"num_examples={num_examples} must be in [1, {len(x)}] (the number of images)")
    g = torch.Generator().manual_seed(derive_seed(seed, 0))
    idx = torch.randperm(len(x), generator=g)[:num_examples]  # (n,)
    x0 = x[idx.to(x.device)].cpu()  # (n, C, H, W)
    eps = fixed_noise(derive_seed(seed, 1), -1, 0, num_examples, tuple(x0.shape[1:]))  # (n, C, H, W)
    return x0, eps


@torch.no_grad()
def per_timestep_loss(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, timesteps, num_examples: int = 256,
                      seed: int = 0, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (K,), var (K,)) of the per-example denoising loss (Ho et al. 2020, arXiv 2006.11239, Eq. 14) at each t.

    Uses the fixed examples of `fixed_examples` (same x0 and eps at every t and for every model); var is the
    unbiased variance over examples (0 when num_examples == 1). Eval mode; the model's mode is restored.
    """
    ts = check_timesteps(timesteps, diffusion.T)  # (K,)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    x0, eps = fixed_examples(images, num_examples, seed)  # 2 x (n, C, H, W)
    n, device, was_training = len(x0), model_device(model), model.training
    pair_t = ts.repeat_interleave(n)  # (K*n,)
    pair_i = torch.arange(n).repeat(len(ts))  # (K*n,)
    losses = torch.empty(len(pair_t), dtype=torch.float64)  # (K*n,)
    model.eval()
    try:
        for s in range(0, len(pair_t), batch_size):
            t, i = pair_t[s : s + batch_size], pair_i[s : s + batch_size]  # (b,), (b,)
            out = diffusion.losses(model, x0[i].to(device), t.to(device), eps[i].to(device))  # (b,)
            losses[s : s + batch_size] = out.double().cpu()
    finally:
        model.train(was_training)
    per_t = losses.view(len(ts), n)  # (K, n)
    var = per_t.var(1) if n > 1 else torch.zeros(len(ts), dtype=torch.float64)  # (K,)
    return per_t.mean(1), var


def snr_db_at(schedule: NoiseSchedule, timesteps) -> torch.Tensor:
    """SNR_dB(t) = 10 log10(abar_t / (1 - abar_t)) at the given timesteps (TDC, arXiv 2312.13307): (K,) float64."""
    return schedule.snr_db()[check_timesteps(timesteps, schedule.T)]  # (K,)


def bin_loss_curves(history_rows: list[dict], bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps (S,), losses (bins, S)) from training-history rows' per-t-bin loss entries ('loss_t<lo>-<hi>', written
    by `schedules.bin_key`), bins ordered by t; NaN where a bin was empty."""
    ranges = sorted({p[1:] for r in history_rows for key in r if (p := parse_bin_key(key)) and p[0] == "loss"})
    if not ranges:
        raise DataError("no history row holds per-t-bin loss entries ('loss_t<lo>-<hi>'); train with "
                        "train.loss_bins > 0")
    if ranges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise DataError(f"the history's t-bins {ranges[:4]}... do not tile [0, T): retrain (dvc repro pretrain)")
    if bins is not None and bins != len(ranges):
        raise DataError(f"history has {len(ranges)} t-bins, expected {bins}")
    index = {r: k for k, r in enumerate(ranges)}
    binned = [(r, {index[p[1:]]: v for key, v in r.items() if (p := parse_bin_key(key)) and p[0] == "loss"})
              for r in history_rows]
    rows = [(r, b) for r, b in binned if "step" in r and b]
    if not rows:
        raise DataError("no history row holds both 'step' and per-t-bin loss entries")
    steps = torch.tensor([float(r["step"]) for r, _ in rows], dtype=torch.float64)  # (S,)
    losses = torch.tensor([[float(b.get(k, math.nan)) for _, b in rows] for k in range(len(ranges))],
                          dtype=torch.float64)  # (bins, S)
    return steps, losses


def ema_smooth(curves: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Exponential moving average along the last axis, skipping NaN entries (held at the last value): (..., S)."""
    if not 0 <= smoothing < 1:
        raise ConfigError(f"smoothing={smoothing} must be in [0, 1)")
    out = curves.clone()  # (..., S)
    state = curves[..., 0].clone()  # (...,)
    for s in range(curves.shape[-1]):
        x = curves[..., s]
        state = torch.where(torch.isnan(state), x, torch.where(torch.isnan(x), state,
                                                                smoothing * state + (1 - smoothing) * x))
        out[..., s] = state
    return out


def convergence_speed(history_rows: list[dict], bins: int | None = None, tolerance: float = 0.1,
                      smoothing: float = 0.8) -> torch.Tensor:
    """Normalised convergence time per t-bin (Kim et al., arXiv 2403.10348, 'convergence speed'): (bins,).

    Each bin's loss curve is EMA-smoothed; with L0 its first and Lf its last smoothed value, the bin has converged
    at the first logged step from which |L(s) - Lf| <= tolerance * |L0 - Lf| holds for all later steps (it has
    finished (1 - tolerance) of its total change). Returned as that step / last logged step in [0, 1]: larger =
    slower convergence (Kim et al. find low-t bins slower).
    """
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance={tolerance} must be in (0, 1)")
    steps, losses = bin_loss_curves(history_rows, bins)  # (S,), (bins, S)
    smooth = ema_smooth(losses, smoothing)  # (bins, S)
    first_seen = (~torch.isnan(smooth)).long().argmax(1, keepdim=True)  # (bins, 1)
    first, last = smooth.gather(1, first_seen), smooth[:, -1:]  # (bins, 1)
    outside = (smooth - last).abs() > tolerance * (first - last).abs()  # (bins, S)
    outside[torch.isnan(smooth)] = False
    # index after the last step still outside the band (0 if never outside)
    pos = torch.arange(1, steps.numel() + 1).expand_as(outside)  # (bins, S)
    conv_idx = torch.where(outside, pos, torch.zeros_like(pos)).amax(1).clamp(max=steps.numel() - 1)  # (bins,)
    return steps[conv_idx] / steps[-1]  # (bins,)


def gaussian_kl(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) per dimension, standard closed form."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1)


def data_moments(images: torch.Tensor, var_floor: float = DEQUANT_VAR) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and variance (floored at `var_floor`) of the images in [-1, 1]: 2 x (D,) float64."""
    x = as_model_range(images).flatten(1).double()  # (N, D)
    if var_floor <= 0:
        raise ConfigError(f"var_floor={var_floor} must be > 0 (a zero-variance pixel makes KL at t=0 infinite)")
    return x.mean(0), x.var(0, unbiased=False).clamp(min=var_floor)


def gaussian_marginal(abar: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of p_t when x0 ~ N(mean, diag var): N(sqrt(abar_t) mean, abar_t var + 1 - abar_t): 2 x (T, D)."""
    a = abar.double()[:, None]  # (T, 1)
    return a.sqrt() * mean.double()[None], a * var.double()[None] + (1 - a)


def relative_entropy(abar: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(p_{t-1} || p_t) summed over dims, closed form for diagonal-Gaussian data (arXiv 2403.10348, rel. entropy).

    p_t = N(sqrt(abar_t) mean, abar_t var + 1 - abar_t) per dimension, with p_{-1} = N(mean, var) the data
    (abar_{-1} = 1). Exact when the data are N(mean, diag var); with `data_moments` it is the moment-matched
    Gaussian estimate for a data set. Entry t compares step t with the one before it: (T,) float64.
    """
    abar_ext = torch.cat([torch.ones(1, dtype=torch.float64), abar.double()])  # (T+1,)
    m, v = gaussian_marginal(abar_ext, mean, var)  # 2 x (T+1, D)
    return gaussian_kl(m[:-1], v[:-1], m[1:], v[1:]).sum(1)  # (T,)


def mixture_log_density(x: torch.Tensor, centres: torch.Tensor, var: float) -> torch.Tensor:
    """log (1/N) sum_i N(x; centres_i, var I) for x (M, D) and centres (N, D), in float64: (M,)."""
    D, chunk = x.shape[1], max(1, 2**22 // len(centres))  # chunk keeps the (m, N) distance block <= 32 MiB
    parts = []
    for s in range(0, len(x), chunk):
        d2 = torch.cdist(x[s : s + chunk], centres).pow(2)  # (m, N)
        parts.append(torch.logsumexp(-d2 / (2 * var), dim=1))  # (m,)
    return torch.cat(parts) - math.log(len(centres)) - 0.5 * D * math.log(2 * math.pi * var)  # (M,)


def relative_entropy_mc(abar: torch.Tensor, images: torch.Tensor, timesteps, num_samples: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """Monte-Carlo KL(p_{t-1} || p_t) for the empirical data distribution (arXiv 2403.10348, 'relative entropy'): (K,).

    With x0 uniform over the N images, p_t is the Gaussian mixture (1/N) sum_i N(sqrt(abar_t) x0_i, (1 - abar_t) I),
    so KL = E_{x ~ p_{t-1}}[log p_{t-1}(x) - log p_t(x)] is estimated from `num_samples` draws x of p_{t-1} with
    exact mixture log-densities. Needs t >= 1 (p_{-1} is a sum of point masses). Cost O(K num_samples N D).
    """
    ts = check_timesteps(timesteps, len(abar))  # (K,)
    if int(ts.min()) < 1:
        raise ConfigError("relative_entropy_mc needs timesteps >= 1: the empirical data distribution has no density")
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples} must be >= 1")
    x0 = as_model_range(images).flatten(1).double().cpu()  # (N, D)
    g = torch.Generator().manual_seed(derive_seed(seed, 2))
    out = []
    for t in ts.tolist():
        a_prev, a_t = float(abar[t - 1]), float(abar[t])
        idx = torch.randint(0, len(x0), (num_samples,), generator=g)  # (M,)
        noise = torch.randn(num_samples, x0.shape[1], generator=g, dtype=torch.float64)  # (M, D)
        x = math.sqrt(a_prev) * x0[idx] + math.sqrt(1 - a_prev) * noise  # (M, D)
        log_p = mixture_log_density(x, math.sqrt(a_prev) * x0, 1 - a_prev)  # (M,)
        log_q = mixture_log_density(x, math.sqrt(a_t) * x0, 1 - a_t)  # (M,)
        out.append((log_p - log_q).mean())
    return torch.stack(out)  # (K,)


def gradient_similarity(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, timesteps,
                        num_examples: int = 32, seed: int = 0) -> torch.Tensor:
    """Cosine similarity (K, K) of per-timestep loss gradients w.r.t. all trainable parameters (TDC, arXiv 2312.13307).

    Row k is g_k = d/dθ mean_i L(x0_i, eps_i, t_k) on the fixed examples of `fixed_examples` (identical x0 and eps
    for every t); entry (j, k) = <g_j, g_k> / (|g_j| |g_k|) ("task similarity"; 0 where a gradient vanishes).
    Eval mode, leaves .grad untouched; memory K x (number of parameters).
    """
    ts = check_timesteps(timesteps, diffusion.T)  # (K,)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("gradient_similarity needs a model with trainable parameters")
    x0, eps = fixed_examples(images, num_examples, seed)  # 2 x (n, C, H, W)
    device, was_training = model_device(model), model.training
    x0, eps = x0.to(device), eps.to(device)
    grads = []
    model.eval()
    try:
        for t in ts.tolist():
            tb = torch.full((len(x0),), t, dtype=torch.long, device=device)  # (n,)
            loss = diffusion.losses(model, x0, tb, eps).mean()
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten().double()
                                    for gi, p in zip(g, params)]))  # (P,)
    finally:
        model.train(was_training)
    G = torch.stack(grads)  # (K, P)
    unit = G / G.norm(dim=1, keepdim=True).clamp(min=1e-300)  # (K, P)
    return (unit @ unit.T).clamp(-1, 1).cpu()  # (K, K)


# ---- the `profile` stage: every measure on one grid of timesteps -------------------------------------------------


def check_profile(pcfg, num_images: int, num_params: int) -> None:
    """ConfigError if tdc.profile asks for more examples than images or more gradient memory than grad_max_mib."""
    for key in ("num_examples", "grad_examples"):
        if getattr(pcfg, key) > num_images:
            raise ConfigError(f"tdc.profile.{key}={getattr(pcfg, key)} exceeds the {num_images} training images")
    mib = pcfg.num_timesteps * num_params * 8 / 2**20
    if mib > pcfg.grad_max_mib:
        raise ConfigError(f"tdc.profile: the gradient-similarity matrix needs {mib:.0f} MiB of gradients "
                          f"(num_timesteps={pcfg.num_timesteps} x {num_params} parameters x 8 bytes) > grad_max_mib="
                          f"{pcfg.grad_max_mib}; lower num_timesteps or raise grad_max_mib")


def difficulty_profile(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, history_rows: list[dict],
                       pcfg) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(columns, similarity) on the grid of tdc.profile.num_timesteps bin-centre timesteps `timestep_grid`.

    Columns (K,) each: t, snr_db, loss_mean / loss_var / log_loss_mean (`per_timestep_loss`), convergence_speed of
    each t's bin of the training history, rel_entropy_gauss (and rel_entropy_mc with mc_samples), grad_sim_mean (mean
    similarity to the other grid t) and grad_sim_next (to the next grid t); similarity is `gradient_similarity` (K, K).
    """
    T = diffusion.T
    ts = timestep_grid(T, pcfg.num_timesteps)  # (K,)
    means, variances = [], []
    for t in progress(ts.tolist(), desc="loss per t"):
        m, v = per_timestep_loss(model, diffusion, images, [t], num_examples=pcfg.num_examples, seed=pcfg.seed,
                                 batch_size=pcfg.batch_size)
        means.append(m)
        variances.append(v)
    loss_mean, loss_var = torch.cat(means), torch.cat(variances)  # (K,), (K,)
    conv_bins = convergence_speed(history_rows, tolerance=pcfg.convergence_tolerance,
                                  smoothing=pcfg.convergence_smoothing)  # (bins,)
    conv = conv_bins[t_bin(ts, T, len(conv_bins))]  # (K,)
    abar = diffusion.schedule.abar
    mean, var = data_moments(images)
    columns = {"t": ts, "snr_db": snr_db_at(diffusion.schedule, ts), "loss_mean": loss_mean, "loss_var": loss_var,
               "log_loss_mean": loss_mean.clamp(min=1e-30).log(), "convergence_speed": conv,
               "rel_entropy_gauss": relative_entropy(abar, mean, var)[ts]}
    if pcfg.mc_samples:
        g = torch.Generator().manual_seed(derive_seed(pcfg.seed, 3))
        subset = images[torch.randperm(len(images), generator=g)[: pcfg.mc_images]]
        mc = torch.full((len(ts),), math.nan, dtype=torch.float64)  # (K,): NaN at t = 0 (no data density)
        for k, t in enumerate(progress(ts.tolist(), desc="MC relative entropy")):
            if t >= 1:
                mc[k] = relative_entropy_mc(abar, subset, [t], num_samples=pcfg.mc_samples, seed=pcfg.seed)[0]
        columns["rel_entropy_mc"] = mc
    log.info("gradient similarity over %d timesteps (%d examples each)", len(ts), pcfg.grad_examples)
    sim = gradient_similarity(model, diffusion, images, ts, num_examples=pcfg.grad_examples, seed=pcfg.seed)  # (K, K)
    K = len(ts)
    off = (sim.sum(1) - sim.diagonal()) / max(K - 1, 1)  # (K,) mean similarity to the other grid timesteps
    nxt = torch.cat([sim.diagonal(1), sim.diagonal(1)[-1:]]) if K > 1 else torch.ones(1, dtype=sim.dtype)
    columns.update({"grad_sim_mean": off, "grad_sim_next": nxt})
    return columns, sim
