"""MLflow tracking of pipeline runs: one parent run per pipeline version, one nested run per stage.

Parent identity. A pipeline run is keyed by its name (`$STEPWISE_PIPELINE_RUN`, else the DVC experiment name
`$DVC_EXP_NAME`, else "workspace") and its version: the git commit and the composed params. Every stage of one
`dvc repro` / `dvc exp run` of that version, a resumed or partial one too, lands under the same parent; a new commit
or new params start a new parent. Nothing depends on which stage runs last.

Parent status: RUNNING while one of its stages runs, FINISHED when none does, FAILED after a failed stage (a rerun
joins it again). A stage killed by SIGTERM/SIGINT marks its run KILLED; a stage run left RUNNING by SIGKILL (its
process is gone) is marked KILLED by the next stage run of the same stage, so the parent can finish.

The tracking URI is `$MLFLOW_TRACKING_URI`, else SQLite at `<repo root>/mlflow.db` with artifacts in
`<repo root>/mlartifacts`; the repo root is `$DVC_ROOT` when DVC runs the stage (also inside `dvc exp run --temp`),
else the current directory. MLflow is imported only when a run is opened.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from .errors import StepwiseError

log = logging.getLogger(__name__)
EXPERIMENT = "stepwise"
PIPELINE_TAG = "stepwise.pipeline"  # the pipeline run's name
VERSION_TAG = "stepwise.version"  # hash of (git commit, params)
PID_TAG, HOST_TAG = "stepwise.pid", "stepwise.host"  # who runs a stage run (to detect runs orphaned by SIGKILL)
FLOW_RUN_TAG = "stepwise.stage_flow_run"  # the distributed flow run that ran it (flows/distributed.py)
URI_SCHEMES = ("sqlite:", "file:", "http:", "https:", "postgresql", "mysql", "mssql", "databricks")


def repo_root() -> Path:
    """$DVC_ROOT when set by DVC, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an absolute SQLite URI under the repo root; StepwiseError for a URI with no scheme."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{repo_root() / 'mlflow.db'}"
    if not uri.startswith(URI_SCHEMES):
        raise StepwiseError(f"MLFLOW_TRACKING_URI={uri!r} has no scheme: use e.g. sqlite:////abs/path/mlflow.db or "
                            "http://127.0.0.1:5000, or unset it for the local SQLite store")
    return uri


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


def pipeline_key() -> str:
    return os.environ.get("STEPWISE_PIPELINE_RUN") or os.environ.get("DVC_EXP_NAME") or "workspace"


def pipeline_version(params: dict, sha: str) -> str:
    """Identity of a pipeline version: the git commit and the composed params."""
    blob = json.dumps([sha, params], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Tracker:
    """The stage's MLflow run: metrics with steps, params, tags, artifacts; and the pipeline's parent run, which
    carries the headline metrics so that `mlflow ui`'s table compares pipeline runs and strategies directly."""

    def __init__(self, mlflow, run_id: str, parent_id: str | None = None, version: str = ""):
        self.mlflow, self.run_id, self.parent_id, self.version = mlflow, run_id, parent_id, version

    def log_parent_metrics(self, metrics: dict) -> None:
        """Log `metrics` (no step) on the pipeline's parent run."""
        from mlflow.entities import Metric

        if self.parent_id is None:
            return
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("/", "."), float(v), now, 0) for k, v in metrics.items()]
        client = self.mlflow.MlflowClient()
        for i in range(0, len(batch), 1000):
            client.log_batch(self.parent_id, metrics=batch[i:i + 1000])

    def log_denoiser(self, model_file, name: str, metrics: dict | None = None) -> str | None:
        """Log a trained denoiser's model file as an MLflow model named `name` (the UI's model view), linked to
        `metrics`; returns its model id. Load it back with `stepwise.mlflow_model.load_logged_denoiser`."""
        import warnings

        code = Path(__file__).with_name("mlflow_model.py")
        with warnings.catch_warnings():  # "add type hints to predict": its input is a plain dict of options
            warnings.simplefilter("ignore", UserWarning)
            info = self.mlflow.pyfunc.log_model(name=name, python_model=str(code),
                                                artifacts={"model_file": str(model_file)},
                                                pip_requirements=["stepwise", "torch"])
        model_id = getattr(info, "model_id", None)
        if metrics and model_id:
            self.mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()}, model_id=model_id)
        return model_id

    def set_parent_tags(self, tags: dict) -> None:
        if self.parent_id is not None:
            client = self.mlflow.MlflowClient()
            for k, v in tags.items():
                client.set_tag(self.parent_id, k, str(v)[:5000])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: dict) -> None:
        self.mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            (self.mlflow.log_artifacts if Path(path).is_dir() else self.mlflow.log_artifact)(str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        self.mlflow.set_tags(tags)


class NullTracker:
    """What non-zero ranks of a data-parallel stage log with: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _probe(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when a remote tracking server does not answer its /health endpoint."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise StepwiseError(f"MLflow tracking server {uri} is unreachable ({e}); start it, fix MLFLOW_TRACKING_URI, "
                            "or unset it to use the local SQLite store") from None


def connect():
    """Import MLflow, point it at the tracking URI and the experiment: (mlflow, experiment id)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in stage logs
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


def parent_run(mlflow, exp_id: str, params: dict) -> str:
    """The parent run of this pipeline version, set RUNNING; created on first use."""
    key, sha = pipeline_key(), git_sha()
    version = pipeline_version(params, sha)
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`{VERSION_TAG}` = '{version}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        if found[0].info.status != "RUNNING":
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {PIPELINE_TAG: key, VERSION_TAG: version, "git_sha": sha, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "prefect_flow_run_id": os.environ.get("STEPWISE_PREFECT_FLOW_RUN", "")}
    run = client.create_run(exp_id, run_name=f"pipeline:{key}", tags=tags)
    for k, v in flatten(params).items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    return run.info.run_id


def _alive(pid: str, host: str) -> bool:
    """Whether process `pid` on `host` may still run (unknown hosts count as alive)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def close_orphans(client, exp_id: str, parent: str, stage: str) -> int:
    """Mark KILLED the RUNNING runs of `stage` under `parent` whose process is gone (SIGKILL); their number."""
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and tags.dvc_stage = '{stage}' "
                                        "and attributes.status = 'RUNNING'")
    closed, flow_run = 0, os.environ.get("STEPWISE_STAGE_FLOW_RUN", "")
    for r in runs:
        other_flow_run = bool(flow_run) and r.data.tags.get(FLOW_RUN_TAG, "") not in ("", flow_run)
        # a distributed stage is dispatched again only after its earlier flow run was marked Crashed
        if other_flow_run or not _alive(r.data.tags.get(PID_TAG, ""), r.data.tags.get(HOST_TAG, "")):
            client.set_terminated(r.info.run_id, "KILLED")
            closed += 1
            log.warning("MLflow run %s of stage %s was left RUNNING by a killed process: marked KILLED",
                        r.info.run_id, stage)
    return closed


def _finish_parent(client, exp_id: str, parent: str) -> None:
    running = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'",
                                 max_results=1)
    if not running:  # stages fanned out in parallel: the last one to finish marks the parent
        client.set_terminated(parent, "FINISHED")


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that runs are closed and temp files removed."""


@contextmanager
def _sigterm_raises():
    def handler(signum, frame):
        raise _Terminated(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stage_run(stage: str, params: dict, stage_params: dict):
    """This stage's nested MLflow run under the pipeline's parent: FINISHED on success, FAILED on an error, KILLED
    on SIGTERM/SIGINT (then the process exits 143/130)."""
    mlflow, exp_id = connect()
    parent = parent_run(mlflow, exp_id, params)
    client = mlflow.MlflowClient()
    dvc_stage = os.environ.get("DVC_STAGE", stage)
    close_orphans(client, exp_id, parent, dvc_stage)
    tags = {"git_sha": git_sha(), "dvc_stage": dvc_stage, "stage": stage,
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), PID_TAG: str(os.getpid()),
            HOST_TAG: socket.gethostname(), "stepwise.worker": os.environ.get("STEPWISE_WORKER", ""),
            FLOW_RUN_TAG: os.environ.get("STEPWISE_STAGE_FLOW_RUN", "")}
    with _sigterm_raises(), mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent,
                                             tags=tags) as run:
        tracker = Tracker(mlflow, run.info.run_id, parent, pipeline_version(params, git_sha()))
        tracker.log_params(stage_params)
        try:
            yield tracker
        except (KeyboardInterrupt, _Terminated) as e:
            mlflow.end_run("KILLED")
            client.set_terminated(parent, "KILLED")
            raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else 143) from None
        except BaseException:
            mlflow.end_run("FAILED")
            client.set_terminated(parent, "FAILED")
            raise
    _finish_parent(client, exp_id, parent)


@contextmanager
def rank_zero_run(stage: str, params: dict, stage_params: dict, rank: int):
    """stage_run on rank 0; a tracker that logs nothing on the other ranks."""
    if rank == 0:
        with stage_run(stage, params, stage_params) as tracker:
            yield tracker
    else:
        yield NullTracker()
