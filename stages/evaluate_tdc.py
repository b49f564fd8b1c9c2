"""DVC stage `evaluate_tdc`: FID/KID/PR of the TDC expert ensemble and of the compute-matched unified baseline.

The ensemble is a `stepwise.router.ExpertRouter` (TDC, arXiv 2312.13307): expert i denoises t in group i's [lo, hi)
of groups.json, the unified model is the fallback. Both it and `models/continued` (the unified model trained on for
as many images as all experts together) are sampled exactly as `evaluate` samples the unified model (same `sample`
params, hence the same x_T and per-step noise) and scored against the test split; the unified model's scores are
read from metrics/evaluate.json, so all three are comparable.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import load_model, load_samples, load_split_for, read_metrics
from stepwise.errors import ConfigError
from stepwise.evaluation import (delta_intervals, grid_title, inception_weights, sample_and_save, score_deltas,
                                 scores)
from stepwise.tdc import compute_accounting, expert_coverage, load_router
from stepwise.distributed import resolve_device
from stepwise.tracking import stage_run

from .common import ARTIFACTS, add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.evaluate_tdc")


def main(args, cfg) -> None:
    scfg, ecfg = cfg.sample, cfg.eval
    inception = inception_weights(ecfg)
    router, diffusion, shape, expert_metas, unified_meta = load_router(
        args.groups, args.experts, args.unified, cfg.tdc.num_groups, scfg.use_ema)
    continued, _, cshape, continued_meta = load_model(args.continued, scfg.use_ema)
    if tuple(cshape) != tuple(shape):
        raise ConfigError(f"{args.continued} has image shape {cshape}, the unified model {shape}: "
                          f"rerun `dvc repro continue_unified`")
    unified_metrics = read_metrics(args.unified_metrics, "dvc repro evaluate")
    test_images = load_split_for(args.unified, unified_meta, shape, args.data, "test")
    unified_images = load_samples(args.unified_samples, scfg)  # (N, C, H, W) uint8, drawn with the same noise
    device = resolve_device("auto")
    with stage_run("evaluate_tdc", cfg.raw, {"sample": asdict(scfg), "eval": asdict(ecfg)}) as run:
        metrics = {"expert_coverage": expert_coverage(router, diffusion.T), "num_samples": ecfg.num_samples}
        found, drawn = {}, {"unified": unified_images}
        titles = {"tdc": grid_title(f"TDC ensemble of {cfg.tdc.num_groups} experts", {}, scfg),
                  "continued": grid_title("continued unified", continued_meta, scfg)}
        for name, model, out in (("tdc", router, args.out_tdc), ("continued", continued, args.out_continued)):
            images, seconds = sample_and_save(model, diffusion, shape, scfg, ecfg.num_samples, device, out,
                                              titles[name])
            drawn[name] = images
            found[name] = scores(images, test_images, ecfg, args.featnet, inception, device)
            metrics[f"{name}/sampling_seconds"] = seconds
            run.log_artifact(Path(out) / "grid.png", name)
        found["unified"] = {k: v for k, v in unified_metrics.items() if k in found["tdc"]}
        for name, values in found.items():
            metrics.update({f"{name}/{k}": v for k, v in values.items()})
        metrics.update(score_deltas(found, "tdc", ("unified", "continued")))
        metrics.update(delta_intervals(drawn, test_images, "tdc", ("unified", "continued"), ecfg, args.featnet,
                                       device))
        metrics.update(compute_accounting(unified_meta, expert_metas, continued_meta))
        if not metrics["compute/matched"]:
            log.warning("compute not matched: experts saw %d images, the continued unified model %d",
                        metrics["compute/tdc_finetune_images"], metrics["compute/continued_images"])
        report_metrics(run, metrics, args.metrics, log)


def configure(parser) -> None:
    add_paths(parser, "data", "groups", "experts", "unified", "continued", "featnet", "unified_metrics",
              out_tdc="samples/tdc", out_continued="samples/continued", metrics=ARTIFACTS["tdc_metrics"],
              unified_samples="samples/unified/samples.pt")


if __name__ == "__main__":
    run_stage("evaluate_tdc", main, configure)
