"""What every stage shares: reading params.yaml, the MLflow parent/child runs, tags, and clean error exits.

MLflow layout: one parent run per pipeline run, one nested run per stage. The parent is found again by its
`stepwise.pipeline` tag (the DVC experiment name, else "workspace") until the last stage of dvc.yaml marks it
complete, so every stage of one `dvc repro` or `dvc exp run` (also a partial one, e.g. `dvc exp run evaluate`) lands
under it. The parent is RUNNING while one of its stages runs, FINISHED between stages and at the end, FAILED after a
failed stage (a rerun joins it again). The tracking URI is `$MLFLOW_TRACKING_URI`, else SQLite at
`<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts`; the repo root is `$DVC_ROOT` when DVC runs the
stage (also inside `dvc exp run --temp`), else this checkout.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import yaml

from stepwise.errors import StepwiseError

log = logging.getLogger("stepwise")
REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "stepwise"
PIPELINE_TAG = "stepwise.pipeline"
COMPLETE_TAG = "stepwise.complete"  # "1" once the last stage of dvc.yaml has run


def repo_root() -> Path:
    """$DVC_ROOT when set by DVC, else the checkout holding this file."""
    return Path(os.environ.get("DVC_ROOT") or REPO_ROOT).resolve()


def final_stage() -> str:
    """The name of the last stage in dvc.yaml (the one that closes the pipeline's parent run)."""
    path = repo_root() / "dvc.yaml"
    stages = list((yaml.safe_load(path.read_text()) or {}).get("stages", {})) if path.is_file() else []
    return stages[-1] if stages else ""


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an absolute SQLite URI under the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    """The composed params.yaml as a dict; StepwiseError if missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise StepwiseError(f"{path}: not found; run `python -m stages.compose` to write it from conf/")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise StepwiseError(f"{path}: expected a mapping of config sections, found {type(params).__name__}")
    return params


def section(params: dict, *keys: str) -> dict:
    """params[k1][k2]...; StepwiseError naming the missing key."""
    node = params
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise StepwiseError(f"params.yaml has no '{'.'.join(keys[: i + 1])}' section; recompose it from conf/")
        node = node[key]
    return node


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class Tracker:
    """The stage's MLflow child run: metrics with steps, params, artifacts."""

    def __init__(self, mlflow, run_id: str):
        self.mlflow, self.run_id = mlflow, run_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: dict) -> None:
        self.mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            (self.mlflow.log_artifacts if Path(path).is_dir() else self.mlflow.log_artifact)(str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        self.mlflow.set_tags(tags)


def _probe(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when a remote tracking server does not answer its /health endpoint."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise StepwiseError(f"MLflow tracking server {uri} is unreachable ({e}); start it, fix MLFLOW_TRACKING_URI, "
                            "or unset it to use the local SQLite store") from None


def _connect():
    """Import MLflow, point it at the tracking URI and the experiment; StepwiseError if the store is unreachable."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _probe(uri)
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            location = (repo_root() / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
            exp_id = mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        else:
            exp_id = exp.experiment_id
    except Exception as e:
        raise StepwiseError(f"MLflow tracking store {uri} is unreachable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); fix MLFLOW_TRACKING_URI or unset it to use the local "
                            f"SQLite store") from None
    return mlflow, exp_id


def _parent_run(mlflow, exp_id: str, params: dict) -> str:
    """The parent run of this pipeline run (incomplete, same key), set RUNNING; created on first use."""
    key = os.environ.get("STEPWISE_PIPELINE_RUN") or os.environ.get("DVC_EXP_NAME") or "workspace"
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`{COMPLETE_TAG}` = '0'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        if found[0].info.status != "RUNNING":
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {PIPELINE_TAG: key, COMPLETE_TAG: "0", "git_sha": git_sha(),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "prefect_flow_run_id": os.environ.get("STEPWISE_PREFECT_FLOW_RUN", "")}
    run = client.create_run(exp_id, run_name=f"pipeline:{key}", tags=tags)
    for k, v in flatten(params).items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: dict, stage_params: dict):
    """Open this stage's nested MLflow run under the pipeline's parent; FAILED on error, FINISHED otherwise."""
    mlflow, exp_id = _connect()
    parent = _parent_run(mlflow, exp_id, params)
    tags = {"git_sha": git_sha(), "dvc_stage": os.environ.get("DVC_STAGE", stage), "stage": stage,
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent, tags=tags) as run:
        tracker = Tracker(mlflow, run.info.run_id)
        tracker.log_params(stage_params)
        try:
            yield tracker
        except BaseException:
            mlflow.end_run("FAILED")
            mlflow.MlflowClient().set_terminated(parent, "FAILED")
            raise
    client = mlflow.MlflowClient()
    if os.environ.get("DVC_STAGE", stage).split("@")[0] == final_stage():
        client.set_tag(parent, COMPLETE_TAG, "1")
    running = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'",
                                 max_results=1)
    if not running:  # stages fanned out in parallel: the last one to finish marks the parent
        client.set_terminated(parent, "FINISHED")


def run_stage(name: str, body: Callable[[argparse.Namespace], None], configure: Callable | None = None) -> None:
    """Entry point of `python -m stages.<name>`: parse args, run `body`, turn project errors into one line + exit 2."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    if configure:
        configure(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        body(args)
    except StepwiseError as e:
        print(f"stepwise {name}: error: {e}", file=sys.stderr)
        sys.exit(2)


def write_metrics(metrics: dict, path) -> None:
    """DVC metrics JSON, atomically."""
    from stepwise.io import write_json

    write_json({k.replace("/", "."): v for k, v in metrics.items()}, path)


def report_metrics(run, metrics: dict, path, logger: logging.Logger, exclude: tuple[str, ...] = ()) -> None:
    """Write the stage's DVC metrics file, log them (less `exclude`) to its MLflow run, and print them rounded."""
    write_metrics(metrics, path)
    run.log_metrics({k: v for k, v in metrics.items() if k not in exclude})
    logger.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})


# Default path of every pipeline artifact a stage reads or writes (dvc.yaml passes the same paths explicitly; the
# defaults serve `python -m stages.<name>` by hand).
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



class _NullTracker:
    """What non-zero ranks of a data-parallel stage log with: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextmanager
def rank_zero_run(stage: str, params: dict, stage_params: dict, rank: int):
    """stage_run on rank 0; a tracker that logs nothing on the other ranks."""
    if rank == 0:
        with stage_run(stage, params, stage_params) as tracker:
            yield tracker
    else:
        yield _NullTracker()


def relaunch_under_torchrun(nproc: int, module: str) -> None:
    """If `nproc` > 1 and not already under torchrun, rerun this stage as `torchrun --nproc-per-node nproc -m module`
    with the same arguments and exit with its status."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           *sys.argv[1:]]
    log.info("data-parallel: %s", " ".join(cmd))
    sys.exit(subprocess.call(cmd))
