"""Per-group compute budgets for TDC's progressive scaling (arXiv 2312.13307), in MACs of `stepwise.flops.count_macs`.

Group index g counts along the t axis: g = 0 holds the lowest timesteps (least noise), g = N-1 the highest.
"""
from __future__ import annotations

from ..errors import ConfigError


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
