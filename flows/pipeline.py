"""Prefect orchestration of the DVC pipeline: every DVC stage is one Prefect task.

    python -m flows.pipeline                              # the whole pipeline, locally (ephemeral Prefect, no server)
    python -m flows.pipeline --stages prepare featnet     # only these stages (names or globs: 'finetune@*')
    python -m flows.pipeline --stages 'finetune@*' --upstream --retries 3 --max-parallel 2
    python -m flows.pipeline --distributed --pool gpu     # foreach stages on GPU workers (flows/distributed.py)

Each task shells out to `dvc --wait-for-lock repro --single-item <stage>`, so DVC still decides whether the stage is
stale (an up-to-date stage is a no-op) and still writes dvc.lock; Prefect only orders, retries and records. The stage
graph comes from `dvc dag --dot`, so foreach stages (`finetune@0`, `prune@3`, ...) are found without naming them here.
Every stage is submitted as soon as it is known, waiting only for its own upstream stages: independent stages, and
the members of a foreach group, run concurrently (DVC releases its repo lock while a stage's command runs).
Bound the concurrency with `--max-parallel` or `PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS`.

Stage subprocesses get STEPWISE_PIPELINE_RUN and STEPWISE_PREFECT_FLOW_RUN set to the flow run id, so the MLflow
runs of one flow run share one parent run (tagged `stepwise.pipeline` and `prefect_flow_run_id`, see
stepwise/tracking.py).
Prefect result caching is off for these tasks: a cached Prefect result would skip a stage that DVC knows is stale.

With --distributed, the dispatched stages (default: every foreach stage) run instead as flow runs of the
`stepwise-stage` deployment on a work pool's workers, their artifacts moving through a DVC remote; everything else
stays as above (see flows/distributed.py and docs/orchestration.md).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from graphlib import TopologicalSorter
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as runtime_flow_run
from prefect.runtime import task_run as runtime_task_run

from flows.artifact_bus import dvc_command

SUMMARY_ARTIFACT_KEY = "stepwise-pipeline-summary"
STDERR_TAIL_LINES = 40
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_S = 30.0
PROJECT_ERROR_EXIT = 2  # stages/common.run_stage exits 2 on a StepwiseError: bad params/data, never transient
# distributed runs (flows/distributed.py)
DEFAULT_POOL, STAGE_DEPLOYMENT = "gpu", "stepwise-stage/stage"
HEARTBEAT_S, LOST_AFTER_S, SYNC_S, POLL_S = 10.0, 120.0, 30.0, 5.0


class StageFailed(RuntimeError):
    """A stage's `dvc repro` failed; the message carries the tail of its stderr."""

    def __init__(self, stage: str, returncode: int, stderr_tail: str, cmd_exit: int | None, transient: bool):
        self.stage, self.returncode, self.stderr_tail = stage, returncode, stderr_tail
        self.cmd_exit, self.transient = cmd_exit, transient
        what = f"its command exited with {cmd_exit}" if cmd_exit is not None else "DVC could not run it"
        kind = "transient: retried while retries remain" if transient else "not transient: not retried"
        super().__init__(f"stage '{stage}' failed: `dvc repro` exit {returncode}, {what} ({kind}).\n"
                         f"--- last lines of stderr ---\n{stderr_tail}")


def classify_failure(stderr: str) -> tuple[int | None, bool]:
    """(the stage command's exit code if DVC ran it, whether a retry could help).

    A command that exited with PROJECT_ERROR_EXIT (a StepwiseError: bad params or data) and DVC errors before the
    command ran (unknown stage, missing dependencies, dvc.yaml syntax) fail the same way every time; a crash, a kill
    (OOM, preemption), a CUDA error or a held lock may not."""
    m = re.findall(r"failed to run: .*?, exited with (-?\d+)", stderr, flags=re.S)
    if m:
        code = int(m[-1])
        return code, code != PROJECT_ERROR_EXIT
    return None, bool(re.search(r"Unable to acquire lock|LockError|is busy", stderr))


def _retry_if_transient(task_, task_run, state) -> bool:
    """retry_condition_fn: retry an error that says it is not transient (`.transient`: StageFailed, a remote
    stage's failure) only when it is; retry anything else (unexpected errors)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as e:  # noqa: BLE001 - we only inspect it
            exc = e
    return bool(getattr(exc, "transient", True))


def _pump(stream, sink: deque | None, log, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        if sink is not None:
            sink.append(line)
        log.info("%s %s", prefix, line)
    stream.close()


def run_repro(stage: str, repo: str, env: dict[str, str], force: bool, log, on_start=None,
              new_session: bool = False) -> dict:
    """`dvc --wait-for-lock repro --single-item [-f] <stage>` in `repo`, its output streamed to `log`; StageFailed
    with the stderr tail on failure. `on_start(proc)` sees the process once started; `new_session` starts it in its
    own process group (so that one signal reaches DVC and the stage command under it)."""
    cmd = [*dvc_command(), "--wait-for-lock", "repro", "--single-item", *(["--force"] if force else []), stage]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=new_session)
    if on_start is not None:
        on_start(proc)
    out: deque = deque(maxlen=200)
    err: deque = deque(maxlen=STDERR_TAIL_LINES)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, log, f"[{stage}]"), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, log, f"[{stage} stderr]"), daemon=True)]
    for t in pumps:
        t.start()
    rc = proc.wait()
    for t in pumps:
        t.join()
    if rc != 0:
        cmd_exit, transient = classify_failure("\n".join(err))
        raise StageFailed(stage, rc, "\n".join(err), cmd_exit, transient)
    text = "\n".join(out)
    ran = f"Running stage '{stage}'" in text or "Running callback stage" in text
    return {"stage": stage, "status": "ran" if ran else "up to date", "seconds": round(time.monotonic() - start, 1)}


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False,
      retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_S, retry_condition_fn=_retry_if_transient)
def repro_stage(stage: str, repo: str, env: dict[str, str], force: bool = False) -> dict:
    """`dvc --wait-for-lock repro --single-item [-f] <stage>` in `repo`; StageFailed with the stderr tail on failure."""
    log = get_run_logger()
    log.info("running dvc repro --single-item %s (attempt %d)", stage, runtime_task_run.run_count)
    return {**run_repro(stage, repo, env, force, log), "attempts": runtime_task_run.run_count}


@task(name="compose-params", cache_policy=NO_CACHE, persist_result=False)
def compose_params(repo: str, overrides: list[str]) -> None:
    """Rewrite `repo`/params.yaml from conf/ with Hydra overrides (`python -m stages.compose ...`)."""
    proc = subprocess.run([sys.executable, "-m", "stages.compose", *overrides], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(Path(repo).resolve())})
    if proc.returncode != 0:
        raise RuntimeError(f"composing params.yaml with {overrides} failed:\n{proc.stderr[-3000:]}")
    get_run_logger().info(proc.stdout.strip())


# ---------------------------------------------------------------------------------------------------- the stage graph

def stage_graph(repo: str | os.PathLike) -> dict[str, set[str]]:
    """{stage: its direct upstream stages} from `dvc dag --dot`; foreach stages appear expanded (`finetune@0`).
    Data sources (`*.dvc` files) are left out: there is nothing to run for them."""
    proc = subprocess.run([*dvc_command(), "dag", "--dot"], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc dag --dot` failed in {repo}:\n{proc.stderr[-3000:]}")
    graph: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        edge = re.fullmatch(r'"(.+)"\s*->\s*"(.+)";?', line)
        node = re.fullmatch(r'"(.+)";?', line)
        if edge:
            up, down = edge.groups()
            graph.setdefault(up, set())
            graph.setdefault(down, set()).add(up)
        elif node:
            graph.setdefault(node.group(1), set())
    sources = {n for n in graph if n.endswith(".dvc")}
    return {n: ups - sources for n, ups in graph.items() if n not in sources}


def ancestors(graph: dict[str, set[str]], stage: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[stage])
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(graph[s])
    return seen


def select_stages(graph: dict[str, set[str]], patterns: list[str] | None, upstream: bool = False) -> list[str]:
    """The stages to run, in a topological order. `patterns`: names or shell globs (None: all stages);
    `upstream`: also every stage they depend on. ValueError for a pattern that matches nothing."""
    if patterns:
        chosen: set[str] = set()
        for p in patterns:
            hit = [s for s in graph if fnmatch.fnmatchcase(s, p)]
            if not hit:
                raise ValueError(f"no DVC stage matches {p!r}; stages are: {', '.join(sorted(graph)) or '(none)'}")
            chosen.update(hit)
        if upstream:
            for s in list(chosen):
                chosen |= ancestors(graph, s)
    else:
        chosen = set(graph)
    order = list(TopologicalSorter({s: graph[s] for s in graph}).static_order())
    return [s for s in order if s in chosen]


def group_of(stage: str) -> str | None:
    """'finetune@3' -> 'finetune' (a foreach family); None for a plain stage."""
    return stage.split("@", 1)[0] if "@" in stage else None


# ----------------------------------------------------------------------------------------------------------- summary

def read_metrics(repo: str | os.PathLike) -> dict[str, dict]:
    """{relative path: flattened metrics} for every metrics/**/*.json under `repo`."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    root = Path(repo)
    found = {}
    for path in sorted((root / "metrics").rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            found[str(path.relative_to(root))] = {"(unreadable)": f"{type(e).__name__}: {e}"}
            continue
        found[str(path.relative_to(root))] = flat(data) if isinstance(data, dict) else {"value": data}
    return found


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|")


def summary_markdown(summary: dict) -> str:
    lines = [f"# stepwise pipeline, flow run `{summary['flow_run_id']}`", "",
             f"repo: `{summary['repo']}`", "",
             "| stage | group | result | seconds | attempts |", "|---|---|---|---|---|"]
    for name, s in summary["stages"].items():
        lines.append(f"| {name} | {group_of(name) or ''} | {s['status']} | {_fmt(s.get('seconds', ''))} "
                     f"| {_fmt(s.get('attempts', ''))} |")
    lines += ["", "## Metrics", ""]
    if summary["metrics"]:
        lines += ["| file | metric | value |", "|---|---|---|"]
        for path, metrics in summary["metrics"].items():
            lines += [f"| {path} | {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines.append("(no metrics/*.json files)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- the flows

def _orchestrate(repo: str, patterns: list[str] | None, params_overrides: list[str] | None, retries: int,
                 retry_delay_seconds: float, upstream: bool, force: bool, pipeline_run: str | None,
                 distributed: dict | None = None) -> dict:
    log = get_run_logger()
    repo = str(Path(repo).resolve())
    run_id = str(runtime_flow_run.id)
    env = {"STEPWISE_PIPELINE_RUN": pipeline_run or run_id, "STEPWISE_PREFECT_FLOW_RUN": run_id,
           # every stage's output lands in the flow run's log: fewer progress-bar redraws
           "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "10")}

    if params_overrides:
        compose_params(repo, list(params_overrides))
    graph = stage_graph(repo)
    order = select_stages(graph, patterns, upstream)
    log.info("stages to run: %s", ", ".join(order) or "(none)")

    runner = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    plan = None
    if distributed is not None:
        from flows.distributed import prepare_dispatch, run_remote_stage

        mlflow_uri = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]} \
            if os.environ.get("MLFLOW_TRACKING_URI") else {}
        plan = prepare_dispatch(repo, namespace=pipeline_run or run_id, env={**env, **mlflow_uri}, force=force,
                                **distributed)
        remote_runner = run_remote_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    futures = {}
    for stage in order:  # topological order: a stage's upstream futures exist before it is submitted
        ups = [futures[s] for s in ancestors(graph, stage) if s in futures]
        if plan is not None and plan.dispatches(stage):
            futures[stage] = remote_runner.submit(stage, plan, wait_for=ups)
        else:
            futures[stage] = runner.submit(stage, repo, env, force, wait_for=ups)

    stages, failures = {}, []
    for stage, fut in futures.items():
        fut.wait()
        state = fut.state
        if state.is_completed():
            stages[stage] = fut.result()
        elif state.is_failed() or state.is_crashed():
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the summary
                failures.append(e)
                stages[stage] = {"status": "failed", "error": str(e).splitlines()[0]}
        else:
            stages[stage] = {"status": f"not run ({state.name}: upstream failed)"}

    summary = {"flow_run_id": run_id, "repo": repo, "stages": stages, "metrics": read_metrics(repo)}
    create_markdown_artifact(summary_markdown(summary), key=SUMMARY_ARTIFACT_KEY,
                             description=f"stages and metrics of {repo}")
    if failures:
        raise failures[0]
    return summary


@flow(name="stepwise-pipeline", persist_result=False)
def pipeline(repo: str = ".", stages: list[str] | None = None, params_overrides: list[str] | None = None,
             retries: int = DEFAULT_RETRIES, retry_delay_seconds: float = DEFAULT_RETRY_DELAY_S,
             upstream: bool = False, force: bool = False, pipeline_run: str | None = None,
             distributed: bool = False, pool: str = DEFAULT_POOL, deployment: str = STAGE_DEPLOYMENT,
             remote: str | None = None, dispatch: list[str] | None = None, max_parallel: int | None = None,
             heartbeat_seconds: float = HEARTBEAT_S, lost_after_seconds: float = LOST_AFTER_S,
             sync_every_seconds: float = SYNC_S, remote_timeout_seconds: float | None = None) -> dict:
    """Run the DVC pipeline in `repo` stage by stage.

    stages: stage names or globs ('finetune@*'); default every stage. upstream: also run what they depend on.
    params_overrides: Hydra overrides; params.yaml is recomposed from conf/ with them first (it is rewritten in place).
    retries / retry_delay_seconds: per stage, for transient failures only. force: `dvc repro --force`.
    pipeline_run: the MLflow parent-run key (STEPWISE_PIPELINE_RUN), and in a distributed run the remote folder of
    its stages' checkpoints (pass the same name again to resume them); default this flow run's id.

    distributed: dispatch stages (`dispatch` globs, default every foreach stage) as flow runs of `deployment` on work
    pool `pool` (registered there if missing), artifacts through DVC remote `remote` (default: the default
    remote), at most `max_parallel` at once; see flows/distributed.py. A worker silent for `lost_after_seconds`
    (it sends a heartbeat every `heartbeat_seconds`) is lost and its stage dispatched again, resuming from the
    checkpoints it mirrored every `sync_every_seconds`; `remote_timeout_seconds` bounds one dispatched run."""
    options = None
    if distributed:
        options = {"pool": pool, "deployment": deployment, "remote": remote, "patterns": dispatch,
                   "max_parallel": max_parallel, "heartbeat_s": heartbeat_seconds,
                   "lost_after_s": lost_after_seconds, "sync_s": sync_every_seconds,
                   "poll_s": min(POLL_S, heartbeat_seconds), "timeout_s": remote_timeout_seconds}
    return _orchestrate(repo, stages, params_overrides, retries, retry_delay_seconds, upstream, force, pipeline_run,
                        options)


@flow(name="stepwise-finetune-group", persist_result=False)
def finetune_group(group: str, repo: str = ".", retries: int = DEFAULT_RETRIES,
                   retry_delay_seconds: float = DEFAULT_RETRY_DELAY_S, force: bool = False,
                   pipeline_run: str | None = None) -> dict:
    """Only `finetune@<group>` (its upstream stages must be up to date). Pass pipeline_run=<the pipeline flow run
    id> to file its MLflow run under that pipeline run's parent."""
    return _orchestrate(repo, [f"finetune@{group}"], None, retries, retry_delay_seconds, False, force, pipeline_run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    parser.add_argument("--stages", nargs="+", help="stage names or globs, e.g. prepare 'finetune@*' (default: all)")
    parser.add_argument("--upstream", action="store_true", help="also run the stages they depend on")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries per stage (transient failures)")
    parser.add_argument("--retry-delay", type=float, default=DEFAULT_RETRY_DELAY_S, help="seconds between retries")
    parser.add_argument("--force", action="store_true", help="dvc repro --force")
    parser.add_argument("--max-parallel", type=int,
                        help="at most this many stages at once; with --distributed, dispatched stages (default: "
                             "unbounded)")
    parser.add_argument("--set", dest="overrides", nargs="+", metavar="OVERRIDE",
                        help="Hydra overrides; recompose params.yaml first, e.g. --set experiment=ci")
    parser.add_argument("--pipeline-run", help="MLflow parent-run key and checkpoint folder on the remote; pass a "
                                               "killed distributed run's name again to resume (default: flow run id)")
    dist = parser.add_argument_group("distributed (flows/distributed.py; needs a Prefect server: PREFECT_API_URL)")
    dist.add_argument("--distributed", action="store_true",
                      help="run the dispatched stages as flow runs on a work pool's workers")
    dist.add_argument("--pool", default=DEFAULT_POOL, help="the work pool (default: %(default)s)")
    dist.add_argument("--deployment", default=STAGE_DEPLOYMENT,
                      help="the stage deployment; registered on --pool if missing (default: %(default)s)")
    dist.add_argument("--remote", help="the DVC remote that carries artifacts, by name (default: the default remote)")
    dist.add_argument("--dispatch", nargs="+", metavar="GLOB",
                      help="the stages to dispatch (default: every foreach stage, e.g. finetune@*, prune@*)")
    dist.add_argument("--heartbeat", type=float, default=HEARTBEAT_S, help="seconds between worker heartbeats")
    dist.add_argument("--lost-after", type=float, default=LOST_AFTER_S,
                      help="seconds without a sign of life after which a worker is lost and its stage re-dispatched")
    dist.add_argument("--sync-every", type=float, default=SYNC_S,
                      help="seconds between mirrorings of a running stage's checkpoints to the remote")
    dist.add_argument("--remote-timeout", type=float, help="seconds after which one dispatched run is given up")
    args = parser.parse_args(argv)

    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.task_runners import ThreadPoolTaskRunner

    flow_ = pipeline
    if args.max_parallel and not args.distributed:
        flow_ = pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.max_parallel))
    distributed = {} if not args.distributed else {
        "distributed": True, "pool": args.pool, "deployment": args.deployment, "remote": args.remote,
        "dispatch": args.dispatch, "max_parallel": args.max_parallel, "heartbeat_seconds": args.heartbeat,
        "lost_after_seconds": args.lost_after, "sync_every_seconds": args.sync_every,
        "remote_timeout_seconds": args.remote_timeout}
    # The ephemeral server (no PREFECT_API_URL) can take a while to start on a busy machine.
    updates = {} if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ else {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90}
    with temporary_settings(updates=updates):
        state = flow_(repo=args.repo, stages=args.stages, params_overrides=args.overrides, retries=args.retries,
                      retry_delay_seconds=args.retry_delay, upstream=args.upstream, force=args.force,
                      pipeline_run=args.pipeline_run, return_state=True, **distributed)
    if not state.is_completed():
        print(f"pipeline {state.name}: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()
    for name, s in summary["stages"].items():
        print(f"{name:24s} {s['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
