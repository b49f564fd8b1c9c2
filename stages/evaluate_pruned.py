"""DVC stage `evaluate_pruned`: pruned TDC ensemble vs unified model vs unpruned TDC ensemble (TDC, arXiv 2312.13307).

For each of the three: FID/KID/PR with the `sample`/`eval` settings of `evaluate` (same fixed noise), MACs per
generated sample summed over the sampling trajectory (step k costs the MACs of the model that owns t_k), and
wall-clock sampling throughput (images/s, same batch size, same device, interleaved repeats, fastest kept). The
unified and TDC scores are read from metrics/evaluate.json and metrics/evaluate_tdc.json when their stored samples
were drawn with the current sample settings and count, else recomputed here. The project's goal (>= 40 % fewer MACs
per sample than the unified model at an FID no worse, `stepwise.pruning.ensemble.pruned_ensemble_metrics`) is reported as
metrics `goal.*`, not asserted.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import load_samples, load_split_for, read_metrics, write_table
from stepwise.errors import ConfigError
from stepwise.evaluation import (delta_intervals, grid_title, inception_weights, sample, sample_and_save, scores,
                                 stored_scores, throughput)
from stepwise.featnet import load_featnet
from stepwise.sampling import timestep_subsequence
from stepwise.pruning.ensemble import (ENSEMBLES, GOAL_MACS_SAVING, GOAL_METRIC, load_pruned_router,
                                       pruned_ensemble_metrics, sampling_macs)
from stepwise.tdc import load_router
from stepwise.distributed import resolve_device
from stepwise.tracking import stage_run

from .common import add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.evaluate_pruned")


def main(args, cfg) -> None:
    scfg, ecfg = cfg.sample, cfg.eval
    pecfg = cfg.tdc.prune_eval
    if not ecfg.fid:
        raise ConfigError("eval.fid=false: evaluate_pruned needs FID for its goal check; set eval.fid=true")
    inception = inception_weights(ecfg)
    K = cfg.tdc.num_groups
    router, diffusion, shape, _, unified_meta = load_router(args.groups, args.experts, args.unified, K, scfg.use_ema)
    pruned, pruned_metas = load_pruned_router(args.pruned, args.experts, router, scfg.use_ema)
    test_images = load_split_for(args.unified, unified_meta, shape, args.data, "test")
    load_featnet(args.featnet)  # a missing or corrupt feature network fails here, before sampling
    for path in (args.unified_metrics, args.tdc_metrics):
        read_metrics(path, "dvc repro evaluate_tdc")
    ts = timestep_subsequence(diffusion.T, scfg.steps)  # (S,)
    per_step, pruned_macs, full = sampling_macs(router, pruned, pruned_metas, shape, ts)
    device = resolve_device("auto")
    with stage_run("evaluate_pruned", cfg.raw, {"sample": asdict(scfg), "eval": asdict(ecfg),
                                               "tdc": {"prune_eval": asdict(pecfg), "num_groups": K}}) as run:
        metrics = {"num_samples": ecfg.num_samples, "sampling_steps": len(ts)}
        images, seconds = sample_and_save(pruned, diffusion, shape, scfg, ecfg.num_samples, device, args.out,
                                          grid_title("pruned TDC ensemble", {}, scfg))
        found = {"pruned": scores(images, test_images, ecfg, args.featnet, inception, device)}
        metrics["pruned/sampling_seconds"] = seconds
        run.log_artifact(Path(args.out) / "grid.png", "pruned")
        stored = {"unified": (args.unified_samples, args.unified_metrics, ""),
                  "tdc": (args.tdc_samples, args.tdc_metrics, "tdc.")}
        drawn = {"pruned": images}
        for name, model in (("unified", router.fallback), ("tdc", router)):
            reused = stored_scores(*stored[name], scfg, ecfg.num_samples, GOAL_METRIC)
            metrics[f"{name}/scores_reused"] = float(reused is not None)
            if reused is None:
                log.info("%s: stored scores were drawn with other sample settings: sampling again", name)
                drawn[name] = sample(model, diffusion, shape, scfg, ecfg.num_samples, device)
                reused = scores(drawn[name], test_images, ecfg, args.featnet, inception, device)
            else:
                drawn[name] = load_samples(stored[name][0], scfg)
            found[name] = {k: v for k, v in reused.items() if k in found["pruned"]}
        metrics.update(delta_intervals(drawn, test_images, "pruned", ("unified", "tdc"), ecfg, args.featnet, device))
        speed = throughput(dict(zip(ENSEMBLES, (router.fallback, router, pruned))), diffusion, shape, scfg,
                           pecfg.throughput_samples, pecfg.throughput_repeats, device)
        metrics.update(pruned_ensemble_metrics(found, per_step, speed, pruned_macs, pruned_metas, full,
                                               pruned.expert_index(ts).tolist()))
        write_table(args.trajectory, ["step", "t", *per_step],
                    [[k, t, *(v[k] for v in per_step.values())] for k, t in enumerate(ts.tolist())])
        report_metrics(run, metrics, args.metrics, log)
        run.log_artifact(args.trajectory)
        log.info("goal: MACs saving vs unified %.3f (target >= %.2f), %s delta %+.4g -> %s",
                 metrics["goal/macs_saving_vs_unified"], GOAL_MACS_SAVING, GOAL_METRIC, metrics["goal/fid_delta"],
                 "met" if metrics["goal/met"] else "not met")


def configure(parser) -> None:
    add_paths(parser, "data", "groups", "experts", "pruned", "unified", "featnet", "unified_metrics", "tdc_metrics",
              unified_samples="samples/unified/samples.pt", tdc_samples="samples/tdc/samples.pt", out="samples/pruned",
              trajectory="plots/prune_macs_trajectory.csv", metrics="metrics/evaluate_pruned.json")


if __name__ == "__main__":
    run_stage("evaluate_pruned", main, configure)
