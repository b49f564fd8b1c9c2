"""Images for people: sample grids and the pipeline's plots, written atomically, byte-identical for identical content.

The figure conventions every plot follows: a title, labelled axes with units, a log axis where positive values span
decades (`needs_log`), lines told apart by colour, dash and marker together (`series_style`), and a note written on
any panel that is empty by design (`empty_panel`). PNGs carry no text chunks (no software version, no time).
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from torchvision.utils import make_grid

from .io import atomic_path

PNG_METADATA = {"Software": None}  # PNG text chunks matplotlib would add (its version): none
MIN_GRID_WIDTH = 512  # px: small images are upscaled (nearest neighbour) until a grid is at least this wide
GRID_PADDING = 2  # px between the upscaled images of a grid
TITLE_BAND = 30  # px above a grid holding its title
LOG_SPAN = 100.0  # positive values whose max / min reaches this are drawn on a log axis
DASHES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_scale(width: int, min_width: int = MIN_GRID_WIDTH, nrow: int = 1) -> int:
    """Integer nearest-neighbour factor that makes `nrow` images of `width` px at least `min_width` px wide."""
    return max(1, math.ceil(min_width / max(1, width * nrow)))


def grid_array(images: torch.Tensor, nrow: int | None = None, min_width: int = MIN_GRID_WIDTH) -> np.ndarray:
    """uint8 images (N, C, H, W), C in {1, 3} -> one RGB grid (H', W', 3) uint8, nrow per row (default: square),
    each image upscaled by an integer factor (nearest neighbour) so the grid is at least `min_width` px wide."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    s = grid_scale(images.shape[-1], min_width, min(nrow, len(images)))
    big = images.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)  # (N, C, sH, sW)
    grid = make_grid(big, nrow=nrow, padding=GRID_PADDING, pad_value=255)  # (3, H', W') uint8
    return grid.permute(1, 2, 0).contiguous().numpy()  # (H', W', 3)


def figure_png(fig, dpi: int = 90, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes without matplotlib's Software (version) tag; closes the figure."""
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA)
    pyplot().close(fig)
    return buf.getvalue()


def grid_png(images: torch.Tensor, nrow: int | None = None, title: str | None = None,
             min_width: int = MIN_GRID_WIDTH) -> bytes:
    """PNG bytes of a sample grid (see `grid_array`), with `title` (e.g. model name and training step) above it."""
    from PIL import Image

    grid = grid_array(images, nrow, min_width)  # (H, W, 3)
    if title is None:
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="png")  # PIL adds no metadata
        return buf.getvalue()
    height, width = grid.shape[:2]
    dpi = 100
    fig = pyplot().figure(figsize=(width / dpi, (height + TITLE_BAND) / dpi), dpi=dpi, facecolor="white")
    fig.figimage(grid, xo=0, yo=0, origin="upper")  # pixel-exact: no resampling
    fig.text(0.5, 1 - TITLE_BAND / 2 / (height + TITLE_BAND), title, ha="center", va="center", fontsize=12)
    return figure_png(fig, dpi=dpi, tight=False)


def save_grid(images: torch.Tensor, path, nrow: int | None = None, title: str | None = None,
              min_width: int = MIN_GRID_WIDTH) -> None:
    """Save uint8 images (N, C, H, W) as one PNG grid (see `grid_png`) atomically."""
    write_png(grid_png(images, nrow, title, min_width), path)


def save_figure(fig, path, dpi: int = 90) -> None:
    """Save a matplotlib figure as PNG atomically and close it, without matplotlib's Software (version) tag."""
    write_png(figure_png(fig, dpi), path)


def write_png(data: bytes, path) -> None:
    """Write PNG bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def needs_log(values) -> bool:
    """True when the finite values are all positive and span at least LOG_SPAN (max / min): a log axis reads them."""
    v = np.asarray([x for x in np.ravel(np.asarray(values, dtype=float)) if math.isfinite(x)])
    return bool(len(v)) and bool((v > 0).all()) and float(v.max() / v.min()) >= LOG_SPAN


def series_style(i: int, n: int, ordered: bool = False) -> dict:
    """Line style of series i of n: a colour (viridis along an ordered family such as t-bins, else tab10) plus a
    dash and a marker, so neighbouring lines differ in more than colour (and in greyscale print)."""
    plt = pyplot()
    color = plt.get_cmap("viridis")(i / max(1, n - 1) * 0.9) if ordered else plt.get_cmap("tab10")(i % 10)
    return {"color": color, "linestyle": DASHES[i % len(DASHES)], "marker": MARKERS[i % len(MARKERS)]}


def label_axes(ax, title: str, xlabel: str, ylabel: str, values=None, log: bool | None = None) -> None:
    """Title and axis labels (units in the label text); a log y axis if `log`, or if None and `needs_log(values)`."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log or (log is None and values is not None and needs_log(values)):
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def empty_panel(ax, title: str, note: str) -> None:
    """A panel that is empty by design: its title, no ticks, and `note` saying why, centred."""
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=10, color="0.35", transform=ax.transAxes)



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
    plt = pyplot()
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
    plt = pyplot()
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
    """Pruning search: proxy score per round and best so far (left, log y when it spans decades), candidate MACs as
    a fraction of the full model's against the budget (right); a note instead of empty axes when nothing was searched
    (the expert whose budget is the full model)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if not rounds:
        for a, name in ((ax, "proxy score per round"), (ax2, "candidate MACs per round")):
            empty_panel(a, name, "no search: this expert's budget is the full model, so it is kept unpruned")
    else:
        rs = [e["round"] for e in rounds]
        scores = [math.nan if e["score"] is None else e["score"] for e in rounds]
        best, running = [], math.inf
        for s in scores:
            running = min(running, s) if math.isfinite(s) else running
            best.append(running if math.isfinite(running) else math.nan)
        ax.plot(rs, scores, "o", label="candidate")
        ax.plot(rs, best, "-", color="k", label="best so far")
        label_axes(ax, "proxy score per round", "search round", "proxy score: loss after a short fine-tune "
                   "(lower is better)", values=scores)
        ax.legend()
        ax2.bar(rs, [e["macs"] / full_macs for e in rounds], color="tab:grey", label="candidate")
        ax2.axhline(budget / full_macs, color="tab:red", label="budget")
        label_axes(ax2, "candidate MACs per round", "search round", "MACs / full model's MACs")
        ax2.legend()
        for a in (ax, ax2):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    save_figure(fig, path)


def plot_split(rows: list[dict], path) -> None:
    """Split consistency: MSE and SSIM against the split step, one line per split pair."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for pair in sorted({r["pair"] for r in rows}):
        pr = [r for r in rows if r["pair"] == pair]
        for ax, key in zip(axes, ("mse", "ssim")):
            ax.plot([r["split_t"] for r in pr], [r[key] for r in pr], marker="o", label=pair)
            ax.set_xlabel("split step s (model a for t >= s, b below)")
            ax.set_ylabel(f"{key} vs model a alone")
    axes[0].legend()
    save_figure(fig, path)


def plot_fid_curves(result: dict, path) -> None:
    """Mean FID-vs-iterations curve of every strategy over its training seeds with a min-max band (log y), and the
    target (the baseline's mean final FID) as a dashed line (`stepwise.comparison.compare`'s result)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    strategies = result["strategies"]
    for i, (name, e) in enumerate(sorted(strategies.items())):
        steps, mean, lo, hi = zip(*e["mean_curve"])
        style = series_style(i, len(strategies))
        ax.plot(steps, mean, label=f"{name} ({len(e['seeds'])} seed{'s' if len(e['seeds']) > 1 else ''})", **style,
                ms=3)
        ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.15, lw=0)
    ax.axhline(result["target_fid"], ls="--", lw=0.8, c="gray", label=f"target: {result['baseline']} final FID")
    label_axes(ax, "FID vs training iterations (mean over seeds, band: min-max)", "training iteration",
               "FID (featnet features, log scale)", log=True)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)
