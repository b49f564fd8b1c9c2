"""Shared fixtures. Every test gets its own MLflow store and Prefect home; nothing touches the user's."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if "mlflow" in sys.modules:  # an earlier test's mlflow.set_tracking_uri would win over the environment
        sys.modules["mlflow"].set_tracking_uri(uri)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    torch.manual_seed(0)


def pipeline_copy(dest: Path, overrides: list[str]) -> Path:
    """A git+DVC working copy of this repo's tracked pipeline files at `dest`, params composed with `overrides`."""
    from stages.compose import compose

    for name in ("conf", "stages", "stepwise", "flows", "dvc.yaml", ".dvcignore", "pyproject.toml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, dest / name)
    (dest / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    (dest / "params.yaml").write_text(compose(overrides))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def run(cmd: list[str], cwd: Path, timeout: int = 600, check: bool = True, env: dict | None = None):
    """Run a command, returning the CompletedProcess; on failure show its output."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(cwd), **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded; oversubscribed threads on a shared 2-core box are 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ci_repro(tmp_path_factory):
    """One `dvc repro` of the whole pipeline on the ci preset in a temp git+DVC copy, shared by the end-to-end tests.

    Returns (repo, env) with env pointing MLflow at the copy's own store. Tests may add files to the copy but must
    leave its tracked files and DVC outputs as they found them.
    """
    root = tmp_path_factory.mktemp("ci_repro")
    dest = pipeline_copy(root / "repo", ["experiment=ci"])
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    run(["dvc", "repro"], dest, env=env, timeout=1800)
    return dest, env
