"""A small classifier trained on the dataset itself; its penultimate layer is the feature space for offline FID.

Inception-v3 weights cannot always be downloaded; FID in this network's feature space (named `fid_featnet`)
follows the same Frechet-distance recipe (Heusel et al. 2017, arXiv 1706.08500, Eq. 6) in a domain-matched space.
Values are comparable only between runs that use the same feature network file.

Every feature sees the whole image: three stride-2 stages bring the map to about H/8 x W/8, a fixed 4x4 adaptive
average pool keeps its layout for any input size, and a fully connected layer over that 4x4 map makes the features
(unlike a global average of local detectors, which is a bag of patches). For 28x28 and 32x32 inputs the convolutional
receptive field of every cell of the last map (61 px) also covers the whole image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FeatNetConfig
from .errors import CheckpointError
from .io import clip, load_torch, save_torch
from .progress import progress as progress_bar
from .seeding import derive_seed

FEATNET_FORMAT = "stepwise-featnet/2"  # /1: 3 convs + global average pool (12x12 receptive field), rejected on load
POOL_GRID = 4  # the last map is average-pooled to POOL_GRID x POOL_GRID before the fully connected feature layer


def conv_block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 convolution (no bias) -> BatchNorm -> ReLU."""
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class FeatNet(nn.Module):
    """conv(w) | s2 conv(2w), conv(2w) | s2 conv(4w), conv(4w) | s2 conv(8w), 2x conv(8w) | pool 4x4 | fc -> features.

    Inputs are uint8 (B, C, H, W) of any size and channel count; features (B, feature_dim) feed a linear classifier.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 16, feature_dim: int = 128,
                 mean=(0.5,), std=(0.5,)):
        super().__init__()
        self.args = {"channels": channels, "num_classes": num_classes, "width": width, "feature_dim": feature_dim,
                     "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        w = width
        self.trunk = nn.Sequential(
            *conv_block(channels, w),
            *conv_block(w, 2 * w, 2), *conv_block(2 * w, 2 * w),
            *conv_block(2 * w, 4 * w, 2), *conv_block(4 * w, 4 * w),
            *conv_block(4 * w, 8 * w, 2), *conv_block(8 * w, 8 * w), *conv_block(8 * w, 8 * w),
        )
        self.embed = nn.Sequential(nn.AdaptiveAvgPool2d(POOL_GRID), nn.Flatten(),
                                   nn.Linear(8 * w * POOL_GRID**2, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 255] float images (B, C, H, W) -> last convolutional map (B, 8w, ~H/8, ~W/8)."""
        x = (images.float() / 255 - self.mean) / self.std  # (B, C, H, W)
        return self.trunk(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 255] float images (B, C, H, W) -> features (B, feature_dim)."""
        return self.embed(self.feature_map(images))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)


def one_cycle(step: int, total: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier of a one-cycle schedule (Smith & Topin 2017, arXiv 1708.07120): linear from 1/25 to 1
    over the first warmup_fraction of the steps, then cosine down to 0 at `total`."""
    warm = max(1, round(warmup_fraction * total))
    if step < warm:
        return 1 / 25 + (1 - 1 / 25) * step / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def train_featnet(images, labels, test_images, test_labels, num_classes: int, cfg: FeatNetConfig,
                  device="cpu", progress: bool = True) -> tuple[FeatNet, float]:
    """Train FeatNet for cfg.epochs with AdamW and a one-cycle learning rate (peak cfg.lr); returns (net, test acc).

    Deterministic given cfg.seed (initialisation and batch order).
    """
    torch.manual_seed(cfg.seed)
    x = images.float() / 255
    net = FeatNet(images.shape[1], num_classes, cfg.width, cfg.feature_dim,
                  x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp(min=1e-3).tolist()).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: one_cycle(step, total, cfg.warmup_fraction))
    bar = progress_bar(total=total, desc="featnet", disable=not progress)
    net.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch)))
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            loss = F.cross_entropy(net(images[idx].to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            if i % 50 == 0:  # .item() waits for the device
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
    save_torch({"format": FEATNET_FORMAT, "args": net.args, "state_dict": net.state_dict(), "meta": meta}, path)


def load_featnet(path) -> tuple[FeatNet, dict]:
    """Rebuild a saved FeatNet in eval mode; returns (net, meta). Files of an older format are refused."""
    hint = "run `dvc repro featnet` to rebuild it."
    obj = load_torch(path, FEATNET_FORMAT, hint="Feature networks of an older format (another architecture) cannot "
                     f"be used: {hint}", fields={"args": dict, "state_dict": dict, "meta": dict})
    try:
        net = FeatNet(**obj["args"])
        net.load_state_dict(obj["state_dict"])
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its args and state_dict do not build a feature network ({type(e).__name__}: "
                              f"{clip(e)}); {hint}") from None
    return net.eval(), obj["meta"]
