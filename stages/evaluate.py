"""DVC stage `evaluate`: sample with fixed seeded noise, save a grid, and score FID/KID/PR against the test split,
beside the real-vs-real FID floor at the same sample count (`fid_featnet_floor`).

With eval.curve_samples > 0 it also scores the EMA weights of every kept training checkpoint (the FID-vs-iterations
curve, `stepwise.fidelity.fid_curve`) that the strategy comparison reads.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import load_model, load_split_for, write_table
from stepwise.evaluation import (featnet_fid_floor, floor_subset, grid_title, inception_weights, sample_and_save,
                                 scores)
from stepwise.featnet import load_featnet
from stepwise.data import sha256
from stepwise.fidelity import fid_curve
from stepwise.ledger import write_summary, yardstick
from stepwise.distributed import resolve_device
from stepwise.tracking import stage_run

from .common import ARTIFACTS, add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.evaluate")


def main(args, cfg) -> None:
    scfg, ecfg = cfg.sample, cfg.eval
    inception = inception_weights(ecfg)
    model, diffusion, shape, meta = load_model(args.model, use_ema=scfg.use_ema)
    test_images = load_split_for(args.model, meta, shape, args.data, "test")
    train_images = load_split_for(args.model, meta, shape, args.data, "train")
    subset = floor_subset(len(train_images), ecfg)  # too few train images fails here, before sampling
    load_featnet(args.featnet)  # a missing or corrupt feature network fails here, before sampling
    device = resolve_device("auto")
    with stage_run("evaluate", cfg.raw, {"sample": asdict(scfg), "eval": asdict(ecfg)}) as run:
        images, seconds = sample_and_save(model, diffusion, shape, scfg, ecfg.num_samples, device, args.out,
                                          grid_title("unified", meta, scfg))
        metrics = scores(images, test_images, ecfg, args.featnet, inception, device)
        metrics.update({"num_samples": ecfg.num_samples, "sampling_seconds": seconds,
                        "samples_per_second": ecfg.num_samples / seconds,
                        "fid_featnet_floor": featnet_fid_floor(train_images, test_images, subset, args.featnet,
                                                               device)})
        curve = fid_curve(model, diffusion, shape, test_images, args.featnet, args.checkpoints, ecfg.curve_samples,
                          device=device, kid=ecfg.kid, kid_subset_size=ecfg.kid_subset_size, sampler=scfg.sampler,
                          steps=scfg.steps, eta=scfg.eta, seed=scfg.seed, batch_size=scfg.batch_size,
                          n_boot=ecfg.bootstrap) if ecfg.curve_samples else []
        write_table(args.curve, ["step", "fid_featnet", "kid_featnet"],
                    [[r["step"], r["fid_featnet"], r.get("kid_featnet")] for r in curve])
        for r in curve:
            run.log_metrics({"curve_fid_featnet": r["fid_featnet"]}, step=r["step"])
        if curve:  # the comparison's yardstick, and a run summary under reports/runs that survives the machine
            ys = yardstick(sha256(args.featnet), ecfg.curve_samples, scfg)
            run.set_tags({"stepwise.yardstick": json.dumps(ys, sort_keys=True)})
            path = write_summary(strategy=cfg.comparison.strategy, seed=cfg.train.seed, ys=ys, version=run.version,
                                 experiment=os.environ.get("DVC_EXP_NAME", ""), settings=cfg.raw,
                                 curve=[{"step": r["step"], "fid": r["fid_featnet"],
                                         "fid_replicates": r.get("fid_replicates", [])} for r in curve])
            log.info("run summary: %s (commit it: reports/runs builds up the strategy comparison)", path)
        report_metrics(run, metrics, args.metrics, log)
        run.log_parent_metrics({f"unified/{k}": v for k, v in metrics.items()})  # compare pipeline runs at a glance
        run.log_artifact(Path(args.out) / "grid.png")


def configure(parser) -> None:
    add_paths(parser, "data", "featnet", "checkpoints", model=ARTIFACTS["unified"], out="samples/unified",
              metrics=ARTIFACTS["unified_metrics"], curve="plots/fid_curve.csv")


if __name__ == "__main__":
    run_stage("evaluate", main, configure)
