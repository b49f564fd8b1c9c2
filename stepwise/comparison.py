"""Strategy comparison over training seeds and samples: mean FID curves with bands, iterations-to-target per seed,
and the speed-up with a 95 % bootstrap interval, "not resolved" when the interval contains 1.

Input: run summaries (`stepwise.ledger`), each one training run = (strategy, seed, FID curve with per-checkpoint
bootstrap replicates over samples, yardstick). Runs measured with different yardsticks (feature network, sample
count, sampler, steps, noise seed) are never compared: `check_yardsticks` refuses and names them.
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .intervals import NULL_RATIO, speedup_ci, verdict
from .ledger import yardstick_id
from .speedup import iterations_to_reach, speedups


def check_yardsticks(runs: list[dict]) -> dict:
    """The one yardstick all runs share; ConfigError naming the runs of each yardstick otherwise."""
    groups: dict[str, list[str]] = {}
    for r in runs:
        groups.setdefault(yardstick_id(r["yardstick"]), []).append(f"{r['strategy']}/seed{r['seed']}")
    if len(groups) > 1:
        detail = "; ".join(f"yardstick {k} ({runs[[yardstick_id(r['yardstick']) for r in runs].index(k)]['yardstick']})"
                           f": {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}" for k, v in groups.items())
        raise ConfigError(f"runs measured with different yardsticks cannot share one table: {detail}; compare each "
                          "group on its own (--yardstick ID) or rerun the evaluations with one setting")
    return runs[0]["yardstick"] if runs else {}


def by_strategy(runs: list[dict]) -> dict[str, list[dict]]:
    """{strategy: runs sorted by seed}, one run per (strategy, seed): the newest summary wins (later in the list)."""
    table: dict[str, dict[int, dict]] = {}
    for r in runs:
        table.setdefault(r["strategy"], {})[r["seed"]] = r
    return {s: [seeds[k] for k in sorted(seeds)] for s, seeds in sorted(table.items())}


def _curves(runs: list[dict]) -> list[list[tuple[int, float]]]:
    return [[(p["step"], p["fid"]) for p in r["curve"]] for r in runs]


def _replicates(runs: list[dict]) -> list[dict] | None:
    if not all(p["fid_replicates"] for r in runs for p in r["curve"]):
        return None
    sizes = {len(p["fid_replicates"]) for r in runs for p in r["curve"]}
    if len(sizes) != 1:
        return None
    return [{p["step"]: torch.tensor(p["fid_replicates"], dtype=torch.float64) for p in r["curve"]} for r in runs]


def mean_curve(runs: list[dict]) -> list[tuple[int, float, float, float]]:
    """[(step, mean FID over seeds, min, max)] at the steps every seed has."""
    steps = sorted(set.intersection(*[{p["step"] for p in r["curve"]} for r in runs]))
    rows = []
    for s in steps:
        v = [next(p["fid"] for p in r["curve"] if p["step"] == s) for r in runs]
        rows.append((s, sum(v) / len(v), min(v), max(v)))
    return rows


def compare(runs: list[dict], baseline: str = "uniform", *, n_boot: int = 1000, alpha: float = 0.05,
            seed: int = 0) -> dict:
    """Per strategy: seeds, mean curve with min/max band, per-seed iterations to the baseline's (mean) final FID,
    the speed-up (mean curves, papers' definition) with its bootstrap interval over seeds (and samples, where the
    summaries carry replicates), and the verdict."""
    ys = check_yardsticks(runs)
    table = by_strategy(runs)
    if baseline not in table:
        raise ConfigError(f"no run of the baseline strategy {baseline!r}; have {sorted(table)}")
    means = {s: mean_curve(rs) for s, rs in table.items()}
    point = speedups({s: [(step, m) for step, m, _, _ in rows] for s, rows in means.items()}, baseline)
    target = point[baseline]["baseline_final_fid"]
    base_runs = table[baseline]
    out = {"yardstick": ys, "baseline": baseline, "target_fid": target, "alpha": alpha, "strategies": {}}
    for s, rs in table.items():
        entry = {"seeds": [r["seed"] for r in rs], "mean_curve": means[s], **point[s],
                 "iters_to_target_per_seed": [iterations_to_reach(c, target) for c in _curves(rs)]}
        if s != baseline and (len(rs) > 1 or _replicates(rs)) and (len(base_runs) > 1 or _replicates(base_runs)):
            iv = speedup_ci(_curves(base_runs), _curves(rs), baseline_replicates=_replicates(base_runs),
                            method_replicates=_replicates(rs), n_boot=n_boot, alpha=alpha, seed=seed)
            entry.update(speedup_lo=iv.lo, speedup_hi=iv.hi, verdict=verdict(iv, NULL_RATIO))
        else:
            entry["verdict"] = "baseline" if s == baseline else "not resolved (too few seeds and no replicates)"
        out["strategies"][s] = entry
    return out


def _fmt(x) -> str:
    if x is None:
        return "never"
    return "inf" if math.isinf(x) else f"{x:.0f}"


def comparison_table(result: dict) -> str:
    """The comparison as markdown: one row per strategy, the speed-up with its interval and the verdict."""
    level = round(100 * (1 - result["alpha"]))
    lines = [f"| strategy | seeds | final FID (mean, min-max) | iterations to target, per seed | speed-up "
             f"[{level} % interval] | verdict |", "|---|---|---|---|---|---|"]
    for s, e in result["strategies"].items():
        _, mean, lo, hi = e["mean_curve"][-1]
        speed = "-" if e["speedup"] is None else (f"{e['speedup']:.2f}x" if math.isfinite(e["speedup"]) else "inf")
        if "speedup_lo" in e:
            speed += f" [{e['speedup_lo']:.2f}, {e['speedup_hi']:.2f}]"
        reach = ", ".join(_fmt(x) for x in e["iters_to_target_per_seed"])
        lines.append(f"| {s} | {len(e['seeds'])} | {mean:.2f} ({lo:.2f}-{hi:.2f}) | {reach} | {speed} | "
                     f"{e['verdict']} |")
    lines.append(f"\nTarget: the baseline's ({result['baseline']}) mean final FID {result['target_fid']:.3f}. Speed-up "
                 "= baseline iterations / strategy iterations to reach it on the mean curves; the interval resamples "
                 "training seeds (and samples, where recorded); 'not resolved' when it contains 1.0.")
    return "\n".join(lines) + "\n"


def missing_runs(runs: list[dict], strategies: list[str], seeds: list[int]) -> dict[str, list[int]]:
    """{strategy: [seed, ...]} of the (strategy, seed) pairs with no run in `runs`, strategies in the given order."""
    done = {(r["strategy"], r["seed"]) for r in runs}
    missing = {s: [k for k in seeds if (s, k) not in done] for s in strategies}
    return {s: ks for s, ks in missing.items() if ks}


def queue_commands(missing: dict[str, list[int]]) -> list[str]:
    """The `dvc exp run --queue` commands that queue exactly the missing comparison runs, one per strategy."""
    return [f"dvc exp run evaluate --queue -S experiment=compare -S strategy={s} -S 'train.seed={','.join(map(str, ks))}'"
            for s, ks in missing.items()]
