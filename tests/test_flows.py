"""Prefect orchestration (flows/): the pipeline flow against a temporary Prefect API, and prefect.yaml validation.

One `prefect_test_harness` serves the whole session (starting it is the slow part). Stage commands are real: the
end-to-end tests run the repo's DVC stages on the `experiment=ci` preset; retries and fan-out use tiny DVC repos.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, pipeline_copy

from flows.deploy_check import PROCESS_JOB_VARIABLES, DeploymentConfigError, check_prefect_yaml

# ------------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API (SQLite) for every flow test in the session; yields a sync client."""
    from prefect.client.orchestration import get_client
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90}):
        with prefect_test_harness(server_startup_timeout=90):
            with get_client(sync_client=True) as client:
                yield client


def _git_dvc_repo(path: Path, dvc_yaml: str, files: dict[str, str]) -> Path:
    """A fresh git+DVC repo with this dvc.yaml and these files, committed."""
    path.mkdir(parents=True)
    for name, text in {"dvc.yaml": dvc_yaml, **files}.items():
        (path / name).write_text(textwrap.dedent(text))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=path, check=True, env=env, capture_output=True)
    return path


def _flow_run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def _task_runs(client, flow_run_id: str) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                 sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return {r.name: r for r in runs}


def _summary_artifact(client, flow_run_id: str):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    from flows.pipeline import SUMMARY_ARTIFACT_KEY

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT_KEY])))
    assert len(found) == 1, f"expected one summary artifact for flow run {flow_run_id}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------- end to end, real stages

def test_flow_runs_real_stages_end_to_end(tmp_path, prefect_api):
    """`featnet` with upstream=True runs prepare then featnet through DVC; outputs, dvc.lock, MLflow parent/child
    runs keyed by the flow run id, and the summary artifact all exist; a second flow run finds both up to date."""
    import mlflow

    from flows.pipeline import pipeline

    repo = pipeline_copy(tmp_path / "repo", ["experiment=ci"])
    state = pipeline(repo=str(repo), stages=["featnet"], upstream=True, retries=0, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    run_id = _flow_run_id(state)
    assert summary["flow_run_id"] == run_id
    assert {k: v["status"] for k, v in summary["stages"].items()} == {"prepare": "ran", "featnet": "ran"}
    for out in ("data/prepared/train.pt", "data/prepared/card.json", "models/featnet.pt", "metrics/featnet.json"):
        assert (repo / out).exists(), out
    assert not (repo / "models/unified/model.pt").exists()  # pretrain was not selected
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "featnet"}
    acc = json.loads((repo / "metrics/featnet.json").read_text())["featnet_test_accuracy"]
    assert summary["metrics"]["metrics/featnet.json"]["featnet_test_accuracy"] == acc

    artifact = _summary_artifact(prefect_api, run_id)
    assert artifact.type == "markdown"
    assert "| featnet |" in artifact.data and "featnet_test_accuracy" in artifact.data

    # both stages' MLflow runs hang under one parent keyed (and tagged) by this flow run's id
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("stepwise")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stepwise.pipeline") == run_id]
    assert len(parents) == 1
    assert parents[0].data.tags.get("prefect_flow_run_id") == run_id
    children = {r.data.tags.get("stage"): r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert set(children) == {"prepare", "featnet"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parents[0].info.run_id}

    # Prefect caches nothing: a second run asks DVC again, and DVC says nothing changed
    again = pipeline(repo=str(repo), stages=["featnet"], upstream=True, retries=0)
    assert {k: v["status"] for k, v in again["stages"].items()} == {"prepare": "up to date", "featnet": "up to date"}
    assert (repo / "metrics/featnet.json").stat().st_mtime > 0


@pytest.mark.slow
def test_flow_runs_whole_ci_pipeline(tmp_path, prefect_api):
    """Every stage of dvc.yaml on the ci preset, in dependency order; all outputs and metrics; MLflow parent FINISHED."""
    import mlflow

    from flows.pipeline import pipeline, stage_graph

    repo = pipeline_copy(tmp_path / "repo", ["experiment=ci"])
    stages = list(stage_graph(repo))
    state = pipeline(repo=str(repo), retries=0, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert set(summary["stages"]) == set(stages)
    assert all(s["status"] == "ran" for s in summary["stages"].values()), summary["stages"]
    order = list(summary["stages"])
    assert order.index("prepare") < order.index("pretrain") < order.index("evaluate")
    for out in ("models/unified/model.pt", "models/featnet.pt", "samples/unified", "metrics/evaluate.json",
                "metrics/pretrain.json"):
        assert (repo / out).exists(), out
    assert {"metrics/evaluate.json", "metrics/pretrain.json", "metrics/featnet.json"} <= set(summary["metrics"])
    artifact = _summary_artifact(prefect_api, _flow_run_id(state))
    assert "fid_featnet" in artifact.data
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("stepwise")
    parent = client.search_runs([exp.experiment_id], f"tags.`stepwise.pipeline` = '{_flow_run_id(state)}'")
    assert [r.info.status for r in parent] == ["FINISHED"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


# ---------------------------------------------------------------------------------------------- retries and failures

FLAKY = """\
    import os, sys
    from pathlib import Path
    marker = Path(os.environ["FLAKY_MARKER"])
    if not marker.exists():
        marker.write_text("failed once")
        print("simulated transient failure: CUDA error: unspecified launch failure", file=sys.stderr)
        sys.exit(1)
    Path("out").mkdir(exist_ok=True)
    Path("out/flaky.txt").write_text("ok")
"""
BROKEN = """\
    import sys
    print("stepwise broken: error: params.yaml has no 'train' section", file=sys.stderr)
    sys.exit(2)
"""
RETRY_DVC_YAML = """\
    stages:
      flaky:
        cmd: python flaky.py
        deps: [flaky.py]
        outs: [out/flaky.txt]
      broken:
        cmd: python broken.py
        deps: [broken.py]
        outs: [out/broken.txt]
"""


def test_transient_failure_is_retried_and_project_error_is_not(tmp_path, prefect_api, monkeypatch):
    """`flaky` fails once (exit 1) and succeeds on its retry; `broken` exits 2 (a StepwiseError) and is not retried
    although retries=2; the flow fails with broken's stderr tail in the message; the summary artifact still exists."""
    from flows.pipeline import StageFailed, pipeline

    repo = _git_dvc_repo(tmp_path / "repo", RETRY_DVC_YAML, {"flaky.py": FLAKY, "broken.py": BROKEN})
    monkeypatch.setenv("FLAKY_MARKER", str(tmp_path / "flaky.marker"))
    state = pipeline(repo=str(repo), retries=2, retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, StageFailed), repr(exc)
    assert exc.stage == "broken" and exc.cmd_exit == 2 and not exc.transient
    assert "params.yaml has no 'train' section" in str(exc)

    runs = _task_runs(prefect_api, _flow_run_id(state))
    assert runs["flaky"].state.is_completed() and runs["flaky"].run_count == 2
    assert runs["broken"].state.is_failed() and runs["broken"].run_count == 1
    assert (repo / "out/flaky.txt").read_text() == "ok"
    artifact = _summary_artifact(prefect_api, _flow_run_id(state))
    assert "| broken |  | failed |" in artifact.data and "| flaky |  | ran |" in artifact.data


def test_failure_without_retries_raises_with_stderr_tail(tmp_path, prefect_api, monkeypatch):
    """retries=0: the first transient failure fails the flow, the exception carries the stage's stderr, and the
    stage downstream of it is not run."""
    from flows.pipeline import StageFailed, pipeline

    dvc_yaml = """\
        stages:
          flaky:
            cmd: python flaky.py
            deps: [flaky.py]
            outs: [out/flaky.txt]
          after:
            cmd: cp out/flaky.txt after.txt
            deps: [out/flaky.txt]
            outs: [after.txt]
    """
    repo = _git_dvc_repo(tmp_path / "repo", dvc_yaml, {"flaky.py": FLAKY})
    monkeypatch.setenv("FLAKY_MARKER", str(tmp_path / "flaky.marker"))
    with pytest.raises(StageFailed, match=r"(?s)stage 'flaky' failed.*exited with 1.*CUDA error: unspecified"):
        pipeline(repo=str(repo), retries=0, retry_delay_seconds=0)
    assert not (repo / "after.txt").exists()


# ---------------------------------------------------------------------------------------------------------- fan-out

BARRIER = """\
    import os, sys, time
    from pathlib import Path
    item, started = sys.argv[1], Path(os.environ["BARRIER_DIR"])
    (started / item).touch()
    deadline = time.time() + 90
    while len(list(started.iterdir())) < 3:  # every group must be running at once to get past here
        if time.time() > deadline:
            sys.exit(f"group {item}: the other groups never started while it ran: {sorted(os.listdir(started))}")
        time.sleep(0.1)
    Path("out").mkdir(exist_ok=True)
    Path(f"out/{item}.txt").write_text(Path("base.txt").read_text().strip() + f"+{item}\\n")
"""
FANOUT_DVC_YAML = """\
    stages:
      base:
        cmd: echo base > base.txt
        outs: [base.txt]
      finetune:
        foreach: [a, b, c]
        do:
          cmd: python barrier.py ${item}
          deps: [base.txt, barrier.py]
          outs: ["out/${item}.txt"]
      report:
        cmd: cat out/a.txt out/b.txt out/c.txt > report.txt
        deps: [out/a.txt, out/b.txt, out/c.txt]
        outs: [report.txt]
"""


def test_foreach_groups_fan_out_concurrently(tmp_path, prefect_api, monkeypatch):
    """The foreach stages are found from DVC, run after `base` and concurrently (each blocks until all three have
    started, so a serial runner fails it), and `report` runs after all of them."""
    from flows.pipeline import pipeline, stage_graph

    repo = _git_dvc_repo(tmp_path / "repo", FANOUT_DVC_YAML, {"barrier.py": BARRIER})
    (tmp_path / "started").mkdir()
    monkeypatch.setenv("BARRIER_DIR", str(tmp_path / "started"))
    assert stage_graph(repo) == {"base": set(), "finetune@a": {"base"}, "finetune@b": {"base"},
                                 "finetune@c": {"base"}, "report": {"finetune@a", "finetune@b", "finetune@c"}}
    state = pipeline(repo=str(repo), retries=0, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert list(summary["stages"])[0] == "base" and list(summary["stages"])[-1] == "report"
    assert all(s["status"] == "ran" for s in summary["stages"].values())
    assert (repo / "report.txt").read_text().split() == ["base+a", "base+b", "base+c"]
    runs = _task_runs(prefect_api, _flow_run_id(state))
    assert runs["report"].start_time >= max(runs[f"finetune@{g}"].end_time for g in "abc")
    assert min(runs[f"finetune@{g}"].start_time for g in "abc") >= runs["base"].end_time


# ---------------------------------------------------------------------------------- stage selection and classification

def test_select_stages_globs_upstream_and_unknown():
    from flows.pipeline import select_stages

    graph = {"prepare": set(), "pretrain": {"prepare"}, "finetune@0": {"pretrain"}, "finetune@1": {"pretrain"},
             "prune@0": {"finetune@0"}, "report": {"prune@0", "finetune@1"}}
    assert select_stages(graph, ["finetune@*"]) == ["finetune@0", "finetune@1"]
    assert select_stages(graph, ["prune@0"], upstream=True) == ["prepare", "pretrain", "finetune@0", "prune@0"]
    everything = select_stages(graph, None)
    assert set(everything) == set(graph) and everything.index("report") == len(graph) - 1
    with pytest.raises(ValueError, match=r"no DVC stage matches 'finetun@\*'; stages are: finetune@0"):
        select_stages(graph, ["finetun@*"])


@pytest.mark.parametrize("stderr, expected", [
    ("ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with 1", (1, True)),
    ("ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with -9", (-9, True)),
    ("ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with 2", (2, False)),
    ("ERROR: 'dvc.yaml' does not contain stage 'nope'", (None, False)),
    ("ERROR: Unable to acquire lock. Most likely another DVC process is running", (None, True)),
])
def test_classify_failure(stderr, expected):
    from flows.pipeline import classify_failure

    assert classify_failure(stderr) == expected


# ----------------------------------------------------------------------------------------------- deployment config

def test_repo_prefect_yaml_is_valid():
    assert check_prefect_yaml(REPO / "prefect.yaml") == ["pipeline", "finetune-group", "stage"]
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    for dep in deps.values():
        assert dep["work_pool"]["name"] == "gpu"
    for name in ("pipeline", "finetune-group"):
        assert "CUDA_VISIBLE_DEVICES" in deps[name]["work_pool"]["job_variables"]["env"]
    # a distributed stage takes the GPU its worker was started with: no env to override the worker's
    assert "env" not in deps["stage"]["work_pool"]["job_variables"]


def test_prefect_deploy_accepts_repo_prefect_yaml(tmp_path, prefect_api):
    """`prefect deploy --all` (the real CLI) registers both deployments on the `gpu` process pool, job variables,
    parameters and the paused nightly schedule included."""
    from prefect.settings import PREFECT_API_URL

    shutil.copytree(REPO / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", tmp_path / "prefect.yaml")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(tmp_path)}
    prefect = [sys.executable, "-m", "prefect"]
    for cmd in ([*prefect, "work-pool", "create", "gpu", "--type", "process", "--overwrite"],
                [*prefect, "--no-prompt", "deploy", "--all"]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    whole = prefect_api.read_deployment_by_name("stepwise-pipeline/pipeline")
    group = prefect_api.read_deployment_by_name("stepwise-finetune-group/finetune-group")
    stage = prefect_api.read_deployment_by_name("stepwise-stage/stage")
    for dep in (whole, group, stage):
        assert dep.work_pool_name == "gpu"
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                   {"directory": "{{ $STEPWISE_REPO }}"}}]
    for dep in (whole, group):
        assert dep.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert group.parameters["group"] == "0" and group.entrypoint == "flows/pipeline.py:finetune_group"
    assert [(s.schedule.cron, s.active) for s in whole.schedules] == [("0 2 * * *", False)]
    assert stage.entrypoint == "flows/distributed.py:stage_flow"
    assert {"stage", "commit", "params_yaml", "upstream_lock"} <= set(stage.parameter_openapi_schema["properties"])


def test_coordinator_registers_the_stage_deployment_it_needs(prefect_api):
    """--distributed registers `stepwise-stage/stage` on --pool as prefect.yaml defines it; a missing pool, or an
    existing deployment on another pool, is one clear error."""
    import logging

    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.artifact_bus import BusError
    from flows.distributed import PULL_STEPS, STAGE_ENTRYPOINT, ensure_deployment

    log = logging.getLogger("test")
    name = "stepwise-stage/registered-here"
    with pytest.raises(BusError, match=r"work pool 'no-such-pool' not found: `prefect work-pool create no-such-pool"):
        ensure_deployment(prefect_api, name, "no-such-pool", log)
    prefect_api.create_work_pool(WorkPoolCreate(name="gpu-here", type="process"), overwrite=True)
    ensure_deployment(prefect_api, name, "gpu-here", log)
    dep = prefect_api.read_deployment_by_name(name)
    assert (dep.work_pool_name, dep.entrypoint, dep.pull_steps) == ("gpu-here", STAGE_ENTRYPOINT, PULL_STEPS)
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (stage,) = [d for d in doc["deployments"] if d["name"] == "stage"]
    assert stage["entrypoint"] == STAGE_ENTRYPOINT and doc["pull"] == PULL_STEPS
    ensure_deployment(prefect_api, name, "gpu-here", log)  # already there: used as it is
    with pytest.raises(BusError, match=r"sends its runs to work pool 'gpu-here', not 'gpu'"):
        ensure_deployment(prefect_api, name, "gpu", log)


def test_known_job_variables_match_prefects_process_worker():
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    assert set(PROCESS_JOB_VARIABLES) == set(template["variables"]["properties"])


def _bad(tmp_path, mutate) -> Path:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    mutate(doc["deployments"][0])
    (tmp_path / "flows").mkdir()
    for f in (REPO / "flows").glob("*.py"):
        (tmp_path / "flows" / f.name).write_text(f.read_text())
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["work_pool"].pop("name"), r"deployment 'pipeline': `work_pool.name` is missing"),
    (lambda d: d.pop("work_pool"), r"`work_pool.name` is missing"),
    (lambda d: d.update(entrypoint="flows/nope.py:pipeline"), r"entrypoint 'flows/nope.py:pipeline': no such file"),
    (lambda d: d.update(entrypoint="flows/pipeline.py:pipelin"), r"defines no function 'pipelin'"),
    (lambda d: d.update(entrypoint="flows/pipeline.py:stage_graph"), r"'stage_graph' is not decorated with @flow"),
    (lambda d: d.update(entrypoint="flows/pipeline.py"), r"not of the form 'path/to/file.py:flow_function'"),
    (lambda d: d["parameters"].update(stage=["x"]), r"parameters \['stage'\] are not arguments of pipeline\(\)"),
    (lambda d: d["work_pool"]["job_variables"].update(gpus=2), r"unknown job variable 'gpus' for a process work pool"),
    (lambda d: d["work_pool"]["job_variables"].update(env=["CUDA_VISIBLE_DEVICES=0"]),
     r"job variable 'env' has a list value"),
    (lambda d: d["work_pool"]["job_variables"]["env"].update(CUDA_VISIBLE_DEVICES=0),
     r"env.CUDA_VISIBLE_DEVICES must be a string"),
    (lambda d: d["work_pool"]["job_variables"]["env"].update(CUDA_VISIBLE_DEVICES="gpu0"),
     r"env.CUDA_VISIBLE_DEVICES='gpu0' is not a comma-separated list"),
    (lambda d: d["work_pool"]["job_variables"].update(stream_output="yes"), r"'stream_output' has a str value"),
    (lambda d: d["schedules"][0].update(cron="every night"), r"schedules\[0\] cron='every night'"),
    (lambda d: d["schedules"][0].update(interval=3600), r"needs exactly one of cron, interval, rrule"),
])
def test_bad_deployment_config_gives_one_clear_error(tmp_path, mutate, message):
    path = _bad(tmp_path, mutate)
    with pytest.raises(DeploymentConfigError, match=message) as info:
        check_prefect_yaml(path)
    assert len(info.value.problems) == 1, info.value.problems
    assert str(path) in str(info.value)


def test_deploy_check_lists_every_problem_and_cli_exit_code(tmp_path):
    def mutate(d):
        d["work_pool"]["name"] = ""
        d["entrypoint"] = "flows/pipeline.py:nope"

    path = _bad(tmp_path, mutate)
    with pytest.raises(DeploymentConfigError) as info:
        check_prefect_yaml(path)
    assert len(info.value.problems) == 2
    proc = subprocess.run([sys.executable, "-m", "flows.deploy_check", str(path)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "2 problem(s)" in proc.stderr and "work_pool.name" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "flows.deploy_check"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "3 deployment(s) OK" in ok.stdout
