"""Bootstrap percentile intervals and verdicts for claims ("method X beats baseline Y", "X trains 2x faster").

A claim is resolved only when its interval excludes the null value: 0 for a difference, 1.0 for a ratio. Intervals
are Efron's percentile intervals (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13, Eq. 13.5):
the alpha/2 and 1 - alpha/2 quantiles of the statistic over resamples drawn with replacement. The lower end is the
lower and the upper end the higher order statistic (no interpolation), so infinite replicates (a speed-up whose
method starts below the target) keep the interval exact and it is never narrower than the interpolated one.

Metric-specific resampling (FID/KID/precision/recall over feature tensors) lives in stepwise.fidelity and uses
`resample_counts` and `percentile_interval` from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import ConfigError
from .speedup import speedups

RESOLVED, NOT_RESOLVED = "resolved", "not resolved"
NULL_DIFFERENCE, NULL_RATIO = 0.0, 1.0  # the value a claim's interval must exclude


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval [lo, hi] at level 1 - alpha."""

    estimate: float
    lo: float
    hi: float
    alpha: float
    n_boot: int

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi


def _check(n_boot: int, alpha: float) -> None:
    if int(n_boot) < 1:
        raise ConfigError(f"n_boot={n_boot} must be >= 1 bootstrap resamples")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must lie strictly between 0 and 1 (0.05 for a 95 % interval)")


def resample_indices(size: int, n_boot: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of n_boot resamples with replacement of `size` items: (n_boot, size) int64."""
    if size < 1:
        raise ConfigError("cannot resample an empty set")
    return torch.randint(size, (n_boot, size), generator=generator)  # (n_boot, size)


def resample_counts(size: int, n_boot: int, generator: torch.Generator) -> torch.Tensor:
    """How often each item appears in each of n_boot resamples with replacement: (n_boot, size) float64, rows sum to size."""
    idx = resample_indices(size, n_boot, generator)  # (n_boot, size)
    return torch.zeros(n_boot, size, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def percentile_interval(estimate: float, replicates, alpha: float = 0.05, centered: bool = False) -> Interval:
    """Efron's percentile interval (Efron & Tibshirani 1993, Eq. 13.5) of bootstrap `replicates` around `estimate`.

    centered=True first shifts the replicates by the bootstrap bias estimate, estimate - mean(replicates) (ibid.,
    Eq. 10.2): for statistics whose resamples are systematically off because a resample holds only ~63 % distinct
    rows (FID rises, precision/recall fall), the interval then covers the metric's expected value at this sample
    count instead of missing it, and it always contains the estimate.
    """
    reps = torch.as_tensor(replicates, dtype=torch.float64).flatten()  # (n_boot,)
    _check(reps.numel(), alpha)
    if torch.isnan(reps).any():
        raise ValueError(f"{int(torch.isnan(reps).sum())} of {reps.numel()} bootstrap replicates are NaN")
    if centered:
        if not torch.isfinite(reps).all():
            raise ValueError("centered percentile intervals need finite replicates")
        reps = reps + (estimate - reps.mean())
    lo = torch.quantile(reps, alpha / 2, interpolation="lower")
    hi = torch.quantile(reps, 1 - alpha / 2, interpolation="higher")
    return Interval(float(estimate), float(lo), float(hi), alpha, reps.numel())


def bootstrap_ci(data, sizes: int | Sequence[int] | None = None, *, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap interval of a statistic.

    data: 1-D values (the statistic is their mean; resampled in one vectorised step), or a callable
    statistic(*idx) -> float that takes one index tensor per group and `sizes` the group sizes (an int for one group);
    each group is resampled independently. The estimate is the statistic of the unresampled data.
    """
    _check(n_boot, alpha)
    gen = torch.Generator().manual_seed(seed)
    if callable(data):
        if sizes is None:
            raise ConfigError("bootstrap_ci over a statistic needs the group sizes (sizes=n or (n1, n2, ...))")
        sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
        estimate = float(data(*(torch.arange(n) for n in sizes)))
        idx = [resample_indices(n, n_boot, gen) for n in sizes]  # each (n_boot, n)
        reps = torch.tensor([float(data(*(i[b] for i in idx))) for b in range(n_boot)], dtype=torch.float64)
        return percentile_interval(estimate, reps, alpha)
    values = torch.as_tensor(data, dtype=torch.float64).flatten()  # (n,)
    if values.numel() < 2:
        raise ConfigError(f"bootstrap_ci needs >= 2 values, got {values.numel()}: one value has no spread to resample")
    reps = values[resample_indices(values.numel(), n_boot, gen)].mean(1)  # (n_boot,)
    return percentile_interval(float(values.mean()), reps, alpha)


def difference_ci(metric: Callable, a, b, reference=None, *, n_boot: int = 1000, alpha: float = 0.05,
                  seed: int = 0) -> Interval:
    """Interval of metric(a[, reference]) - metric(b[, reference]) for the samples of two models.

    The rows of a and b are resampled independently; the rows of a shared reference set (e.g. the real test images'
    features) are resampled once per replicate and used by both terms, as both models are scored against it.
    """
    sizes = (len(a), len(b)) + (() if reference is None else (len(reference),))

    def statistic(ia, ib, *ir):
        ref = tuple(reference[i] for i in ir)
        return float(metric(a[ia], *ref)) - float(metric(b[ib], *ref))

    return bootstrap_ci(statistic, sizes, n_boot=n_boot, alpha=alpha, seed=seed)


def _curve_table(curves, replicates, arm: str):
    """Per-seed curves [(step, fid)] (+ optional {step: (R,) replicates}) -> steps, point (S, T), reps (S, T, R)."""
    if not curves:
        raise ConfigError(f"{arm}: no FID curves; give one [(step, fid), ...] per training seed")
    steps = sorted(s for s, _ in curves[0])
    for k, curve in enumerate(curves):
        if sorted(s for s, _ in curve) != steps:
            raise ConfigError(f"{arm}: seed curve {k} has steps {sorted(s for s, _ in curve)}, curve 0 has {steps}; "
                              "every seed must be evaluated at the same checkpoints")
    point = torch.tensor([[dict(c)[s] for s in steps] for c in curves], dtype=torch.float64)  # (S, T)
    if replicates is None:
        if len(curves) < 2:
            raise ConfigError(f"{arm}: one seed and no sample replicates leave nothing to resample; give >= 2 seeds "
                              "or per-checkpoint FID replicates")
        return steps, point, None
    if len(replicates) != len(curves) or any(sorted(r) != steps for r in replicates):
        raise ConfigError(f"{arm}: replicates must hold one {{step: tensor}} per seed curve, at the steps {steps}")
    reps = torch.stack([torch.stack([torch.as_tensor(r[s], dtype=torch.float64) for s in steps]) for r in replicates])
    return steps, point, reps  # reps (S, T, R)


def speedup_ci(baseline: Sequence, method: Sequence, *, baseline_replicates: Sequence[dict] | None = None,
               method_replicates: Sequence[dict] | None = None, n_boot: int = 1000, alpha: float = 0.05,
               seed: int = 0) -> Interval:
    """Speed-up of `method` over `baseline` (stepwise.speedup.speedups) with a bootstrap over training seeds and samples.

    baseline, method: one FID curve [(step, fid)] per training seed. Optional *_replicates: per seed curve,
    {step: (R,) tensor} of sample-bootstrap replicates of that checkpoint's FID (stepwise.fidelity.fid_replicates,
    centered on the point FID), made with the same seed at every checkpoint so that replicate j resamples the same
    sample positions at every step (checkpoints share the sampling noise). Each bootstrap replicate resamples the
    seeds of each arm with replacement, draws one sample replicate j per chosen seed curve, averages the curves over
    the seeds step by step and applies the speed-up definition to the two mean curves. The estimate uses the mean of
    the point curves. A replicate in which the method never reaches the baseline's final FID counts as speed-up 0: it
    lies below every reached value (the true one is < baseline steps / method's last step), so quantiles stay valid.
    """
    _check(n_boot, alpha)
    steps_b, point_b, reps_b = _curve_table(baseline, baseline_replicates, "baseline")
    steps_m, point_m, reps_m = _curve_table(method, method_replicates, "method")

    def ratio(mean_b: torch.Tensor, mean_m: torch.Tensor) -> float:
        s = speedups({"baseline": list(zip(steps_b, mean_b.tolist())), "method": list(zip(steps_m, mean_m.tolist()))},
                     baseline="baseline")["method"]["speedup"]
        return 0.0 if s is None else s

    def draw(point: torch.Tensor, reps: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(point.shape[0], (point.shape[0],), generator=gen)  # (S,)
        if reps is None:
            return point[seeds].mean(0)  # (T,)
        j = torch.randint(reps.shape[2], (point.shape[0],), generator=gen)  # (S,)
        return reps[seeds[:, None], torch.arange(reps.shape[1])[None], j[:, None]].mean(0)  # (S, T) -> (T,)

    gen = torch.Generator().manual_seed(seed)
    reps = [ratio(draw(point_b, reps_b, gen), draw(point_m, reps_m, gen)) for _ in range(n_boot)]
    return percentile_interval(ratio(point_b.mean(0), point_m.mean(0)), reps, alpha)


def verdict(interval: Interval, null: float) -> str:
    """'resolved' when the interval excludes the null value (NULL_DIFFERENCE 0, NULL_RATIO 1.0), else 'not resolved'."""
    return NOT_RESOLVED if interval.contains(null) else RESOLVED
