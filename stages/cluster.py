"""DVC stage `cluster`: split [0, T) into tdc.num_groups contiguous timestep groups (TDC stage 2, arXiv 2312.13307).

Methods (tdc.cluster.method): `uniform` (Kim et al., arXiv 2403.10348 clusters), `equal_snr_db` (equal SNR_dB
widths, TDC's difficulty axis), `dp` (optimal least-squares segmentation of profile column(s) interpolated onto
every t) and `manual` (explicit boundaries). Writes groups.json (validated to tile [0, T) exactly) and a plot.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from stepwise.config import DiffusionConfig, parse
from stepwise.errors import ConfigError, DataError
from stepwise.grouping import (groups_from_boundaries, groups_to_dict, interpolate_profile, make_groups,
                               validate_groups)
from stepwise.io import write_json
from stepwise.schedules import NoiseSchedule
from stepwise.tdc_config import SIMILARITY_SIGNAL, ClusterConfig, num_groups

from stepwise.visualise import save_figure

from .common import ARTIFACTS, add_paths, load_params, run_stage, section, stage_run

log = logging.getLogger("stepwise.cluster")


def read_table(path) -> dict[str, torch.Tensor]:
    """A numeric CSV with a header (profile.csv, similarity.csv) as {column: float64 tensor}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro profile` to write it")
    rows = list(csv.reader(io.StringIO(path.read_text())))
    if len(rows) < 2:
        raise DataError(f"{path}: no data rows")
    header, body = rows[0], rows[1:]
    return {name: torch.tensor([float(r[j]) for r in body], dtype=torch.float64) for j, name in enumerate(header)}


def dp_signal(ccfg: ClusterConfig, profile: dict, similarity: dict, T: int) -> torch.Tensor:
    """The (T, F) signal the dp method segments: chosen columns interpolated onto every t, z-scored if asked."""
    ts = profile["t"]
    cols = []
    for name in ccfg.signal:
        if name == SIMILARITY_SIGNAL:
            cols.extend(v for k, v in similarity.items() if k != "t")  # row k of the matrix = column k (symmetric)
        elif name in profile and name != "t":
            cols.append(profile[name])
        else:
            raise ConfigError(f"tdc.cluster.signal: {name!r} is not a profile column; valid: "
                              f"{sorted(k for k in profile if k != 't') + [SIMILARITY_SIGNAL]}")
    x = torch.stack(cols, 1)  # (K, F)
    if not bool(torch.isfinite(x).all()):
        bad = [n for n in ccfg.signal if n != SIMILARITY_SIGNAL and not bool(torch.isfinite(profile[n]).all())]
        raise ConfigError(f"tdc.cluster.signal column(s) {bad} hold non-finite values (e.g. rel_entropy_mc at t=0); "
                          f"choose other columns")
    if ccfg.standardise:
        x = (x - x.mean(0)) / x.std(0, unbiased=False).where(x.std(0, unbiased=False) > 0, torch.ones(1))
    return interpolate_profile(ts, x, T)  # (T, F)


def make_tdc_groups(ccfg: ClusterConfig, K: int, T: int, snr_db: torch.Tensor, profile: dict,
                    similarity: dict) -> list[tuple[int, int]]:
    """The K groups of [0, T) for the configured method, validated."""
    if ccfg.method == "manual":
        if len(ccfg.boundaries) != K + 1:
            raise ConfigError(f"tdc.cluster.boundaries has {len(ccfg.boundaries)} entries; num_groups={K} needs "
                              f"{K + 1}: [0, b_1, ..., {T}]")
        try:
            return validate_groups(groups_from_boundaries(ccfg.boundaries), T)
        except ConfigError as e:
            raise ConfigError(f"tdc.cluster.boundaries={ccfg.boundaries}: {e}") from None
    if ccfg.method == "equal_snr_db":
        s = snr_db if ccfg.snr_db_range is None else snr_db.clamp(*ccfg.snr_db_range)
        return make_groups("equal_snr_db", T, K, snr_db=s)
    if ccfg.method == "dp":
        return make_groups("dp", T, K, signal=dp_signal(ccfg, profile, similarity, T))
    return make_groups(ccfg.method, T, K)


def plot_groups(groups, snr_db: torch.Tensor, profile: dict, path) -> None:
    """SNR_dB and the profiled loss against t with the group boundaries (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(range(len(snr_db)), snr_db.numpy(), color="tab:blue")
    ax.set_xlabel("t")
    ax.set_ylabel("SNR_dB", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(profile["t"].numpy(), profile["loss_mean"].numpy(), color="tab:red", marker=".")
    ax2.set_ylabel("loss mean (profile)", color="tab:red")
    if bool((profile["loss_mean"] > 0).all()):
        ax2.set_yscale("log")
    for i, (lo, hi) in enumerate(groups):
        ax.axvspan(lo, hi, alpha=0.12, color="grey" if i % 2 else "tab:green")
        ax.axvline(lo, color="k", lw=0.8)
        ax.text((lo + hi) / 2, 0.97, str(i), ha="center", va="top", transform=ax.get_xaxis_transform())
    ax.set_title("timestep groups")
    save_figure(fig, path)


def main(args) -> None:
    params = load_params(args.params)
    dcfg = parse(DiffusionConfig, section(params, "diffusion"), "diffusion")
    K = num_groups(section(params, "tdc"), dcfg.T)
    ccfg = parse(ClusterConfig, section(params, "tdc", "cluster"), "tdc.cluster")
    profile = read_table(Path(args.profile) / "profile.csv")
    similarity = read_table(Path(args.profile) / "similarity.csv")
    snr_db = NoiseSchedule(dcfg.schedule, dcfg.T).snr_db().double()  # (T,)
    groups = make_tdc_groups(ccfg, K, dcfg.T, snr_db, profile, similarity)
    with stage_run("cluster", params, {"tdc": {"num_groups": K, "cluster": asdict(ccfg)}}) as run:
        record = groups_to_dict(groups, dcfg.T, ccfg.method, snr_db=snr_db, schedule=dcfg.schedule,
                                signal=ccfg.signal if ccfg.method == "dp" else None,
                                snr_db_range=ccfg.snr_db_range, standardise=ccfg.standardise)
        write_json(record, args.out)
        plot_groups(groups, snr_db, profile, args.plot)
        for i, (lo, hi) in enumerate(groups):
            run.log_metrics({"group_lo": lo, "group_hi": hi, "group_width": hi - lo}, step=i)
        run.log_metrics({"num_groups": len(groups)})
        run.set_tags({"tdc.groups": str([list(g) for g in groups])})
        run.log_artifact(args.out)
        run.log_artifact(args.plot)
        log.info("groups (%s): %s", ccfg.method, groups)


def configure(parser) -> None:
    add_paths(parser, "profile", out=ARTIFACTS["groups"], plot="outputs/groups.png")


if __name__ == "__main__":
    run_stage("cluster", main, configure)
