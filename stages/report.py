"""DVC stage `report`: the pipeline's outputs -> reports/pipeline.md, a self-contained reports/pipeline.html and the
headline metrics as `dvc metrics show` tables (reports/tables/{models,claims}/<row>.json).

What a researcher sees: dataset card, sample grids with FID and interval, loss per t-bin, difficulty profile and
groups, consistency curves, pruning trade-off and a verdict per claim (stepwise/report.py). A stage that was not
run gives a "not run" note; a missing required input stops with the file and the stage that writes it.
"""
from __future__ import annotations

import logging

from stepwise.report import INPUTS, build_report, write_metric_tables, write_report
from stepwise.tracking import stage_run

from .common import add_paths, run_stage

log = logging.getLogger("stepwise.report")


def main(args, cfg) -> None:
    paths = {name: getattr(args, name) for name in INPUTS}
    report = build_report(cfg.diffusion.T, paths=paths)  # every input is read and checked before the run opens
    with stage_run("report", cfg.raw, {"diffusion": {"T": cfg.diffusion.T}}) as run:
        write_report(report, args.md, args.html)
        write_metric_tables(report, args.tables)  # `dvc metrics show reports/tables/models` (README)
        run.log_metrics(report.metrics)
        run.log_parent_metrics(report.metrics)  # the headline metrics on the pipeline's parent run
        verdicts = {f"verdict.{name}": v for name, v in report.verdicts.items()}
        run.set_tags(verdicts)
        run.set_parent_tags(verdicts)
        run.log_artifact(args.md)
        run.log_artifact(args.html)
    for name, v in report.verdicts.items():
        log.info("verdict %s: %s", name, v)
    log.info("report -> %s, %s", args.md, args.html)


def configure(parser) -> None:
    add_paths(parser, **{name: default for name, (default, _, _) in INPUTS.items()},
              md="reports/pipeline.md", html="reports/pipeline.html", tables="reports/tables")


if __name__ == "__main__":
    run_stage("report", main, configure)
