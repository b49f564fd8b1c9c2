"""Training speed-up from FID-vs-iterations curves: iterations to reach the baseline's final FID.

The papers report speed-ups as (baseline iterations) / (iterations the method needs to match the baseline's final
FID), e.g. 2404.07946 (2.6x on ImageNet-128), 2405.17403 (~3x), 2303.09556 (3.4x).
"""
from __future__ import annotations

import math


def iterations_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First iteration at which an FID curve [(step, fid)] reaches `target`, linearly interpolated; None if never."""
    pts = sorted(curve)
    if not pts:
        return None
    if pts[0][1] <= target:
        return float(pts[0][0])
    for (s0, f0), (s1, f1) in zip(pts, pts[1:]):
        if f1 <= target:
            return s0 + (s1 - s0) * (f0 - target) / (f0 - f1)
    return None


def speedups(curves: dict[str, list[tuple[int, float]]], baseline: str = "uniform") -> dict[str, dict]:
    """Per strategy: final FID, iterations to reach the baseline's final FID, and the speed-up (papers' definition).

    speed-up = (iterations the baseline needs to first reach its final FID) / (iterations the strategy needs), both by
    the same first-crossing rule, so the baseline is exactly 1x even when its noisy curve dips below its final FID
    before the last checkpoint (for a monotone baseline curve the numerator is its last step, as in the papers).
    """
    if baseline not in curves or not curves[baseline]:
        raise ValueError(f"no FID curve for the baseline {baseline!r}; have {sorted(curves)}")
    _, base_fid = max(curves[baseline])
    base_reach = iterations_to_reach(curves[baseline], base_fid)  # <= its last step: FID curves are not monotone
    out = {}
    for name, curve in sorted(curves.items()):
        reach = iterations_to_reach(curve, base_fid)
        final_step, final_fid = max(curve)
        out[name] = {"final_step": final_step, "final_fid": final_fid, "baseline_final_fid": base_fid,
                     "iters_to_baseline_fid": reach, "baseline_iters_to_final_fid": base_reach,
                     "speedup": base_reach / reach if reach else (math.inf if reach == 0 else None)}
    return out
