"""Images for people: sample grids and figures written atomically, byte-identical for identical content."""
from __future__ import annotations

import math

import torch
from torchvision.utils import save_image

from .io import atomic_path

PNG_METADATA = {"Software": None}  # PNG text chunks matplotlib would add (its version): none


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> None:
    """Save uint8 images (N, C, H, W) as one PNG grid, nrow per row (default: square); PIL adds no metadata."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    with atomic_path(path) as tmp:
        save_image(images.float() / 255, tmp, nrow=nrow, padding=1, format="png")


def save_figure(fig, path, dpi: int = 90) -> None:
    """Save a matplotlib figure as PNG atomically and close it, without matplotlib's Software (version) tag."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=PNG_METADATA)
    plt.close(fig)
