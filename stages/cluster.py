"""DVC stage `cluster`: split [0, T) into tdc.num_groups contiguous timestep groups (TDC stage 2, arXiv 2312.13307).

Methods (tdc.cluster.method): `uniform` (Kim et al., arXiv 2403.10348 clusters), `equal_snr_db` (equal SNR_dB
widths, TDC's difficulty axis), `dp` (optimal least-squares segmentation of profile column(s) interpolated onto
every t) and `manual` (explicit boundaries), as `stepwise.tdc.tdc_groups`. Writes groups.json (validated to tile
[0, T) exactly) and a plot.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import read_table, table_columns
from stepwise.grouping import groups_to_dict
from stepwise.io import write_json
from stepwise.schedules import NoiseSchedule
from stepwise.tdc import tdc_groups
from stepwise.visualise import plot_groups

from stepwise.tracking import stage_run

from .common import ARTIFACTS, add_paths, run_stage

log = logging.getLogger("stepwise.cluster")


def main(args, cfg) -> None:
    dcfg, K, ccfg = cfg.diffusion, cfg.tdc.num_groups, cfg.tdc.cluster
    profile, similarity = (table_columns(read_table(Path(args.profile) / name, "dvc repro profile", ("t",)))
                           for name in ("profile.csv", "similarity.csv"))
    snr_db = NoiseSchedule(dcfg.schedule, dcfg.T).snr_db().double()  # (T,)
    groups = tdc_groups(ccfg, K, dcfg.T, snr_db, profile, similarity)
    with stage_run("cluster", cfg.raw, {"tdc": {"num_groups": K, "cluster": asdict(ccfg)}}) as run:
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
