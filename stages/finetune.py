"""DVC stages `finetune@i` and `continue_unified`: TDC stage-2 experts and their compute-matched baseline.

`--group i` fine-tunes expert i (TDC, arXiv 2312.13307, stage 2): a copy of the unified model (its raw weights, or
its EMA weights with tdc.finetune.init=ema) trained only on timesteps of group i's [lo, hi) from groups.json, with
the timestep sampler of the `train` section (overridable in tdc.finetune.train) restricted to that range.
`--continue-unified` is the baseline: the same copy trained on all of [0, T) for num_groups x tdc.finetune.steps
steps at the same batch size, i.e. exactly as many images as all experts together.

Both are resumable from their own checkpoints (a persistent DVC output) and record images seen, training FLOPs and
the smallest/largest timestep the sampler emitted (`stepwise.tdc.run_finetune`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from stepwise.artifacts import load_groups, load_model_file
from stepwise.errors import ConfigError
from stepwise.seeding import run_seed
from stepwise.tdc import finetune_job, finetune_params, run_finetune
from stepwise.tracking import stage_run

from .common import add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.finetune")


def main(args, cfg) -> None:
    fcfg, K = cfg.tdc.finetune, cfg.tdc.num_groups
    T = int(load_model_file(args.unified)["diffusion"]["T"])
    if args.continue_unified:
        stage, group, t_range, steps = "continue_unified", -1, (0, T), K * fcfg.steps
    else:
        if not 0 <= args.group < K:
            raise ConfigError(f"--group {args.group} is not a group index: tdc.num_groups={K}")
        stage, group, steps = f"finetune@{args.group}", args.group, fcfg.steps
        t_range = load_groups(args.groups, K, T)[group]
    tcfg = fcfg.train_config(cfg.train, seed=run_seed(fcfg.seed, group), steps=steps)
    job = finetune_job(args.unified, args.data, tcfg, group, t_range, fcfg.init, fcfg.ema_start)
    with stage_run(stage, cfg.raw, finetune_params(job, fcfg, K)) as run:
        run.set_tags(job.tags)
        metrics = run_finetune(job, args.out, stage, run.log_metrics)
        report_metrics(run, metrics, args.metrics, log, exclude=("group", "lo", "hi"))
        run.log_denoiser(Path(args.out) / "model.pt", "continued" if group < 0 else f"expert_{group}", metrics)
        log.info("%s: t in [%d, %d) (seen [%d, %d]), %d images, %.3g training FLOPs", stage, *t_range,
                 metrics["t_min"], metrics["t_max"], metrics["images_seen"], metrics["train_flops"])


def configure(parser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--group", type=int, help="fine-tune the expert of this group index")
    mode.add_argument("--continue-unified", action="store_true",
                      help="train the unified model on all t for num_groups x steps (compute-matched baseline)")
    add_paths(parser, "data", "unified", "groups", metrics=None)
    parser.add_argument("--out", required=True, help="e.g. models/experts/0 or models/continued")


if __name__ == "__main__":
    run_stage("finetune", main, configure)
