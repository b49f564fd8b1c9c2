"""Distributed pipeline runs: stages fanned out to GPU workers as flow runs of a deployment, artifacts through DVC.

    python -m flows.pipeline --distributed --pool gpu            # see docs/orchestration.md for the setup

The coordinator (`flows.pipeline` with distributed=True) runs the pipeline as usual, except that each dispatched
stage (by default every foreach stage: finetune@i, prune@i) becomes its own flow run of the `stepwise-stage`
deployment on the work pool, taken by whichever worker is free:

1. Before dispatching, the coordinator pushes the stage's deps to the DVC remote (flows/artifact_bus.py) and sends,
   as flow run parameters, its git commit, its params.yaml, and the dvc.lock entries of the stages that produce
   those deps.
2. On the worker, `stage_flow` checks that its checkout is at that commit, writes that params.yaml, merges those
   entries into its own dvc.lock, pulls exactly the stage's deps from the remote, restores the stage's persistent
   outputs (checkpoints) from the remote if an earlier attempt left some, runs `dvc repro --single-item <stage>`
   while it mirrors the persistent outputs to the remote every `sync_every_seconds`, then pushes the outputs and
   writes its dvc.lock entry for the stage to the remote.
3. The coordinator fetches the outputs, merges that entry into its own dvc.lock (it is the one writer of its
   dvc.lock: whole entries under DVC's repo lock) and checks with `dvc status <stage>` that its workspace now holds
   exactly what the worker recorded: an up-to-date stage, built from the coordinator's own inputs.

Retries: a failed group is dispatched again (a new flow run, any worker) while retries remain, except after a
project error (the stage exited 2: bad params or data) or a setup error (checkout at another commit, no remote), which
fail the same way everywhere. A worker that stops sending heartbeats (a flow run label, every `heartbeat_seconds`)
for `lost_after_seconds` is lost: the coordinator marks its flow run Crashed and dispatches the group again; the new
attempt resumes from the newest mirrored checkpoint. A worker that was only cut off sees its run Crashed at its
next heartbeat and stops its stage, so two attempts never write the same state.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as runtime_flow_run
from prefect.runtime import task_run as runtime_task_run

from flows.artifact_bus import (
    ArtifactBus,
    BusError,
    git,
    merge_lock_entries,
    producers,
    read_lock,
    run_dvc,
    source_deps,
    stage_specs,
    uncommitted,
)
from flows.pipeline import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DELAY_S,
    HEARTBEAT_S,
    LOST_AFTER_S,
    POLL_S,
    STAGE_DEPLOYMENT,
    SYNC_S,
    StageFailed,
    _retry_if_transient,
    group_of,
    run_repro,
)

STAGE_FLOW = STAGE_DEPLOYMENT.split("/")[0]
STAGE_ENTRYPOINT = "flows/distributed.py:stage_flow"
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $STEPWISE_REPO }}"}}]
WORKER_ENV = "STEPWISE_WORKER"  # the worker's name: flow run label, and passed on to the stage (MLflow tag)
FLOW_RUN_ENV = "STEPWISE_STAGE_FLOW_RUN"  # the stage's own flow run id, passed on to the stage (MLflow tag)
WORKER_LABEL, STAGE_LABEL = "stepwise.worker", "stepwise.stage"
HEARTBEAT_LABEL, TRANSIENT_LABEL = "stepwise.heartbeat", "stepwise.transient"
STOP_GRACE_S = 30.0


class RemoteStageFailed(RuntimeError):
    """A dispatched stage failed, was lost, or came back inconsistent. `transient`: whether a retry could help."""

    def __init__(self, stage: str, message: str, transient: bool):
        self.stage, self.transient = stage, transient
        kind = "transient: dispatched again while retries remain" if transient else "not transient: not retried"
        super().__init__(f"stage '{stage}' ({kind}): {message}")


def worker_name() -> str:
    return os.environ.get(WORKER_ENV) or socket.gethostname()


def _label(client, flow_run_id, labels: dict[str, str]) -> None:
    client.update_flow_run_labels(flow_run_id, labels)


# ----------------------------------------------------------------------------------------------- the worker side

class _Watch(threading.Thread):
    """For the whole stage flow run: a heartbeat label every `heartbeat_s`, and fencing: once the flow run is no
    longer Running (the coordinator gave it up), stop the stage and mirror nothing more. While a `sync` function is
    set (the stage runs), the persistent outputs are mirrored every `sync_s`."""

    def __init__(self, flow_run_id: str, heartbeat_s: float, sync_s: float, log):
        super().__init__(daemon=True, name="stepwise-watch")
        self.flow_run_id, self.heartbeat_s, self.sync_s, self.log = flow_run_id, heartbeat_s, sync_s, log
        self.proc = None
        self.fenced: str | None = None
        self._sync = None
        self._sync_lock = threading.Lock()  # one mirroring at a time: the last one written is the newest
        self._halt = threading.Event()

    def attach(self, proc) -> None:
        self.proc = proc

    def start_sync(self, sync) -> None:
        self._sync = sync

    def final_sync(self) -> None:
        """Mirror once more (unless fenced) and stop mirroring."""
        with self._sync_lock:
            sync, self._sync = self._sync, None
            if sync is not None and not self.fenced:
                try:
                    sync()
                except Exception as e:  # noqa: BLE001 - already failing, or the outputs go up anyway
                    self.log.warning("final mirroring of the persistent outputs failed: %s", e)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)

    def _mirror(self) -> None:
        with self._sync_lock:
            if self._sync is not None and not self.fenced:
                try:
                    self._sync()
                except Exception as e:  # noqa: BLE001 - the remote is unreachable now: the next pass retries
                    self.log.warning("mirroring the persistent outputs failed: %s", e)

    def run(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType

        beats, next_beat, next_sync = 0, 0.0, time.monotonic() + self.sync_s
        with get_client(sync_client=True) as client:
            while not self._halt.wait(min(self.heartbeat_s, self.sync_s, 1.0)):
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat_s
                    try:
                        beats += 1
                        _label(client, self.flow_run_id, {HEARTBEAT_LABEL: f"{beats}@{time.strftime('%H:%M:%S')}"})
                        state = client.read_flow_run(self.flow_run_id).state
                    except Exception as e:  # noqa: BLE001 - an API hiccup: try again at the next beat
                        self.log.warning("heartbeat failed: %s", e)
                        state = None
                    if state is not None and state.type != StateType.RUNNING:
                        self.fenced = f"the flow run is {state.name} ({state.message or 'given up'})"
                        self.log.error("stopping the stage: %s", self.fenced)
                        stop_process_group(self.proc)
                        return
                if now >= next_sync:
                    next_sync = now + self.sync_s
                    self._mirror()


def stop_process_group(proc, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group of `proc` (started with a new session), SIGKILL it after `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: it ignored SIGTERM
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _mismatch(message: str) -> BusError:
    return BusError(message, transient=False)


def _run_here(stage: str, commit: str, params_yaml: str, upstream_lock: dict, upstream_files: dict, namespace: str,
              remote: str | None, env: dict, force: bool, repo: Path, flow_run_id: str, watch: _Watch, log) -> dict:
    head = git(repo, "rev-parse", "HEAD")
    if head != commit:
        raise _mismatch(f"this worker's checkout {repo} is at commit {head[:12]}, the coordinator's at "
                        f"{commit[:12]}: bring it there (`git fetch && git checkout {commit[:12]}`)")
    specs = stage_specs(repo)
    if stage not in specs:
        raise _mismatch(f"{repo}/dvc.yaml has no stage {stage!r} (stages: {', '.join(sorted(specs))})")
    spec = specs[stage]
    dirty = uncommitted(repo, [d for d in source_deps(specs, stage) if d != "params.yaml"])
    if dirty:
        raise _mismatch(f"the checkout {repo} has local changes to deps of {stage}: {'; '.join(dirty)}")
    params = repo / "params.yaml"
    if not params.exists() or params.read_text() != params_yaml:
        params.write_text(params_yaml)
        log.info("params.yaml set to the coordinator's")

    bus = ArtifactBus(repo, remote)
    merge_lock_entries(repo, upstream_lock)
    ups = producers(specs, stage)
    bus.pull_cached([o.path for outs in ups.values() for o in outs if o.cached])
    bus.get_files(upstream_files, [o.path for outs in ups.values() for o in outs if not o.cached])
    log.info("deps of %s pulled from remote %r", stage, bus.name)

    persist = [o.path for o in spec.outs if o.persist]
    state_parts = ("runs", namespace, stage, "state.json")
    if persist:
        state = bus.get_json(*state_parts)
        if state:
            bus.get_files(state["files"], persist)
            log.info("persistent outputs restored from the remote (%d files, mirrored by %s at %s)",
                     len(state["files"]), state.get("worker"), state.get("time"))

        def sync() -> None:
            files = bus.put_files(persist, skip_hidden=True)
            bus.put_json({"files": files, "worker": worker_name(), "flow_run": flow_run_id,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, *state_parts)

        watch.start_sync(sync)
    proc_box: list = []
    try:
        summary = run_repro(stage, str(repo), {**env, WORKER_ENV: worker_name(), FLOW_RUN_ENV: flow_run_id}, force, log,
                            on_start=lambda p: (proc_box.append(p), watch.attach(p)), new_session=True)
    finally:
        if proc_box:
            stop_process_group(proc_box[0])  # still running only when this flow run is being torn down
        watch.final_sync()  # what a retry resumes from; after success, the final state
    if watch.fenced:
        raise BusError(f"stopped: {watch.fenced}")

    bus.push_cached([stage])
    files = bus.put_files([o.path for o in spec.outs if not o.cached])
    entry = read_lock(repo).get(stage)
    if entry is None:
        raise BusError(f"dvc repro left no dvc.lock entry for {stage} in {repo}")
    if watch.fenced:
        raise BusError(f"stopped: {watch.fenced}")
    result = {"stage": stage, "lock": entry, "files": files, "worker": worker_name(), "host": socket.gethostname(),
              "flow_run": flow_run_id, "status": summary["status"], "seconds": summary["seconds"]}
    bus.put_json(result, "runs", namespace, stage, f"result-{flow_run_id}.json")
    log.info("%s %s on %s in %.1fs; outputs pushed to remote %r", stage, summary["status"], worker_name(),
             summary["seconds"], bus.name)
    return {k: result[k] for k in ("stage", "status", "seconds", "worker", "flow_run")}


@flow(name=STAGE_FLOW, persist_result=False)
def stage_flow(stage: str, commit: str, params_yaml: str, upstream_lock: dict, upstream_files: dict, namespace: str,
               remote: str | None = None, env: dict | None = None, force: bool = False,
               heartbeat_seconds: float = HEARTBEAT_S, sync_every_seconds: float = SYNC_S,
               repo: str = ".") -> dict:
    """Run one stage of a distributed pipeline run on this worker (dispatched by the coordinator; see the module
    docstring). The checkout is the working directory (`$STEPWISE_REPO` in the deployment's pull step)."""
    from prefect.client.orchestration import get_client

    log = get_run_logger()
    flow_run_id = str(runtime_flow_run.id)
    with get_client(sync_client=True) as client:
        _label(client, flow_run_id, {WORKER_LABEL: worker_name(), STAGE_LABEL: stage})
    log.info("%s on worker %s (%s), checkout %s", stage, worker_name(), socket.gethostname(), Path(repo).resolve())
    watch = _Watch(flow_run_id, heartbeat_seconds, sync_every_seconds, log)
    watch.start()
    try:
        return _run_here(stage, commit, params_yaml, upstream_lock or {}, upstream_files or {}, namespace, remote,
                         env or {}, force, Path(repo).resolve(), flow_run_id, watch, log)
    except (StageFailed, BusError) as e:
        if watch.fenced:
            raise BusError(f"stopped: {watch.fenced}") from None
        if not e.transient:
            with get_client(sync_client=True) as client:
                _label(client, flow_run_id, {TRANSIENT_LABEL: "false"})
        raise
    finally:
        watch.stop()


# ------------------------------------------------------------------------------------------ the coordinator side

@dataclass
class Dispatch:
    """What every dispatch of one distributed pipeline run shares."""
    repo: str
    deployment: str
    remote: str  # the remote's name (the same name on every machine)
    namespace: str  # runs/<namespace>/ on the remote: the pipeline run
    commit: str
    env: dict
    patterns: list[str] | None = None  # the stages to dispatch (globs); None: every foreach stage
    force: bool = False
    heartbeat_s: float = HEARTBEAT_S
    lost_after_s: float = LOST_AFTER_S
    sync_s: float = SYNC_S
    poll_s: float = POLL_S
    timeout_s: float | None = None
    slots: threading.BoundedSemaphore | None = field(default=None, repr=False)

    def dispatches(self, stage: str) -> bool:
        import fnmatch

        if self.patterns is None:
            return group_of(stage) is not None
        return any(fnmatch.fnmatchcase(stage, p) for p in self.patterns)


def ensure_deployment(client, name: str, pool: str, log) -> None:
    """Use deployment `name` (it must send runs to `pool`); register it on `pool` when it does not exist yet."""
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    try:
        dep = client.read_deployment_by_name(name)
    except ObjectNotFound:
        dep = None
    if dep is not None:
        if dep.work_pool_name != pool:
            raise BusError(f"deployment {name} sends its runs to work pool {dep.work_pool_name!r}, not {pool!r}: "
                           f"pass --pool {dep.work_pool_name}, or another --deployment", transient=False)
        return
    flow_name, _, dep_name = name.partition("/")
    if flow_name != STAGE_FLOW or not dep_name:
        raise BusError(f"deployment {name!r} not found; name one of flow {STAGE_FLOW!r} "
                       f"(e.g. {STAGE_DEPLOYMENT}), or run `prefect deploy --all`", transient=False)
    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise BusError(f"work pool {pool!r} not found: `prefect work-pool create {pool} --type process`",
                       transient=False) from None
    flow_id = client.create_flow_from_name(STAGE_FLOW)
    client.create_deployment(flow_id=flow_id, name=dep_name, work_pool_name=pool, entrypoint=STAGE_ENTRYPOINT,
                             pull_steps=PULL_STEPS, parameter_openapi_schema=parameter_schema(
                                 stage_flow.fn).model_dump_for_openapi(),
                             description="One stage of a distributed pipeline run (flows/distributed.py).",
                             tags=["stepwise"])
    log.info("registered deployment %s on work pool %s", name, pool)


def prepare_dispatch(repo: str, pool: str, deployment: str, remote: str | None, namespace: str, env: dict,
                     **options) -> Dispatch:
    """Check the setup (a Prefect server, the deployment, the DVC remote, a commit) and return the Dispatch."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    log = get_run_logger()
    if not PREFECT_API_URL.value():
        raise BusError("a distributed run needs a Prefect server that the workers reach: set PREFECT_API_URL "
                       "(docs/orchestration.md)", transient=False)
    bus = ArtifactBus(repo, remote)
    commit = git(repo, "rev-parse", "HEAD")
    with get_client(sync_client=True) as client:
        ensure_deployment(client, deployment, pool, log)
        online = [w.name for w in client.read_workers_for_work_pool(pool) if str(w.status).upper().endswith("ONLINE")]
    if not online:
        log.warning("no worker of work pool %s is online: dispatched stages wait until one starts "
                    "(`prefect worker start --pool %s`)", pool, pool)
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if uri.partition(":")[0] in ("", "sqlite", "file"):
        log.warning("MLFLOW_TRACKING_URI=%r is local to this machine: workers log their stages to their own store; "
                    "set it to a tracking server all machines reach to get one parent run", uri or "(unset)")
    max_parallel = options.pop("max_parallel", None)
    plan = Dispatch(repo=repo, deployment=deployment, remote=bus.name, namespace=namespace, commit=commit, env=env,
                    slots=threading.BoundedSemaphore(max_parallel) if max_parallel else None, **options)
    log.info("distributed: %s via deployment %s (pool %s, workers online: %s), artifacts through DVC remote %r (%s)",
             "foreach stages" if plan.patterns is None else ", ".join(plan.patterns), deployment, pool,
             ", ".join(online) or "none", bus.name, bus.root)
    return plan


def _changes(repo: str, stage: str) -> dict:
    """`dvc status --json <stage>`: {} when the stage is up to date in `repo`."""
    import json

    return json.loads(run_dvc(repo, "status", "--json", stage) or "{}")


def _await(client, flow_run_id, stage: str, plan: Dispatch, log):
    """Poll the flow run until it is final; a Pending/Running run with no sign of life (state change or heartbeat)
    for lost_after_s is marked Crashed. Returns the final FlowRun."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    waiting = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)
    start = last_life = time.monotonic()
    last_sign = None
    while True:
        fr = client.read_flow_run(flow_run_id)
        state = fr.state
        if state is not None and state.is_final():
            return fr
        sign = (state and state.type, state and state.timestamp, (fr.labels or {}).get(HEARTBEAT_LABEL))
        now = time.monotonic()
        if sign != last_sign:
            last_sign, last_life = sign, now
        if state is not None and state.type in waiting and now - last_life > plan.lost_after_s:
            worker = (fr.labels or {}).get(WORKER_LABEL, "its worker")
            msg = (f"lost: no heartbeat from {worker} for {now - last_life:.0f}s (flow run {fr.name}, "
                   f"{state.name})")
            client.set_flow_run_state(flow_run_id, Crashed(message=f"stepwise coordinator: {msg}"), force=True)
            raise RemoteStageFailed(stage, msg, transient=True)
        if plan.timeout_s is not None and now - start > plan.timeout_s:
            from prefect.states import Cancelled

            client.set_flow_run_state(flow_run_id, Cancelled(message="stepwise coordinator: timed out"), force=True)
            raise RemoteStageFailed(stage, f"not finished after {plan.timeout_s:.0f}s (flow run {fr.name}, "
                                    f"{state.name if state else 'no state'}): cancelled", transient=False)
        time.sleep(plan.poll_s)


def _collect(bus: ArtifactBus, specs, stage: str, plan: Dispatch, flow_run_id: str) -> dict:
    """Bring a finished remote stage's outputs into the coordinator's workspace and its entry into dvc.lock."""
    result = bus.get_json("runs", plan.namespace, stage, f"result-{flow_run_id}.json")
    if result is None:
        raise RemoteStageFailed(stage, f"flow run {flow_run_id} completed but left no result on remote {bus.name!r}",
                                transient=True)
    spec = specs[stage]
    bus.get_files(result["files"], [o.path for o in spec.outs if not o.cached])
    merge_lock_entries(plan.repo, {stage: result["lock"]})
    bus.pull_cached([stage])
    changed = _changes(plan.repo, stage)
    if changed:
        raise RemoteStageFailed(stage, "after collecting its outputs, `dvc status` still finds it changed: the "
                                f"worker ran it on other inputs than this checkout's: {changed}", transient=False)
    return result


@task(name="dispatch", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False,
      retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_S, retry_condition_fn=_retry_if_transient)
def run_remote_stage(stage: str, plan: Dispatch) -> dict:
    """Run `stage` as a flow run of the stage deployment, wait for it, and bring its outputs back (see above)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment

    log = get_run_logger()
    attempt = runtime_task_run.run_count
    start = time.monotonic()
    with plan.slots or nullcontext():
        if not plan.force and not _changes(plan.repo, stage):
            log.info("%s is up to date here: not dispatched", stage)
            return {"stage": stage, "status": "up to date", "seconds": 0.0, "attempts": attempt}
        specs = stage_specs(plan.repo)
        dirty = uncommitted(plan.repo, [d for d in source_deps(specs, stage) if d != "params.yaml"])
        if dirty:
            raise RemoteStageFailed(stage, "deps that workers get through git differ from commit "
                                    f"{plan.commit[:12]}: commit them first: {'; '.join(dirty)}", transient=False)
        ups = producers(specs, stage)
        lock = read_lock(plan.repo)
        missing = [s for s in ups if specs[s].in_lock and s not in lock]
        if missing:
            raise RemoteStageFailed(stage, f"its upstream stages {missing} have no dvc.lock entry: run them first",
                                    transient=False)
        bus = ArtifactBus(plan.repo, plan.remote)
        bus.push_cached([o.path for outs in ups.values() for o in outs if o.cached])
        upstream_files = bus.put_files([o.path for outs in ups.values() for o in outs if not o.cached])
        params_yaml = (Path(plan.repo) / "params.yaml").read_text()
        parameters = {"stage": stage, "commit": plan.commit, "params_yaml": params_yaml,
                      "upstream_lock": {s: lock[s] for s in ups if s in lock}, "upstream_files": upstream_files,
                      "namespace": plan.namespace, "remote": plan.remote, "env": plan.env, "force": plan.force,
                      "heartbeat_seconds": plan.heartbeat_s, "sync_every_seconds": plan.sync_s}
        fr = run_deployment(plan.deployment, parameters=parameters, timeout=0, as_subflow=True,
                            flow_run_name=f"{stage} (attempt {attempt})", tags=["stepwise", stage],
                            idempotency_key=f"{plan.env.get('STEPWISE_PREFECT_FLOW_RUN')}:{stage}:{attempt}")
        log.info("%s dispatched as flow run %s (%s), attempt %d", stage, fr.name, fr.id, attempt)
        with get_client(sync_client=True) as client:
            final = _await(client, fr.id, stage, plan, log)
        state, labels = final.state, final.labels or {}
        worker = labels.get(WORKER_LABEL, "?")
        if state.type == StateType.COMPLETED:
            result = _collect(bus, specs, stage, plan, str(fr.id))
            log.info("%s %s on worker %s; outputs collected", stage, result["status"], result["worker"])
            return {"stage": stage, "status": f"{result['status']} on {result['worker']}", "worker": result["worker"],
                    "flow_run": str(fr.id), "seconds": round(time.monotonic() - start, 1), "attempts": attempt}
        transient = state.type == StateType.CRASHED or (state.type == StateType.FAILED
                                                         and labels.get(TRANSIENT_LABEL) != "false")
        raise RemoteStageFailed(stage, f"flow run {final.name} on worker {worker} ended {state.name}: "
                                f"{state.message or ''}", transient=transient)
