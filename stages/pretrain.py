"""DVC stage `pretrain`: train the unified denoiser on all timesteps (TDC stage 1, arXiv 2312.13307).

Resumable: checkpoints live in <out>/checkpoints (a persistent DVC output); rerunning after a crash or kill
continues from the newest checkpoint of the same configuration (`stepwise.training.train_from_scratch`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import records_table, train_sha, write_bin_curves, write_table
from stepwise.data import load_split
from stepwise.distributed import dist_info, init_from_env
from stepwise.tracking import rank_zero_run
from stepwise.training import final_loss, run_fingerprint, train_from_scratch

from .common import ARTIFACTS, add_paths, relaunch_under_torchrun, report_metrics, run_stage

log = logging.getLogger("stepwise.pretrain")


def main(args, cfg) -> None:
    model_cfg, dcfg, tcfg = asdict(cfg.model), cfg.diffusion, cfg.train
    relaunch_under_torchrun(tcfg.nproc, "stages.pretrain")
    init_from_env()
    rank, _ = dist_info()
    images, _, _ = load_split(f"{args.data}/train.pt")
    data_sha = train_sha(args.data)
    stage_params = {"model": model_cfg, "diffusion": asdict(dcfg), "train": asdict(tcfg)}
    with rank_zero_run("pretrain", cfg.raw, stage_params, rank) as run:
        run.set_tags({"fingerprint": run_fingerprint(model_cfg, asdict(dcfg), tcfg, data_sha)})
        t0 = time.time()
        result = train_from_scratch(model_cfg, asdict(dcfg), tcfg, images, data_sha, args.out, log_fn=run.log_metrics)
        seconds = time.time() - t0
        if rank != 0:
            return
        write_table(args.plot, *records_table(result["history"]))
        write_bin_curves(result["history"], args.bin_plots)
        metrics = {"final_loss": final_loss(result["history"]), "num_params": result["num_params"],
                   "images_seen": result["images_seen"], "train_seconds_this_run": seconds,
                   "resumed_from_step": result["resumed_from"] or 0}
        report_metrics(run, metrics, args.metrics, log)
        run.log_denoiser(Path(args.out) / "model.pt", "unified", metrics)
        run.log_artifact(args.plot)


def configure(parser) -> None:
    add_paths(parser, "data", out="models/unified", metrics="metrics/pretrain.json", plot=ARTIFACTS["history"],
              bin_plots="plots/loss_per_t_bin")


if __name__ == "__main__":
    run_stage("pretrain", main, configure)
