"""DVC stage `profile`: per-timestep difficulty of the unified model (arXiv 2403.10348; TDC, arXiv 2312.13307).

On a grid of K timesteps (bin centres of K equal t-bins) it measures the EMA model's loss mean/variance on fixed
probe examples, SNR_dB, the closed-form (Gaussian-fit) and optionally Monte-Carlo relative entropy
KL(p_{t-1} || p_t), the convergence speed of the t-bin of each grid point from the pretrain loss history, and the
cosine similarity of per-timestep loss gradients. Writes <out>/profile.csv (one row per grid t),
<out>/similarity.csv (K x K) and <out>/profile.png.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stepwise.checkpoint import load_denoiser
from stepwise.config import parse
from stepwise.data import load_split
from stepwise.difficulty import (convergence_speed, data_moments, gradient_similarity, per_timestep_loss,
                                 relative_entropy, relative_entropy_mc, snr_db_at, timestep_grid)
from stepwise.errors import ConfigError, DataError
from stepwise.io import write_text
from stepwise.models import count_params
from stepwise.seeding import derive_seed
from stepwise.tdc_config import ProfileConfig
from stepwise.training import resolve_device

from stepwise.visualise import save_figure

from .common import ARTIFACTS, add_paths, load_params, run_stage, section, stage_run

log = logging.getLogger("stepwise.profile")


def read_history(path) -> list[dict]:
    """Rows of the pretrain history CSV (plots/pretrain_loss.csv) as {column: float}, empty cells dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro pretrain` to write the training history")
    rows = []
    for raw in csv.DictReader(io.StringIO(path.read_text())):
        rows.append({k: float(v) for k, v in raw.items() if k and v not in ("", None)})
    if not rows:
        raise DataError(f"{path}: no history rows")
    return rows


def table_csv(columns: dict[str, torch.Tensor]) -> str:
    """Columns of equal length as CSV text (header first); ints stay ints, floats in repr precision."""
    names = list(columns)
    n = len(columns[names[0]])
    lines = [",".join(names)]
    for i in range(n):
        cells = []
        for name in names:
            v = columns[name][i].item()
            cells.append(str(int(v)) if name == "t" else repr(float(v)))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def matrix_csv(ts: torch.Tensor, matrix: torch.Tensor) -> str:
    """A K x K matrix over timesteps as CSV: header 't,<t_0>,...', one row per t."""
    lines = ["t," + ",".join(str(int(t)) for t in ts)]
    for t, row in zip(ts.tolist(), matrix.tolist()):
        lines.append(f"{int(t)}," + ",".join(repr(float(v)) for v in row))
    return "\n".join(lines) + "\n"


def plot_profile(columns: dict[str, torch.Tensor], similarity: torch.Tensor, path) -> None:
    """Difficulty measures against t, and the similarity heatmap, as one PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = columns["t"].numpy()
    panels = [("loss_mean", "loss mean", True), ("loss_var", "loss variance", True),
              ("convergence_speed", "convergence time (fraction of run)", False),
              ("rel_entropy_gauss", "KL(p_{t-1}||p_t), Gaussian fit", True), ("snr_db", "SNR_dB", False)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title, logy) in zip(axes.flat, panels):
        ax.plot(t, columns[key].numpy(), marker=".", label=key)
        if key == "rel_entropy_gauss" and "rel_entropy_mc" in columns:
            ax.plot(t, columns["rel_entropy_mc"].numpy(), marker=".", label="Monte Carlo")
            ax.legend()
        if logy and bool((columns[key] > 0).all()):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("t")
    ax = axes.flat[-1]
    im = ax.imshow(similarity.numpy(), vmin=-1, vmax=1, cmap="RdBu_r", origin="lower",
                   extent=(t[0], t[-1], t[0], t[-1]))
    ax.set_title("gradient cosine similarity")
    ax.set_xlabel("t")
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def main(args) -> None:
    params = load_params(args.params)
    pcfg = parse(ProfileConfig, section(params, "tdc", "profile"), "tdc.profile")
    model, diffusion, _ = load_denoiser(args.model, use_ema=pcfg.use_ema)
    T = diffusion.T
    ts = timestep_grid(T, pcfg.num_timesteps)  # (K,)
    images, _, _ = load_split(f"{args.data}/train.pt")
    for key in ("num_examples", "grad_examples"):
        if getattr(pcfg, key) > len(images):
            raise ConfigError(f"tdc.profile.{key}={getattr(pcfg, key)} exceeds the {len(images)} training images")
    mib = len(ts) * count_params(model) * 8 / 2**20
    if mib > pcfg.grad_max_mib:
        raise ConfigError(f"tdc.profile: the gradient-similarity matrix needs {mib:.0f} MiB of gradients "
                          f"(num_timesteps={len(ts)} x {count_params(model)} parameters x 8 bytes) > grad_max_mib="
                          f"{pcfg.grad_max_mib}; lower num_timesteps or raise grad_max_mib")
    history = read_history(args.history)
    device = resolve_device(pcfg.device)
    model, diffusion = model.to(device), diffusion.to(device)
    out = Path(args.out)
    with stage_run("profile", params, {"tdc": {"profile": asdict(pcfg)}}) as run:
        means, variances = [], []
        for t in tqdm(ts.tolist(), desc="loss per t"):
            m, v = per_timestep_loss(model, diffusion, images, [t], num_examples=pcfg.num_examples, seed=pcfg.seed,
                                     batch_size=pcfg.batch_size)
            means.append(m)
            variances.append(v)
        loss_mean, loss_var = torch.cat(means), torch.cat(variances)  # (K,), (K,)
        conv_bins = convergence_speed(history, tolerance=pcfg.convergence_tolerance,
                                      smoothing=pcfg.convergence_smoothing)  # (bins,)
        conv = conv_bins[(ts * len(conv_bins) // T).clamp(max=len(conv_bins) - 1)]  # (K,)
        abar = diffusion.schedule.abar
        mean, var = data_moments(images)
        columns = {"t": ts, "snr_db": snr_db_at(diffusion.schedule, ts), "loss_mean": loss_mean,
                   "loss_var": loss_var, "log_loss_mean": loss_mean.clamp(min=1e-30).log(),
                   "convergence_speed": conv, "rel_entropy_gauss": relative_entropy(abar, mean, var)[ts]}
        if pcfg.mc_samples:
            g = torch.Generator().manual_seed(derive_seed(pcfg.seed, 3))
            subset = images[torch.randperm(len(images), generator=g)[: pcfg.mc_images]]
            mc = torch.full((len(ts),), math.nan, dtype=torch.float64)  # (K,): NaN at t = 0 (no data density)
            for k, t in enumerate(tqdm(ts.tolist(), desc="MC relative entropy")):
                if t >= 1:
                    mc[k] = relative_entropy_mc(abar, subset, [t], num_samples=pcfg.mc_samples, seed=pcfg.seed)[0]
            columns["rel_entropy_mc"] = mc
        log.info("gradient similarity over %d timesteps (%d examples each)", len(ts), pcfg.grad_examples)
        sim = gradient_similarity(model, diffusion, images, ts, num_examples=pcfg.grad_examples,
                                  seed=pcfg.seed)  # (K, K)
        K = len(ts)
        off = (sim.sum(1) - sim.diagonal()) / max(K - 1, 1)  # (K,) mean similarity to the other grid timesteps
        nxt = torch.cat([sim.diagonal(1), sim.diagonal(1)[-1:]]) if K > 1 else torch.ones(1, dtype=sim.dtype)
        columns.update({"grad_sim_mean": off, "grad_sim_next": nxt})
        write_text(table_csv(columns), out / "profile.csv")
        write_text(matrix_csv(ts, sim), out / "similarity.csv")
        plot_profile(columns, sim, out / "profile.png")
        for k, t in enumerate(ts.tolist()):
            run.log_metrics({f"profile/{name}": float(col[k]) for name, col in columns.items()
                             if name != "t" and math.isfinite(float(col[k]))}, step=int(t))
        run.log_metrics({"num_timesteps": K, "hardest_t_by_loss": int(ts[int(loss_mean.argmax())]),
                         "slowest_t_by_convergence": int(ts[int(conv.argmax())])})
        run.log_artifact(out)
        log.info("profiled %d timesteps -> %s", K, out)


def configure(parser) -> None:
    add_paths(parser, "data", "history", model=ARTIFACTS["unified"], out=ARTIFACTS["profile"])


if __name__ == "__main__":
    run_stage("profile", main, configure)
