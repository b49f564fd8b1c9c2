"""Torch CPU threads per stage process, so that stages running at the same time share the cores.

Each stepwise stage process registers its PID in a per-user directory under the system temp dir (one small file per
process, removed on exit; entries of dead processes are removed by whoever sees them). The thread count a stage uses is

    threads = max(1, cores available to this process (os.sched_getaffinity) // live registered stage processes)

unless the environment says otherwise: STEPWISE_THREADS sets it outright, else an explicit OMP_NUM_THREADS is used
as is. torch.set_num_threads can change at run time, so a long loop calls `refresh()` now and then to rebalance when
another stage starts or ends.

    with stage_threads():          # once, in the stage entry point
        for step in ...:
            if step % 50 == 0:
                refresh()
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError

REGISTRY_ENV = "STEPWISE_PROCESS_REGISTRY"  # overrides the registry directory (tests, containers sharing /tmp)
THREADS_ENV = "STEPWISE_THREADS"

_active: "ThreadBudget | None" = None


def registry_dir() -> Path:
    """$STEPWISE_PROCESS_REGISTRY, else <system temp dir>/stepwise-<uid>/procs."""
    env = os.environ.get(REGISTRY_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / f"stepwise-{os.getuid()}" / "procs"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _start_time(pid: int) -> str:
    """The process start time in clock ticks since boot (/proc/<pid>/stat field 22): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]  # fields after the parenthesised name start at field 3


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not start or _start_time(pid) in ("", start)


def live_processes(directory: Path | None = None) -> list[int]:
    """PIDs of the registered stage processes still running; files of dead (or reused) PIDs are removed."""
    directory = directory or registry_dir()
    live = []
    for entry in directory.glob("*.pid") if directory.is_dir() else []:
        try:
            pid, start = int(entry.stem), entry.read_text().strip()
        except (ValueError, OSError):
            continue  # being written, or not ours
        if _alive(pid, start):
            live.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return sorted(live)


def fair_share(cores: int, processes: int) -> int:
    """Threads per process when `processes` processes split `cores` cores: cores // processes, at least 1."""
    return max(1, cores // max(1, processes))


def _env_threads(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r} must be a positive integer number of threads")
    return int(raw)


def choose_threads(directory: Path | None = None) -> tuple[int, str]:
    """(threads, reason): STEPWISE_THREADS, else OMP_NUM_THREADS, else the fair share of this process's cores."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = _env_threads(name)
        if value is not None:
            return value, name
    cores, procs = available_cores(), len(live_processes(directory))
    return fair_share(cores, procs), f"{cores} cores / {max(1, procs)} stage processes"


class ThreadBudget:
    """This process's entry in the registry and the torch thread count derived from it."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or registry_dir()
        self.path = self.directory / f"{os.getpid()}.pid"
        self.previous = torch.get_num_threads()
        self.threads, self.reason = self.previous, "not registered"

    def register(self) -> "ThreadBudget":
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(_start_time(os.getpid()))
        os.replace(tmp, self.path)  # never seen half-written
        self.refresh()
        return self

    def refresh(self) -> int:
        """Recount the live stage processes and set torch's thread count accordingly; returns it."""
        self.threads, self.reason = choose_threads(self.directory)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        torch.set_num_threads(self.previous)


@contextmanager
def stage_threads(directory: Path | None = None):
    """Register this process as a running stage for the duration and set its torch threads; yields the budget.

    Re-entrant: inside an active stage it yields that stage's budget and changes nothing."""
    global _active
    if _active is not None:
        yield _active
        return
    budget = ThreadBudget(directory).register()
    _active = budget
    try:
        yield budget
    finally:
        _active = None
        budget.release()


def refresh() -> int:
    """Rebalance the active stage's threads (see stage_threads); outside a stage, torch's current count, unchanged."""
    return _active.refresh() if _active is not None else torch.get_num_threads()
