"""Per-group compute budgets for TDC's progressive scaling (arXiv 2312.13307) and the MACs they are measured in.

Group index g counts along the t axis: g = 0 holds the lowest timesteps (least noise), g = N-1 the highest.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError
from ..models.unet import AttnBlock


def low_t_largest(num_groups: int) -> list[int]:
    """TDC rank i (1..N) of each t-ordered group when low t is hardest (Kim et al., arXiv 2403.10348, Sec. 3): N..1."""
    return list(range(num_groups, 0, -1))


def high_t_largest(num_groups: int) -> list[int]:
    """TDC rank i (1..N) of each t-ordered group when high t gets the largest model: 1..N."""
    return list(range(1, num_groups + 1))


DIRECTIONS = {"low_t_largest": low_t_largest, "high_t_largest": high_t_largest}


def progressive_budgets(full_macs: float, num_groups: int, k: float, direction: str = "low_t_largest") -> list[float]:
    """FLOPs_g(i) = (i/N + (N-i)/N * k) * F for rank i of group g (TDC, arXiv 2312.13307, progressive scaling)."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"pruning.direction={direction!r} is not a direction; valid: {sorted(DIRECTIONS)}")
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ConfigError(f"pruning.num_groups={num_groups!r} must be a positive integer")
    if not 0 < k <= 1:
        raise ConfigError(f"pruning.k={k!r} must lie in (0, 1]: the smallest model's fraction of the full FLOPs")
    if not full_macs > 0:
        raise ConfigError(f"full model MACs={full_macs!r} must be positive")
    n = num_groups
    return [(i / n + (n - i) / n * k) * full_macs for i in DIRECTIONS[direction](n)]


def example_inputs(channels: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (x, t) pair for tracing a denoiser eps_theta(x_t, t): x (1, C, H, W) zeros, t (1,) zeros."""
    return torch.zeros(1, channels, image_size, image_size), torch.zeros(1, dtype=torch.long)


def attention_macs(model: nn.Module, inputs: tuple) -> dict[str, float]:
    """MACs of QK^T and AV (2 * B * (HW)^2 * C) per UNet AttnBlock, which Torch-Pruning's counter misses.

    (timm's Attention, used by DiT, is counted whole by that counter, products included.)
    """
    names = {m: n for n, m in model.named_modules()}
    found = {}

    def hook(module, args, output):
        B, C, H, W = args[0].shape
        found[names[module]] = found.get(names[module], 0.0) + 2.0 * B * (H * W) ** 2 * C

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, AttnBlock)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def layer_macs(model: nn.Module, inputs: tuple) -> tuple[float, dict[str, float]]:
    """Torch-Pruning's module MACs counter: (total, per named module it counts)."""
    total, _, per_layer, _ = tp.utils.count_ops_and_params(model, inputs, layer_wise=True)
    names = {m: n for n, m in model.named_modules()}
    return float(total), {names[m]: float(v) for m, v in per_layer.items() if v and m in names}


def count_macs(model: nn.Module, inputs: tuple) -> float:
    """Multiply-accumulates of one forward on `inputs`: Torch-Pruning's module counter (timm Attention whole, products
    included) plus the AttnBlock products it misses."""
    macs, _ = tp.utils.count_ops_and_params(model, inputs)  # counts on an eval-mode deepcopy
    return float(macs) + sum(attention_macs(model, inputs).values())
