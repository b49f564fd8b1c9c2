"""Split the timesteps [0, T) into K contiguous groups: uniform, equal SNR_dB widths, or optimal 1-D segmentation.

Groups are [lo, hi) pairs sorted by lo that tile [0, T) exactly; group 0 holds the lowest t (least noise, the
hardest tasks per Kim et al., arXiv 2403.10348). TDC (arXiv 2312.13307, stage 2) fine-tunes one expert per group.
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError

GROUPS_FORMAT = "stepwise-groups/1"


def check_num_groups(T: int, K: int) -> None:
    """ConfigError unless 1 <= K <= T."""
    if not (isinstance(K, int) and isinstance(T, int) and 1 <= K <= T):
        raise ConfigError(f"number of groups K={K!r} must be an integer in [1, T={T!r}]")


def groups_from_boundaries(boundaries: list[int]) -> list[tuple[int, int]]:
    """[b_0=0, b_1, ..., b_K=T] -> [(b_0, b_1), ..., (b_{K-1}, b_K)]."""
    return [(int(lo), int(hi)) for lo, hi in zip(boundaries[:-1], boundaries[1:])]


def uniform_boundaries(lo: int, hi: int, K: int) -> list[int]:
    """Boundaries b_i = lo + i (hi - lo) / K, rounded down, i = 0..K, of K equal-width intervals of [lo, hi)."""
    return [lo + i * (hi - lo) // K for i in range(K + 1)]


def uniform_groups(T: int, K: int) -> list[tuple[int, int]]:
    """K equal-width intervals C_i = [iT/K, (i+1)T/K), rounded down (Kim et al., arXiv 2403.10348, DDPM clusters)."""
    check_num_groups(T, K)
    return groups_from_boundaries(uniform_boundaries(0, T, K))


def equal_snr_db_groups(snr_db: torch.Tensor, K: int) -> list[tuple[int, int]]:
    """K groups of equal width in SNR_dB(t) (TDC's difficulty axis, arXiv 2312.13307).

    Thresholds split [min SNR_dB, max SNR_dB] into K equal intervals; boundary j is the first t whose SNR_dB falls
    below threshold j. Where a group would be empty (SNR_dB changing by more than one interval per step), its
    boundary is moved by the least amount that leaves every group at least one timestep.
    """
    s = torch.as_tensor(snr_db, dtype=torch.float64).flatten()  # (T,)
    T = len(s)
    check_num_groups(T, K)
    if not torch.all(torch.isfinite(s)) or torch.any(s[1:] > s[:-1]):
        raise ConfigError("snr_db must be finite and non-increasing in t (a valid noise schedule)")
    hi, lo = float(s[0]), float(s[-1])
    thresholds = torch.tensor([hi - j * (hi - lo) / K for j in range(1, K)], dtype=torch.float64)  # (K-1,)
    inner = torch.searchsorted(-s, -thresholds, right=True).tolist()  # first t with s[t] < threshold
    bounds = [0]
    for j, b in enumerate(inner, start=1):
        bounds.append(min(max(b, bounds[-1] + 1), T - (K - j)))
    return groups_from_boundaries(bounds + [T])


def segment_costs(signal: torch.Tensor) -> torch.Tensor:
    """cost[i, j] = within-segment sum of squared deviations of signal[i:j] (inf where j <= i): (T+1, T+1)."""
    x = signal.double().reshape(len(signal), -1)  # (T, F)
    zero = torch.zeros(1, x.shape[1], dtype=torch.float64)
    s1 = torch.cat([zero, x.cumsum(0)])  # (T+1, F)
    s2 = torch.cat([zero, (x * x).cumsum(0)])  # (T+1, F)
    n = torch.arange(len(x) + 1, dtype=torch.float64)  # (T+1,)
    length = n[None, :] - n[:, None]  # (T+1, T+1)
    d1 = s1[None, :, :] - s1[:, None, :]  # (T+1, T+1, F)
    d2 = s2[None, :, :] - s2[:, None, :]  # (T+1, T+1, F)
    cost = (d2 - d1 * d1 / length.clamp(min=1)[..., None]).sum(-1).clamp(min=0)  # (T+1, T+1)
    return cost.masked_fill(length <= 0, math.inf)


def dp_groups(signal: torch.Tensor, K: int) -> list[tuple[int, int]]:
    """Optimal K-segmentation of a per-t signal (T,) or (T, F) minimising the total within-group sum of squares.

    Exact dynamic programme (Bellman 1961, 'On the approximation of curves by line segments'; Jackson et al. 2005,
    arXiv math/0309285, Sec. 2): D_k[j] = min_i D_{k-1}[i] + cost(i, j), O(K T^2) time, O(T^2) memory.
    Multi-column signals add their columns' costs; standardise columns first to weight them equally.
    """
    x = torch.as_tensor(signal, dtype=torch.float64)
    T = len(x)
    check_num_groups(T, K)
    if not torch.all(torch.isfinite(x)):
        raise ConfigError("dp grouping signal must be finite at every timestep")
    cost = segment_costs(x)  # (T+1, T+1)
    best = cost[0].clone()  # (T+1,): one segment covering [0, j)
    choices = []
    for _ in range(1, K):
        total = best[:, None] + cost  # (T+1, T+1): [i, j] = best split of [0, i) then segment [i, j)
        best, arg = total.min(0)  # (T+1,), (T+1,)
        choices.append(arg)
    bounds, j = [T], T
    for arg in reversed(choices):
        j = int(arg[j])
        bounds.append(j)
    return groups_from_boundaries([0] + bounds[::-1])


GROUPING_METHODS = {  # name -> (function, name of the per-t input it needs or None)
    "uniform": (uniform_groups, None),
    "equal_snr_db": (equal_snr_db_groups, "snr_db"),
    "dp": (dp_groups, "signal"),
}


def make_groups(method: str, T: int, K: int, *, snr_db: torch.Tensor | None = None,
                signal: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Groups of [0, T) by the named method of GROUPING_METHODS, validated."""
    if method not in GROUPING_METHODS:
        raise ConfigError(f"grouping method {method!r} is unknown; valid: {sorted(GROUPING_METHODS)}")
    fn, needs = GROUPING_METHODS[method]
    if needs is None:
        return validate_groups(fn(T, K), T)
    value = {"snr_db": snr_db, "signal": signal}[needs]
    if value is None or len(value) != T:
        raise ConfigError(f"grouping method {method!r} needs {needs} with one entry per timestep (T={T}), "
                          f"got {None if value is None else len(value)}")
    return validate_groups(fn(value, K), T)


def validate_groups(groups, T: int) -> list[tuple[int, int]]:
    """Groups as [(lo, hi)] if they tile [0, T) exactly (sorted, contiguous, non-empty), else one ConfigError."""
    try:
        pairs = [(int(lo), int(hi)) for lo, hi in groups]
    except (TypeError, ValueError):
        raise ConfigError(f"groups must be a list of [lo, hi) integer pairs, got {groups!r}") from None
    if not pairs:
        raise ConfigError("groups is empty: at least one [lo, hi) group is needed")
    for i, (lo, hi) in enumerate(pairs):
        if hi <= lo:
            raise ConfigError(f"group {i} [{lo}, {hi}) is empty: each group needs lo < hi")
        if lo < 0 or hi > T:
            raise ConfigError(f"group {i} [{lo}, {hi}) lies outside [0, T={T})")
        if i and lo != pairs[i - 1][1]:
            kind = "overlaps" if lo < pairs[i - 1][1] else "leaves a gap after"
            raise ConfigError(f"group {i} [{lo}, {hi}) {kind} group {i - 1} {list(pairs[i - 1])}: groups must be "
                              f"sorted by lo and contiguous")
    if pairs[0][0] != 0 or pairs[-1][1] != T:
        raise ConfigError(f"groups cover [{pairs[0][0]}, {pairs[-1][1]}) but must cover [0, T={T}) exactly")
    return pairs


def groups_to_dict(groups, T: int, method: str, snr_db: torch.Tensor | None = None, **meta) -> dict:
    """JSON-able groups.json record: {format, T, method, num_groups, groups: [{index, lo, hi[, snr_db_*]}], meta}."""
    pairs = validate_groups(groups, T)
    rows = []
    for i, (lo, hi) in enumerate(pairs):
        row = {"index": i, "lo": lo, "hi": hi}
        if snr_db is not None:
            row["snr_db_lo_t"], row["snr_db_hi_t"] = float(snr_db[lo]), float(snr_db[hi - 1])
        rows.append(row)
    return {"format": GROUPS_FORMAT, "T": T, "method": method, "num_groups": len(pairs), "groups": rows,
            "meta": meta}


def groups_from_dict(record: dict) -> list[tuple[int, int]]:
    """The validated [(lo, hi)] groups of a groups.json record written by `groups_to_dict`."""
    if not isinstance(record, dict) or record.get("format") != GROUPS_FORMAT or "groups" not in record:
        raise ConfigError(f"not a groups record (expected format {GROUPS_FORMAT!r} with 'T' and 'groups')")
    rows = sorted(record["groups"], key=lambda r: r["index"])
    return validate_groups([(r["lo"], r["hi"]) for r in rows], int(record["T"]))


def group_index(t: torch.Tensor, groups) -> torch.Tensor:
    """Index of the group holding each timestep, for groups that tile [0, T): (B,) long."""
    his = torch.tensor([hi for _, hi in groups], device=t.device)  # (K,)
    return torch.searchsorted(his, t, right=True)  # (B,)


def interpolate_profile(timesteps, values, T: int) -> torch.Tensor:
    """Piecewise-linear interpolation of a profile measured at sorted timesteps onto every t in [0, T): (T,) or (T, F).

    Constant extrapolation beyond the first and last measured timestep.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()  # (K,)
    v = torch.as_tensor(values, dtype=torch.float64)  # (K,) or (K, F)
    if len(ts) != len(v) or len(ts) == 0 or torch.any(ts[1:] <= ts[:-1]):
        raise ConfigError("interpolate_profile needs strictly increasing timesteps, one per value")
    if len(ts) == 1:
        return v.expand(T, *v.shape[1:]).clone()
    grid = torch.arange(T, dtype=torch.float64)  # (T,)
    right = torch.searchsorted(ts, grid).clamp(1, len(ts) - 1)  # (T,)
    left = right - 1  # (T,)
    span = (ts[right] - ts[left]).clamp(min=1e-12)  # (T,)
    w = ((grid - ts[left]) / span).clamp(0, 1)  # (T,)
    w = w.view(-1, *([1] * (v.dim() - 1)))
    return v[left] * (1 - w) + v[right] * w
