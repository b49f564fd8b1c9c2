"""DVC stage `prune@i`: TDC proxy-based multi-round pruning of expert i to its progressive MACs budget (arXiv 2312.13307).

The procedure (budget, proxy search with a persistent memory bank, rebuild of the best candidate, fine-tune on
[lo, hi), the pruned model file) is `stepwise.pruning.expert`; this stage reads params, runs it for one group and
writes the search curve (CSV + plot) and metrics. Resumable: a rerun redoes no finished round and resumes the
fine-tune.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import load_groups, load_model_file, write_table
from stepwise.errors import ConfigError
from stepwise.pruning.expert import prune_expert, prune_job, search_curve
from stepwise.seeding import run_seed
from stepwise.tdc import expert_path
from stepwise.tracking import stage_run
from stepwise.visualise import plot_search

from .common import add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.prune")


def main(args, cfg) -> None:
    pcfg, K = cfg.tdc.prune, cfg.tdc.num_groups
    T = int(load_model_file(args.unified)["diffusion"]["T"])
    group = args.group
    if not 0 <= group < K:
        raise ConfigError(f"--group {group} is not a group index: tdc.num_groups={K}")
    lo, hi = load_groups(args.groups, K, T)[group]
    tcfg = pcfg.train_config(cfg.train, seed=run_seed(pcfg.seed, group))
    job = prune_job(pcfg, tcfg, group, (lo, hi), K, args.unified, expert_path(args.experts, group), args.data)
    budget, full = job.budget, job.full_macs
    stage = f"prune@{group}"
    stage_params = {"tdc": {"prune": asdict(pcfg), "num_groups": K}, "train_effective": asdict(tcfg),
                    "group": {"index": group, "lo": lo, "hi": hi},
                    "budget": {"macs": budget, "full_macs": full, "fraction": budget / full}}
    with stage_run(stage, cfg.raw, stage_params) as run:
        run.set_tags({"tdc.group": str(group), "tdc.t_range": f"[{lo}, {hi})", "tdc.role": "pruned_expert",
                      "prune.search_fingerprint": job.identity["fingerprint"]})
        metrics, rounds = prune_expert(job, args.out, stage, run.log_metrics)
        write_table(args.curve, *search_curve(rounds, full))
        plot_search(rounds, budget, full, f"pruned expert {group} (t in [{lo}, {hi})): budget {budget / full:.3f} x "
                    "the full model's MACs" + ("" if rounds else " = the full model: kept, not searched"), args.curve_png)
        report_metrics(run, metrics, args.metrics, log, exclude=("group", "lo", "hi"))
        for path in (Path(args.out) / "bank.json", args.curve, args.curve_png):
            run.log_artifact(path)
        run.log_denoiser(Path(args.out) / "model.pt", f"pruned_expert_{group}", metrics)
        log.info("%s: %.4g MACs (%.3f F, budget %.3f F), %d params (%.3f), best round %s of %d", stage,
                 metrics["macs"], metrics["macs_fraction"], metrics["budget_fraction"], metrics["params"],
                 metrics["params_fraction"], metrics["best_round"], metrics["rounds"])


def configure(parser) -> None:
    parser.add_argument("--group", type=int, required=True, help="prune the expert of this group index")
    add_paths(parser, "data", "unified", "experts", "groups", metrics=None)
    parser.add_argument("--out", required=True, help="e.g. models/pruned/0 (model.pt, bank.json, search.json, "
                                                     "checkpoints/)")
    parser.add_argument("--curve", required=True, help="search curve CSV, e.g. plots/prune_search/0.csv")
    parser.add_argument("--curve-png", required=True, help="search curve plot, e.g. plots/prune_search/0.png")


if __name__ == "__main__":
    run_stage("prune", main, configure)
