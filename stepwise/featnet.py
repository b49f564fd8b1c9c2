"""A small classifier trained on the dataset itself; its penultimate layer is the feature space for offline FID.

Inception-v3 weights cannot always be downloaded; FID in this network's feature space (named `fid_featnet`)
follows the same Frechet-distance recipe (Heusel et al. 2017, arXiv 1706.08500, Eq. 6) in a domain-matched space.
Values are comparable only between runs that use the same feature network file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import FeatNetConfig
from .io import load_torch, save_torch
from .seeding import derive_seed

FEATNET_FORMAT = "stepwise-featnet/1"


class FeatNet(nn.Module):
    """conv(w)-conv(2w)-pool-conv(4w)-pool-gap -> features (feature_dim) -> logits; inputs uint8 (B, C, H, W)."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 128,
                 mean=(0.5,), std=(0.5,)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        c = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 255] float images (B, C, H, W) -> features (B, feature_dim)."""
        x = (images.float() / 255 - self.mean) / self.std  # (B, C, H, W)
        return self.body(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)


def train_featnet(images, labels, test_images, test_labels, num_classes: int, cfg: FeatNetConfig,
                  device="cpu", progress: bool = True) -> tuple[FeatNet, float]:
    """Train FeatNet with Adam for cfg.epochs on (images, labels); returns (net, test accuracy)."""
    torch.manual_seed(cfg.seed)
    x = images.float() / 255
    net = FeatNet(images.shape[1], num_classes, cfg.width, cfg.feature_dim,
                  x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp(min=1e-3).tolist()).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="featnet", disable=not progress)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch)))
        net.train()
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            loss = F.cross_entropy(net(images[idx].to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return net, accuracy(net, test_images, test_labels, device)


@torch.no_grad()
def accuracy(net: FeatNet, images, labels, device="cpu", batch_size: int = 512) -> float:
    """Top-1 accuracy of `net` on (images, labels)."""
    net.eval()
    correct = sum(int((net(images[i : i + batch_size].to(device)).argmax(1).cpu() == labels[i : i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def save_featnet(net: FeatNet, path, meta: dict) -> None:
    """Write the feature network (weights + constructor args + metadata) atomically."""
    args = {"channels": net.body[0].in_channels, "num_classes": net.head.out_features,
            "width": net.body[0].out_channels, "feature_dim": net.head.in_features,
            "mean": net.mean.flatten().tolist(), "std": net.std.flatten().tolist()}
    save_torch({"format": FEATNET_FORMAT, "args": args, "state_dict": net.state_dict(), "meta": meta}, path)


def load_featnet(path) -> tuple[FeatNet, dict]:
    """Rebuild a saved FeatNet in eval mode; returns (net, meta)."""
    obj = load_torch(path, FEATNET_FORMAT, hint="Run `dvc repro featnet` to rebuild it.")
    net = FeatNet(**obj["args"])
    net.load_state_dict(obj["state_dict"])
    return net.eval(), obj["meta"]
