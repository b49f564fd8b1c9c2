"""Images for people, written atomically: sample grids and the pipeline's plots (difficulty profile, timestep groups,
pruning search, split consistency, FID curves)."""
from __future__ import annotations

import math

import torch
from torchvision.utils import save_image

from .io import atomic_path


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> None:
    """Save uint8 images (N, C, H, W) as one PNG grid, nrow per row (default: square)."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    with atomic_path(path) as tmp:
        save_image(images.float() / 255, tmp, nrow=nrow, padding=1, format="png")


def save_figure(fig, path, dpi: int = 90) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pair_grid(a: torch.Tensor, b: torch.Tensor, n: int, path) -> None:
    """Grid of n sample pairs: row 2k holds model a's samples, row 2k+1 model b's (uint8 (N, C, H, W))."""
    per_row = min(8, n)
    rows = []
    for s in range(0, n, per_row):
        rows += [a[s : s + per_row], b[s : s + per_row]]
    rows = [r for r in rows if len(r) == per_row]
    save_grid(torch.cat(rows), path, nrow=per_row)


def plot_profile(columns: dict[str, torch.Tensor], similarity: torch.Tensor, path) -> None:
    """Difficulty measures of the profile against t, and the gradient-similarity heatmap, as one PNG."""
    plt = _pyplot()
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


def plot_groups(groups, snr_db: torch.Tensor, profile: dict, path) -> None:
    """SNR_dB and the profiled loss against t with the timestep-group boundaries."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(range(len(snr_db)), snr_db.numpy(), color="tab:blue")
    ax.set_xlabel("t")
    ax.set_ylabel("SNR_dB", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(profile["t"].numpy(), profile["loss_mean"].numpy(), color="tab:red", marker=".")
    ax2.set_ylabel("loss mean (profile)", color="tab:red")
    if bool((profile["loss_mean"] > 0).all()):
        ax2.set_yscale("log")
    for i, (lo, hi) in enumerate(groups):
        ax.axvspan(lo, hi, alpha=0.12, color="grey" if i % 2 else "tab:green")
        ax.axvline(lo, color="k", lw=0.8)
        ax.text((lo + hi) / 2, 0.97, str(i), ha="center", va="top", transform=ax.get_xaxis_transform())
    ax.set_title("timestep groups")
    save_figure(fig, path)


def plot_search(rounds: list[dict], budget: float, full_macs: float, title: str, path) -> None:
    """Pruning search: proxy score per round and best so far (left), candidate MACs / F against the budget (right)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    rs = [e["round"] for e in rounds]
    scores = [math.nan if e["score"] is None else e["score"] for e in rounds]
    best, running = [], math.inf
    for s in scores:
        running = min(running, s) if math.isfinite(s) else running
        best.append(running if math.isfinite(running) else math.nan)
    ax.plot(rs, scores, "o", label="candidate")
    ax.plot(rs, best, "-", color="k", label="best so far")
    ax.set_xlabel("round")
    ax.set_ylabel("proxy score (lower is better)")
    ax.legend()
    ax2.bar(rs, [e["macs"] / full_macs for e in rounds], color="tab:grey")
    ax2.axhline(budget / full_macs, color="tab:red", label="budget")
    ax2.set_xlabel("round")
    ax2.set_ylabel("MACs / full model")
    ax2.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def plot_split(rows: list[dict], path) -> None:
    """Split consistency: MSE and SSIM against the split step, one line per split pair."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for pair in sorted({r["pair"] for r in rows}):
        pr = [r for r in rows if r["pair"] == pair]
        for ax, key in zip(axes, ("mse", "ssim")):
            ax.plot([r["split_t"] for r in pr], [r[key] for r in pr], marker="o", label=pair)
            ax.set_xlabel("split step s (model a for t >= s, b below)")
            ax.set_ylabel(f"{key} vs model a alone")
    axes[0].legend()
    save_figure(fig, path)


def plot_fid_curves(curves: dict[str, list[tuple[int, float]]], baseline_fid: float, path) -> None:
    """FID-vs-iterations of every strategy (log y) with the baseline's final FID as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(curves.items()):
        steps, fids = zip(*points)
        ax.plot(steps, fids, marker="o", ms=3, label=name)
    ax.axhline(baseline_fid, ls="--", lw=0.8, c="gray", label="baseline final FID")
    ax.set(yscale="log", xlabel="training iteration", ylabel="FID (featnet)", title="FID vs iterations")
    ax.legend(fontsize=8)
    save_figure(fig, path)
