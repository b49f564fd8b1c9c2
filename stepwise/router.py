"""Inference-time routing to per-timestep-group expert denoisers (TDC stage 2, arXiv 2312.13307; eDiff-I experts).

`ExpertRouter(experts, ranges, fallback)` behaves like one denoiser model(x_t, t): each example goes to the expert
whose [lo, hi) range holds its t (t may differ within a batch), and to the fallback (the unified stage-1 model)
where no expert covers t.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


def check_ranges(ranges) -> list[tuple[int, int]]:
    """Ranges as [(lo, hi)] with 0 <= lo < hi, pairwise disjoint (any order), else one ConfigError."""
    try:
        pairs = [(int(lo), int(hi)) for lo, hi in ranges]
    except (TypeError, ValueError):
        raise ConfigError(f"expert ranges must be [lo, hi) integer pairs, got {ranges!r}") from None
    for i, (lo, hi) in enumerate(pairs):
        if not 0 <= lo < hi:
            raise ConfigError(f"expert {i} range [{lo}, {hi}) is invalid: need 0 <= lo < hi")
    order = sorted(range(len(pairs)), key=lambda i: pairs[i])
    for a, b in zip(order[:-1], order[1:]):
        if pairs[b][0] < pairs[a][1]:
            raise ConfigError(f"expert ranges overlap: expert {a} {list(pairs[a])} and expert {b} {list(pairs[b])}")
    return pairs


class ExpertRouter(nn.Module):
    """model(x_t, t) that sends each example to the expert owning its t, or to `fallback` where none does."""

    def __init__(self, experts, ranges, fallback: nn.Module | None = None):
        super().__init__()
        experts = list(experts)
        pairs = check_ranges(ranges)
        if len(experts) != len(pairs):
            raise ConfigError(f"{len(experts)} experts but {len(pairs)} ranges: give one [lo, hi) range per expert")
        if not experts and fallback is None:
            raise ConfigError("ExpertRouter needs at least one expert or a fallback model")
        self.experts = nn.ModuleList(experts)
        self.ranges = pairs
        self.fallback = fallback

    def extra_repr(self) -> str:
        return f"ranges={self.ranges}, fallback={self.fallback is not None}"

    def expert_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the expert whose range holds each t, -1 where none does: (B,) long."""
        idx = torch.full_like(t, -1, dtype=torch.long)  # (B,)
        for i, (lo, hi) in enumerate(self.ranges):
            idx[(t >= lo) & (t < hi)] = i
        return idx

    def covers(self, t) -> torch.Tensor:
        """Whether some expert or the fallback handles each t: bool (B,) (a 0-dim tensor for a scalar t)."""
        t = torch.as_tensor(t)
        if self.fallback is not None:
            return torch.ones_like(t, dtype=torch.bool)
        return self.expert_index(t.flatten()).view(t.shape) >= 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-example dispatch: out[b] = expert_{k(t_b)}(x_t[b], t_b): (B, C, H, W)."""
        idx = self.expert_index(t)  # (B,)
        if self.fallback is None and bool((idx < 0).any()):
            bad = sorted(set(t[idx < 0].tolist()))
            raise ConfigError(f"timestep(s) {bad[:8]} are covered by no expert {self.ranges} and there is no fallback")
        models = [*self.experts, self.fallback]  # index -1 -> fallback
        present = torch.unique(idx).tolist()
        if len(present) == 1:  # the common sampling case: one t for the whole batch
            return models[present[0]](x_t, t)
        out = None
        for k in present:
            mask = idx == k  # (B,)
            y = models[k](x_t[mask], t[mask])  # (b, C, H, W)
            if out is None:
                out = y.new_empty((len(x_t), *y.shape[1:]))  # (B, C, H, W)
            out[mask] = y.to(out.dtype)
        return out
