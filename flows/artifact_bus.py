"""The DVC remote as the artifact bus of a distributed pipeline run (no Prefect here: see flows/distributed.py).

What a dispatched stage needs goes up to the remote before it runs, what it produced comes back after, and its
persistent outputs (checkpoints) are mirrored there while it runs, so that a retry on another machine resumes.

Cached outputs travel with `dvc push` / `dvc pull`: the remote holds them exactly as a single-machine `dvc push`
leaves them. Uncached outputs (`cache: false`: metrics, plots, checkpoint folders) are not in DVC's cache, so
`dvc push` skips them; they travel as files addressed by their md5 under the remote's `stepwise/` prefix, which DVC
neither reads nor garbage-collects:

    <remote>/stepwise/files/<md5[:2]>/<md5[2:]>                        uncached output files, by content
    <remote>/stepwise/runs/<namespace>/<stage>/state.json              persistent outputs as last mirrored
    <remote>/stepwise/runs/<namespace>/<stage>/result-<flow run>.json  a finished stage: its dvc.lock entry, files

Any DVC remote works (S3, GCS, SSH, a local or network folder): the files go through the remote's own filesystem,
with the credentials `dvc remote modify` gave it on that machine.

dvc.lock has one writer per checkout: `merge_lock_entries` writes whole stage entries under DVC's repo lock (the
one `dvc repro` holds while it writes dvc.lock), so it never interleaves with a `dvc repro` of the same checkout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PREFIX = "stepwise"
CHUNK = 1 << 20
DIR = "dir"  # the manifest value of a folder


class BusError(RuntimeError):
    """Moving artifacts through the remote failed. `transient`: whether trying again (elsewhere) could help."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


def dvc_command() -> list[str]:
    """DVC from this interpreter's environment (not whatever `dvc` is first on PATH)."""
    return [sys.executable, "-m", "dvc"]


def run_dvc(repo: str | os.PathLike, *args: str, transient: bool = True) -> str:
    """`dvc --wait-for-lock <args>` in `repo`; its stdout, or BusError with the tail of its stderr."""
    proc = subprocess.run([*dvc_command(), "--wait-for-lock", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise BusError(f"`dvc {' '.join(args)}` in {repo} failed (exit {proc.returncode}):\n{tail}", transient)
    return proc.stdout


def git(repo: str | os.PathLike, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BusError(f"`git {' '.join(args)}` in {repo} failed: {proc.stderr.strip()}", transient=False)
    return proc.stdout.strip()


# ------------------------------------------------------------------------------------------------ the stage graph

@dataclass(frozen=True)
class Out:
    path: str  # relative to the repo root, posix
    cached: bool
    persist: bool


@dataclass(frozen=True)
class StageSpec:
    name: str
    outs: tuple[Out, ...]
    deps: tuple[str, ...]  # file and folder deps (params files left out)
    in_lock: bool  # a dvc.yaml stage (it has a dvc.lock entry), not a `.dvc` file


def stage_specs(repo: str | os.PathLike) -> dict[str, StageSpec]:
    """Every stage of the repo (foreach stages expanded: 'finetune@0') with its outputs and file deps, from DVC."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    root = Path(repo).resolve()
    specs = {}
    with Repo(str(root)) as r:
        for st in r.index.stages:
            outs = tuple(Out(Path(o.fs_path).relative_to(root).as_posix(), bool(o.use_cache), bool(o.persist))
                         for o in st.outs)
            deps = tuple(Path(d.fs_path).relative_to(root).as_posix() for d in st.deps
                         if not isinstance(d, ParamsDependency))
            where = Path(st.path).relative_to(root).as_posix()  # dvc.yaml, or a .dvc file
            if isinstance(st, PipelineStage):
                name = st.name if where == "dvc.yaml" else f"{where}:{st.name}"  # as `dvc dag` names it from root
            else:
                name = where
            specs[name] = StageSpec(name, outs, deps, isinstance(st, PipelineStage))
    return specs


def overlaps(a: str, b: str) -> bool:
    """Whether one of two repo paths is, or is inside, the other."""
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


def producers(specs: dict[str, StageSpec], stage: str) -> dict[str, list[Out]]:
    """{upstream stage: its outputs that `stage`'s deps are, contain or lie in}."""
    found: dict[str, list[Out]] = {}
    for name, spec in specs.items():
        if name == stage:
            continue
        outs = [o for o in spec.outs if any(overlaps(o.path, d) for d in specs[stage].deps)]
        if outs:
            found[name] = outs
    return found


def source_deps(specs: dict[str, StageSpec], stage: str) -> list[str]:
    """The deps of `stage` that no stage produces: code and data that git carries to every machine."""
    produced = [o.path for s in specs.values() for o in s.outs]
    return [d for d in specs[stage].deps if not any(overlaps(d, p) for p in produced)]


def uncommitted(repo: str | os.PathLike, paths: list[str]) -> list[str]:
    """`git status` lines of those paths that differ from the checked-out commit (modified, new, untracked)."""
    if not paths:
        return []
    return [line for line in git(repo, "status", "--porcelain", "--untracked-files=all", "--", *paths).splitlines()
            if line.strip()]


# -------------------------------------------------------------------------------------------------------- dvc.lock

_LOCK_MERGE = threading.Lock()  # DVC's lock is per open file: threads of one process take turns here first


def read_lock(repo: str | os.PathLike) -> dict[str, dict]:
    """The stage entries of `repo`/dvc.lock ({} when there is none)."""
    import yaml

    path = Path(repo) / "dvc.lock"
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}


def merge_lock_entries(repo: str | os.PathLike, entries: dict[str, dict]) -> None:
    """Write these whole stage entries into `repo`/dvc.lock, under DVC's repo lock, keeping every other entry."""
    if not entries:
        return
    from dvc.repo import Repo, lock_repo
    from dvc.utils.serialize import modify_yaml

    with _LOCK_MERGE, Repo(str(Path(repo).resolve()), _wait_for_lock=True) as r, lock_repo(r):
        with modify_yaml(os.path.join(r.root_dir, "dvc.lock"), fs=r.fs) as data:
            if not data:
                data["schema"] = "2.0"
            data["stages"] = data.get("stages") or {}
            for name, entry in entries.items():
                data["stages"][name] = json.loads(json.dumps(entry))  # plain containers for the YAML dumper


# ---------------------------------------------------------------------------------------------------------- files

def md5_file(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tree_files(repo: str | os.PathLike, paths: list[str], skip_hidden: bool = False) -> dict[str, Path]:
    """{repo-relative posix path: absolute path} of every file at or under `paths` (missing paths give nothing).
    `skip_hidden` leaves out names starting with '.', e.g. the temp files of atomic writes still in progress."""
    root = Path(repo).resolve()
    found: dict[str, Path] = {}
    for rel in paths:
        p = root / rel
        if p.is_file():
            found[rel] = p
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                if skip_hidden:
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if not (skip_hidden and name.startswith(".")):
                        f = Path(dirpath) / name
                        found[f.relative_to(root).as_posix()] = f
    return dict(sorted(found.items()))


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class ArtifactBus:
    """One DVC remote of one checkout, as seen from this machine."""

    def __init__(self, repo: str | os.PathLike, remote: str | None = None):
        from dvc.repo import Repo

        self.repo = Path(repo).resolve()
        try:
            with Repo(str(self.repo)) as r:
                rem = r.cloud.get_remote(remote)
        except Exception as e:  # noqa: BLE001 - DVC's NoRemoteError and config errors, as one clear line
            hint = f"`dvc remote add {remote or '-d <name>'} <url>`" if not remote else \
                f"`dvc remote add {remote} <url>` (the same name on every machine)"
            raise BusError(f"no usable DVC remote {remote or '(default)'} in {self.repo}: "
                           f"{str(e).splitlines()[0]}; add one with {hint}", transient=False) from None
        self.name, self.fs, self.root = rem.name, rem.fs, rem.path
        self._md5: dict[tuple, str] = {}  # (path, size, mtime_ns) -> md5, so repeated mirroring rehashes nothing

    def key(self, *parts: str) -> str:
        return self.fs.join(self.root, PREFIX, *parts)

    def file_key(self, md5: str) -> str:
        return self.key("files", md5[:2], md5[2:])

    def _put(self, local: str | os.PathLike, key: str) -> None:
        """Upload a file so that readers see all of it or nothing (upload beside, then move into place)."""
        self.fs.makedirs(self.fs.parent(key), exist_ok=True)
        tmp = f"{key}.{uuid.uuid4().hex}.part"
        self.fs.put_file(os.fspath(local), tmp)
        self.fs.mv(tmp, key)

    def _hash(self, path: Path) -> str:
        st = path.stat()
        sig = (str(path), st.st_size, st.st_mtime_ns)
        if sig not in self._md5:
            self._md5[sig] = md5_file(path)
        return self._md5[sig]

    # ---- uncached outputs, by content
    def put_files(self, paths: list[str], skip_hidden: bool = False) -> dict[str, str]:
        """Upload every file at or under `paths` that the remote lacks; {repo path: md5} of all of them, plus
        {'<path>/': DIR} for each of `paths` that is a folder (so that an empty one comes back too)."""
        manifest = {f"{rel}/": DIR for rel in paths if (self.repo / rel).is_dir()}
        for rel, path in tree_files(self.repo, paths, skip_hidden).items():
            try:
                md5 = self._hash(path)
            except FileNotFoundError:  # replaced while we looked (a checkpoint rotated out): the next pass has it
                continue
            if not self.fs.exists(self.file_key(md5)):
                try:
                    self._put(path, self.file_key(md5))
                except FileNotFoundError:
                    continue
            manifest[rel] = md5
        return manifest

    def get_files(self, manifest: dict[str, str], mirror: list[str]) -> None:
        """Make each path in `mirror` hold exactly the manifest's files at or under it, checked against their md5."""
        root = self.repo
        for top in mirror:
            _clear(root / top)
        tops = [PurePosixPath(t) for t in mirror]
        for rel, md5 in manifest.items():
            at = PurePosixPath(rel)
            if not any(t == at or t in at.parents for t in tops):
                continue
            dest = root / rel
            if md5 == DIR:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
            try:
                self.fs.get_file(self.file_key(md5), os.fspath(tmp))
            except FileNotFoundError:
                raise BusError(f"{rel} (md5 {md5}) is missing from remote {self.name!r} "
                               f"({self.file_key(md5)})") from None
            if md5_file(tmp) != md5:
                tmp.unlink()
                raise BusError(f"{rel}: the copy from remote {self.name!r} does not match its md5 {md5}")
            os.replace(tmp, dest)

    # ---- small JSON records
    def put_json(self, obj: dict, *parts: str) -> None:
        key = self.key(*parts)
        tmp = self.repo / ".dvc" / "tmp" / f"stepwise-{uuid.uuid4().hex}.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
            self._put(tmp, key)
        finally:
            tmp.unlink(missing_ok=True)

    def get_json(self, *parts: str) -> dict | None:
        key = self.key(*parts)
        try:
            return json.loads(self.fs.cat_file(key))
        except FileNotFoundError:
            return None

    # ---- cached outputs, through DVC
    def push_cached(self, targets: list[str]) -> None:
        if targets:
            run_dvc(self.repo, "push", "--remote", self.name, *targets)

    def pull_cached(self, targets: list[str]) -> None:
        if targets:
            run_dvc(self.repo, "pull", "--remote", self.name, "--force", *targets)
