"""What every stage shares: the command line, one validation of params.yaml, clean error exits, metrics files.

A stage module is `main(args, cfg)` plus `configure(parser)` for its paths; `run_stage` parses the arguments,
loads and validates the whole params.yaml (so any invalid setting stops the first stage, before any work) and
turns project errors into one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Callable

from stepwise.config import Config, load_config
from stepwise.errors import StepwiseError
from stepwise.io import write_json
from stepwise.threads import stage_threads

log = logging.getLogger("stepwise")

# Default path of every pipeline artifact a stage reads or writes, for `python -m stages.<name>` by hand. dvc.yaml
# passes the same paths explicitly (tests/test_stages.py checks that they agree).
ARTIFACTS = {
    "data": "data/prepared",
    "featnet": "models/featnet.pt",
    "unified": "models/unified/model.pt",
    "checkpoints": "models/unified/checkpoints",
    "continued": "models/continued/model.pt",
    "experts": "models/experts",
    "pruned": "models/pruned",
    "history": "plots/pretrain_loss.csv",
    "profile": "outputs/profile",
    "groups": "outputs/groups.json",
    "unified_metrics": "metrics/evaluate.json",
    "tdc_metrics": "metrics/evaluate_tdc.json",
}


def add_paths(parser: argparse.ArgumentParser, *names: str, **defaults: str | None) -> None:
    """One --kebab-case option per path: `names` default to ARTIFACTS, keywords give the default (None: required)."""
    for name, default in [*((n, ARTIFACTS[n]) for n in names), *defaults.items()]:
        flag = "--" + name.replace("_", "-")
        if default is None:
            parser.add_argument(flag, required=True)
        else:
            parser.add_argument(flag, default=default, help="default: %(default)s")


def run_stage(name: str, body: Callable[[argparse.Namespace, Config], None],
              configure: Callable | None = None) -> None:
    """Entry point of `python -m stages.<name>`: parse args, validate params.yaml, run `body(args, cfg)`; project
    errors become one line + exit 2."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    if configure:
        configure(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.params)
        with stage_threads() as budget:  # a fair share of the cores among the stages running now
            log.info("torch threads: %d (%s)", budget.threads, budget.reason)
            body(args, cfg)
    except StepwiseError as e:
        print(f"stepwise {name}: error: {e}", file=sys.stderr)
        sys.exit(2)


def report_metrics(run, metrics: dict, path, logger: logging.Logger, exclude: tuple[str, ...] = ()) -> None:
    """Write the stage's DVC metrics file (atomically), log them (less `exclude`) to its MLflow run, print them."""
    write_json({k.replace("/", "."): v for k, v in metrics.items()}, path)
    run.log_metrics({k: v for k, v in metrics.items() if k not in exclude})
    logger.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})


def relaunch_under_torchrun(nproc: int, module: str) -> None:
    """If `nproc` > 1 and not already under torchrun, rerun this stage as `torchrun --nproc-per-node nproc -m module`
    with the same arguments and exit with its status."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           *sys.argv[1:]]
    log.info("data-parallel: %s", " ".join(cmd))
    sys.exit(subprocess.call(cmd))
