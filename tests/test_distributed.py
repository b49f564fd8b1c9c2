"""Distributed pipeline runs for real, on one machine (flows/distributed.py, flows/artifact_bus.py).

A Prefect server on 127.0.0.1, a process work pool, and two workers, each in its own fresh `git clone` (standing in
for two machines: they share nothing but the server and a DVC remote folder). The coordinator is
`python -m flows.pipeline --distributed` in a third clone; the pipeline is the `experiment=ci` preset.

The CI test runs the stages up to `finetune@*` (about 3 minutes on 2 cores). The slow test runs the whole pipeline,
kills the worker that holds a group mid-training and compares every metric with a single-machine `dvc repro`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import pipeline_copy

PY = sys.executable
TIMING_KEYS = ("seconds", "per_second", "speedup", "throughput", "latency")  # wall-clock: differ in any two runs


# ---------------------------------------------------------------------------------------------------------- helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started and everything under it (a worker and its flow runs and stages): a lost
    machine."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def _clone(origin: Path, dest: Path, remote: Path) -> Path:
    """A fresh clone of `origin` whose default DVC remote (`bus`, in .dvc/config.local) is the remote folder."""
    _run(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    _run([PY, "-m", "dvc", "remote", "add", "--local", "-d", "bus", str(remote)], dest)
    return dest


def _metrics(repo: Path, names: list[str] | None = None) -> dict[str, dict]:
    """{metrics file: its values less the wall-clock ones}."""
    out = {}
    for path in sorted((repo / "metrics").glob("*.json")):
        if names is None or path.name in names:
            data = json.loads(path.read_text())
            out[path.name] = {k: v for k, v in data.items() if not any(t in k for t in TIMING_KEYS)}
    return out


def _results(remote: Path, pipeline_run: str, stage: str) -> list[dict]:
    """What the workers reported for `stage` in this pipeline run (one per successful attempt)."""
    folder = remote / "stepwise" / "runs" / pipeline_run / stage
    return [json.loads(p.read_text()) for p in sorted(folder.glob("result-*.json"))]


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _mlflow_stage_runs(uri: str, pipeline_run: str) -> tuple[list, dict]:
    """(the parent runs tagged with this pipeline run, {stage: [its child runs]})."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("stepwise")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("stepwise.pipeline") == pipeline_run]
    ids = {p.info.run_id for p in parents}
    children: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") in ids:
            children.setdefault(r.data.tags.get("stage"), []).append(r)
    return parents, children


def _stage_flow_runs(api: str) -> list:
    """Every flow run of the stage flow on the server, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["stepwise-stage"])),
                                     sort=FlowRunSort.START_TIME_ASC, limit=200)


class Cluster:
    """The server, a work pool, the workers and the shared remote of one test."""

    def __init__(self, api: str, root: Path, overrides: list[str]):
        self.api, self.root = api, root
        self.pool = f"gpu-{uuid.uuid4().hex[:8]}"
        self.remote = root / "remote"
        self.remote.mkdir()
        self.origin = pipeline_copy(root / "origin", overrides)
        self.coord = _clone(self.origin, root / "coordinator", self.remote)
        self.mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"  # one store all "machines" reach, like a server
        self.workers: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.logs: dict[str, Path] = {}
        _run([PY, "-m", "prefect", "work-pool", "create", self.pool, "--type", "process"], root, self.env("pool"))

    def env(self, who: str) -> dict:
        return {"PREFECT_API_URL": self.api, "PREFECT_HOME": str(self.root / f"prefect-{who}"),
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def start_worker(self, name: str) -> None:
        clone = _clone(self.origin, self.root / name, self.remote)
        log = self.root / f"{name}.log"
        env = {**os.environ, **self.env(name), "STEPWISE_REPO": str(clone), "STEPWISE_WORKER": name,
               "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
        env.pop("MLFLOW_TRACKING_URI", None)  # the coordinator passes its own to every stage
        with open(log, "w") as f:
            proc = subprocess.Popen([PY, "-m", "prefect", "worker", "start", "--pool", self.pool, "--type", "process",
                                     "--limit", "1", "--name", name], cwd=clone, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.workers[name], self.logs[name] = (proc, clone), log

    def kill_worker(self, name: str) -> None:
        _kill_tree(self.workers[name][0])

    def close(self) -> None:
        for proc, _ in self.workers.values():
            if proc.poll() is None:
                _kill_tree(proc)

    def coordinator(self, *args: str) -> subprocess.Popen:
        env = {**os.environ, **self.env("coordinator"), "MLFLOW_TRACKING_URI": self.mlflow_uri}
        return subprocess.Popen([PY, "-m", "flows.pipeline", "--distributed", "--pool", self.pool, *args],
                                cwd=self.coord, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def log_tails(self) -> str:
        return "\n".join(f"--- {n} ---\n" + "\n".join(p.read_text().splitlines()[-30:]) for n, p in self.logs.items())


def _finish(proc: subprocess.Popen, timeout: float, cluster: Cluster) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, _ = proc.communicate()
        pytest.fail(f"the coordinator did not finish in {timeout}s:\n{out[-6000:]}\n{cluster.log_tails()}")
    assert proc.returncode == 0, f"coordinator exit {proc.returncode}:\n{out[-8000:]}\n{cluster.log_tails()}"
    return out


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 (its own home and SQLite database); yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=home, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill_tree(proc)
                pytest.fail(f"the Prefect server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield api
    _kill_tree(proc)


@pytest.fixture
def cluster_factory(prefect_server, tmp_path):
    made: list[Cluster] = []

    def make(overrides: list[str], workers=("w1", "w2")) -> Cluster:
        c = Cluster(prefect_server, tmp_path, overrides)
        made.append(c)
        for name in workers:
            c.start_worker(name)
        return c

    yield make
    for c in made:
        c.close()


# ------------------------------------------------------------------------------- the artifact bus (no server)

BUS_DVC_YAML = """\
stages:
  base:
    cmd: python -c "open('base.txt', 'w').write('base')"
    outs: [base.txt]
  group:
    foreach: [a, b]
    do:
      cmd: python group.py ${item}
      deps: [base.txt, group.py]
      outs:
        - out/${item}/model.txt
        - out/${item}/ckpt:
            persist: true
            cache: false
      metrics:
        - metrics/${item}.json:
            cache: false
"""
GROUP_PY = """\
import json, os, sys
item = sys.argv[1]
os.makedirs(f"out/{item}/ckpt", exist_ok=True)
os.makedirs("metrics", exist_ok=True)
open(f"out/{item}/ckpt/step_1.txt", "w").write(item)
open(f"out/{item}/model.txt", "w").write(open("base.txt").read() + "+" + item)
json.dump({"item": item}, open(f"metrics/{item}.json", "w"))
"""


@pytest.fixture
def bus_repos(tmp_path):
    """(coordinator checkout, worker clone, remote folder) of a tiny foreach pipeline; `base` already ran."""
    from flows.artifact_bus import run_dvc

    origin = tmp_path / "coordinator"
    origin.mkdir()
    (origin / "dvc.yaml").write_text(BUS_DVC_YAML)
    (origin / "group.py").write_text(GROUP_PY)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [PY, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"]):
        _run(cmd, origin, env)
    remote = tmp_path / "remote"
    _run([PY, "-m", "dvc", "remote", "add", "--local", "-d", "bus", str(remote)], origin)
    worker = _clone(origin, tmp_path / "worker", remote)
    run_dvc(origin, "repro", "base")
    return origin, worker, remote


def test_stage_graph_from_dvc(bus_repos):
    from flows.artifact_bus import producers, source_deps, stage_specs

    coord, _, _ = bus_repos
    specs = stage_specs(coord)
    assert set(specs) == {"base", "group@a", "group@b"}
    a = specs["group@a"]
    assert [(o.path, o.cached, o.persist) for o in a.outs] == [
        ("out/a/model.txt", True, False), ("out/a/ckpt", False, True), ("metrics/a.json", False, False)]
    assert {s: [o.path for o in outs] for s, outs in producers(specs, "group@a").items()} == {"base": ["base.txt"]}
    assert source_deps(specs, "group@a") == ["group.py"]


def test_a_stage_goes_out_and_comes_back_through_the_remote(bus_repos):
    """The steps of a dispatch, without Prefect: the coordinator pushes the deps and sends the producers' lock
    entries; the worker merges them, pulls, runs the stage, pushes; the coordinator takes the files and the entry
    back, and its `dvc status` is clean, its dvc.lock entry the worker's own."""
    from flows.artifact_bus import ArtifactBus, merge_lock_entries, read_lock, run_dvc

    coord, worker, remote = bus_repos
    out = ArtifactBus(coord)
    assert out.name == "bus"
    out.push_cached(["base.txt"])
    merge_lock_entries(worker, {"base": read_lock(coord)["base"]})
    back = ArtifactBus(worker)
    back.pull_cached(["base.txt"])
    assert (worker / "base.txt").read_text() == "base"
    run_dvc(worker, "repro", "--single-item", "group@a")
    back.push_cached(["group@a"])
    (worker / "out/a/ckpt/empty").mkdir()  # DVC leaves empty folders out of a folder's hash: so do we
    files = back.put_files(["out/a/ckpt", "metrics/a.json"])
    assert sorted(files) == ["metrics/a.json", "out/a/ckpt/", "out/a/ckpt/step_1.txt"]
    assert (remote / "stepwise" / "files").is_dir()

    (coord / "out/a/ckpt").mkdir(parents=True)
    (coord / "out/a/ckpt/stale.txt").write_text("an older attempt's")  # the mirror leaves only the worker's files
    out.get_files(files, ["out/a/ckpt", "metrics/a.json"])
    merge_lock_entries(coord, {"group@a": read_lock(worker)["group@a"]})
    out.pull_cached(["group@a"])
    assert (coord / "out/a/model.txt").read_text() == "base+a"
    assert sorted(p.name for p in (coord / "out/a/ckpt").iterdir()) == ["step_1.txt"]
    assert json.loads(run_dvc(coord, "status", "--json", "group@a")) == {}
    assert read_lock(coord)["group@a"] == read_lock(worker)["group@a"]
    assert set(read_lock(coord)) == {"base", "group@a"}  # the merge kept the coordinator's own entry

    # an output folder that the stage left empty comes back as an empty folder, not as a deleted output
    for f in (worker / "out/a/ckpt").iterdir():
        if f.is_file():
            f.unlink()
    run_dvc(worker, "commit", "--force", "group@a")
    files = back.put_files(["out/a/ckpt", "metrics/a.json"])
    assert "out/a/ckpt/" in files and not any(k.startswith("out/a/ckpt/step") for k in files)
    out.get_files(files, ["out/a/ckpt", "metrics/a.json"])
    merge_lock_entries(coord, {"group@a": read_lock(worker)["group@a"]})
    assert (coord / "out/a/ckpt").is_dir()
    assert json.loads(run_dvc(coord, "status", "--json", "group@a")) == {}


def test_bus_refuses_a_corrupt_copy_and_a_missing_remote(bus_repos, tmp_path):
    from flows.artifact_bus import ArtifactBus, BusError

    coord, worker, remote = bus_repos
    files = ArtifactBus(coord).put_files(["base.txt"])
    (stored,) = [p for p in (remote / "stepwise" / "files").rglob("*") if p.is_file()]
    stored.write_text("tampered")
    with pytest.raises(BusError, match=r"base.txt: the copy from remote 'bus' does not match its md5"):
        ArtifactBus(worker).get_files(files, ["base.txt"])
    with pytest.raises(BusError, match=r"no usable DVC remote nope .*dvc remote add nope <url>") as info:
        ArtifactBus(worker, "nope")
    assert not info.value.transient


def test_dispatch_failures_are_retried_only_when_transient():
    from flows.distributed import RemoteStageFailed
    from flows.pipeline import _retry_if_transient

    class _State:
        def __init__(self, exc):
            self.data = exc

    assert _retry_if_transient(None, None, _State(RemoteStageFailed("finetune@0", "lost", transient=True)))
    assert not _retry_if_transient(None, None, _State(RemoteStageFailed("finetune@0", "exit 2", transient=False)))
    assert _retry_if_transient(None, None, _State(OSError("connection reset")))


# --------------------------------------------------------------------------------------------------------- the tests

def test_groups_run_on_workers_and_come_back(cluster_factory):
    """`finetune@*` with upstream, distributed: prepare/pretrain/profile/cluster run on the coordinator, each
    finetune@i as a flow run on a worker (its own clone); the coordinator's dvc.lock holds exactly the entries the
    workers wrote, `dvc status` is clean, the metrics equal a single-machine `dvc repro` of those stages on the same
    inputs, and every stage's MLflow run hangs under one parent."""
    c = cluster_factory(["experiment=ci"])
    run_name = f"ci-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    out = _finish(c.coordinator("--stages", "finetune@*", "--upstream", "--pipeline-run", run_name, "--retries", "1",
                                "--retry-delay", "0", "--heartbeat", "2", "--lost-after", "90", "--sync-every", "2",
                                "--remote-timeout", "300"), 450, c)
    seconds = time.monotonic() - t0
    groups = ["finetune@0", "finetune@1"]
    printed = {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines() if line.split()[:1]
               and line.split()[0] in groups}  # the coordinator's summary lines: "finetune@0   ran on w1"
    assert set(printed) == set(groups), out[-3000:]

    # each expert was trained by a worker, in that worker's clone, and the coordinator holds the same entry
    coord_lock = _lock(c.coord)
    for g in groups:
        results = _results(c.remote, run_name, g)
        assert len(results) == 1, results
        worker = results[0]["worker"]
        assert worker in ("w1", "w2") and printed[g] == f"ran on {worker}"
        clone = c.workers[worker][1]
        assert _lock(clone)[g] == coord_lock[g] == results[0]["lock"]
        assert f"Running stage '{g}'" not in out  # the coordinator's own log: it dispatched, it did not train
    for stage in ("prepare", "pretrain", "profile", "cluster"):
        assert stage in coord_lock
    status = _run([PY, "-m", "dvc", "status", "--json", *groups, "--with-deps"], c.coord)
    assert json.loads(status) == {}, status

    # a single-machine `dvc repro` of the same stages, from the same upstream outputs
    ref = _clone(c.origin, c.root / "reference", c.remote)
    lock = yaml.safe_load((c.coord / "dvc.lock").read_text())
    for g in groups:
        del lock["stages"][g]
    (ref / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    _run([PY, "-m", "dvc", "pull", "data/prepared", "models/unified/model.pt", "outputs/groups.json"], ref)
    t1 = time.monotonic()
    _run([PY, "-m", "dvc", "repro", "--single-item", *groups], ref, {**c.env("reference"),
                                                                      "MLFLOW_TRACKING_URI": f"sqlite:///{ref}/m.db"})
    ref_seconds = time.monotonic() - t1
    names = ["finetune_0.json", "finetune_1.json"]
    assert _metrics(c.coord, names) == _metrics(ref, names)
    assert len(_metrics(ref, names)) == 2

    # one MLflow parent for the whole distributed run, coordinator and worker stages alike
    parents, children = _mlflow_stage_runs(c.mlflow_uri, run_name)
    assert len(parents) == 1, [p.data.tags for p in parents]
    assert set(children) == {"prepare", "pretrain", "profile", "cluster", *groups}
    assert all(r.info.status == "FINISHED" for rs in children.values() for r in rs)

    print(f"distributed finetune@* with upstream: {seconds:.0f}s; single-machine reference: {ref_seconds:.0f}s")


@pytest.mark.slow
def test_whole_pipeline_survives_a_killed_worker(cluster_factory):
    """The whole ci pipeline distributed (finetune@i, prune@i on workers, one at a time: --max-parallel 1). The
    worker training a group is killed (with its flow run and stage) once that group has mirrored a checkpoint: the
    coordinator finds it lost, marks its flow run Crashed and dispatches the group again; the other worker resumes it
    from the checkpoint. The run finishes, `dvc status` is clean, and every metric equals a single-machine
    `dvc repro` in a fresh clone. Then a group that fails with a project error (exit 2) is not dispatched again."""
    c = cluster_factory(["experiment=ci", "tdc.finetune.steps=120", "+tdc.finetune.train.ckpt_every=10"])
    run_name = f"kill-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    proc = c.coordinator("--pipeline-run", run_name, "--retries", "2", "--retry-delay", "0", "--heartbeat", "2",
                         "--lost-after", "30", "--sync-every", "1", "--remote-timeout", "900", "--max-parallel", "1")

    # wait until a group has mirrored a checkpoint, then kill the worker running it
    deadline, victim, group = time.monotonic() + 900, None, None
    while victim is None:
        assert proc.poll() is None, proc.communicate()[0][-6000:]
        assert time.monotonic() < deadline, "no group mirrored a checkpoint"
        for g in ("finetune@0", "finetune@1"):
            state = c.remote / "stepwise" / "runs" / run_name / g / "state.json"
            try:
                record = json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            if any("/checkpoints/step_" in f for f in record["files"]):
                victim, group = record["worker"], g
                break
        time.sleep(0.2)
    c.kill_worker(victim)
    killed_at = time.monotonic() - t0
    out = _finish(proc, 1800, c)
    seconds = time.monotonic() - t0

    survivor = ({"w1", "w2"} - {victim}).pop()
    results = _results(c.remote, run_name, group)
    assert [r["worker"] for r in results] == [survivor], results
    resumed = json.loads((c.coord / "metrics" / f"finetune_{group[-1]}.json").read_text())["resumed_from_step"]
    assert resumed > 0, "the retry did not resume from the mirrored checkpoint"
    assert f"{group} (attempt 2)" in out and "lost: no heartbeat" in out
    runs = _stage_flow_runs(c.api)
    lost = [r for r in runs if r.state_name == "Crashed"]
    assert [(r.name, r.labels.get("stepwise.worker")) for r in lost] == [(f"{group} (attempt 1)", victim)]
    assert "lost: no heartbeat" in lost[0].state.message
    spans = sorted((r.start_time, r.end_time or r.state.timestamp) for r in runs if r.start_time)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), "--max-parallel 1 overlapped"
    status = _run([PY, "-m", "dvc", "status", "--json"], c.coord)
    assert json.loads(status) == {}, status
    for stage in [s for s in _lock(c.coord) if "@" in s]:
        assert all(r["worker"] in ("w1", "w2") for r in _results(c.remote, run_name, stage)), stage

    # the same pipeline by `dvc repro` on one machine, in a fresh clone
    ref = _clone(c.origin, c.root / "reference", c.remote)
    t1 = time.monotonic()
    _run([PY, "-m", "dvc", "repro"], ref, {**c.env("reference"), "MLFLOW_TRACKING_URI": f"sqlite:///{ref}/m.db"},
         timeout=2400)
    ref_seconds = time.monotonic() - t1
    got, want = _metrics(c.coord), _metrics(ref)
    assert set(got) == set(want) and len(got) >= 10
    for name in want:
        mine = {k: v for k, v in got[name].items() if k != "resumed_from_step"}
        theirs = {k: v for k, v in want[name].items() if k != "resumed_from_step"}
        assert mine == theirs, name

    parents, children = _mlflow_stage_runs(c.mlflow_uri, run_name)
    assert len(parents) == 1
    assert set(children) == set(_lock(c.coord))
    print(f"distributed whole pipeline: {seconds:.0f}s (worker {victim} killed at {killed_at:.0f}s during {group}); "
          f"single-machine dvc repro: {ref_seconds:.0f}s")

    # a project error (the stage exits 2: here an invalid tdc.finetune.init) fails the group without a retry
    params = yaml.safe_load((c.coord / "params.yaml").read_text())
    params["tdc"]["finetune"]["init"] = "no-such-init"
    (c.coord / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = c.coordinator("--stages", "finetune@0", "--pipeline-run", run_name, "--retries", "2", "--retry-delay", "0",
                         "--heartbeat", "2", "--lost-after", "60", "--remote-timeout", "200")
    bad, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, bad[-3000:]
    assert "not transient: not retried" in bad and "exited with 2" in bad, bad[-3000:]
    assert "attempt 2" not in bad, bad[-3000:]
