"""Atomic writes and checked loads: nothing is ever half-written, nothing corrupt is silently used.

Every write goes to a temp file beside the target, named `.<target>.<pid>@<host>.<random>.tmp`, and is renamed over
the target only once complete, so identical content always gives byte-identical files (torch files carry the fixed
archive name "archive", never the temp file's name). A writer killed mid-write leaves its temp file behind; the next
write of the same target removes it once its writer is provably dead (`remove_stale_temps`). A full disk raises
DiskFullError and leaves the old target as it was. `exclusive_dir_lock` keeps two trainers out of one output folder.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError, DataError, DiskFullError, OutputLockedError

FORMAT_KEY = "format"
STALE_TEMP_SECONDS = 3600  # a temp file whose writer cannot be checked (other host, old name) is stale after this
LOCK_NAME = ".lock"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "localhost"
# the part of a temp file's name after ".<target>.": "<pid>@<host>.<random>.tmp", or "<random>.tmp" (older writers)
_TEMP_TAIL = re.compile(r"(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.)?[A-Za-z0-9_]+\.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (an existing path or one of its ancestors)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def _disk_full(e: BaseException, path: Path) -> DiskFullError | None:
    """A one-line DiskFullError for an ENOSPC/EDQUOT OSError raised writing `path`, else None."""
    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
    try:
        mount = _mount_point(path.parent)
        free = f"{shutil.disk_usage(mount).free / 2**20:.0f} MiB free on {mount}"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"{what} writing {path} ({free}); free some space or point the output elsewhere, "
                         "then rerun (the previous file, if any, is unchanged)")


def _process_start_time(pid: int) -> float | None:
    """Unix time at which process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_alive(pid: int, last_write: float) -> bool:
    """Whether the process that last wrote a temp file at `last_write` (Unix time) as `pid` on this host still runs.

    A live process with that PID that started after the last write is a newer process that reused the PID.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: the PID exists and belongs to another user
        pass
    started = _process_start_time(pid)
    return started is None or started <= last_write + 2  # /proc/stat's boot time has 1 s resolution


def remove_stale_temps(path) -> list[Path]:
    """Delete the temp files that killed writers of `path` left beside it; return them.

    A temp file written on this host is stale when its writer's PID (in its name) is dead; one from another host, or
    from a writer that did not record its PID, when untouched for STALE_TEMP_SECONDS. A live writer's temp file is
    never removed, so concurrent writers of one target do not delete each other's work.
    """
    path = Path(path)
    prefix, removed = f".{path.name}.", []
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP_TAIL.fullmatch(entry.name[len(prefix):])
        if not m:
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if m["pid"] and m["host"] == _HOST:
            stale = not _writer_alive(int(m["pid"]), mtime)
        else:
            stale = time.time() - mtime > STALE_TEMP_SECONDS
        if stale:
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success fsync and rename it over `path`, on failure remove it.

    Stale temp files of `path` left by killed writers are removed first. ENOSPC/EDQUOT raise DiskFullError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        full = _disk_full(e, path)
        if full is None:
            raise
        raise full from None
    tmp = Path(tmp)
    try:
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = _disk_full(e, path)
        if full is not None:
            raise full from None
        raise


def save_torch(obj, path) -> None:
    """torch.save `obj` to `path` atomically; identical objects give byte-identical files."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # a file object, not a name: the archive is called "archive", not after the temp file


def write_json(obj, path) -> None:
    """Write `obj` as indented JSON with sorted keys to `path` atomically."""
    write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_text(text: str, path) -> None:
    """Write `text` to `path` atomically, UTF-8 encoded."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def clip(detail, limit: int = 200) -> str:
    """`detail` (e.g. an exception) as one line of at most `limit` characters, for quoting in an error message."""
    text = " ".join(str(detail).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def field_problem(obj: dict, fields: dict) -> str | None:
    """What is wrong with mapping `obj` given `fields` ({key: type or tuple of types}, each required), or None."""
    for key, types in fields.items():
        if key not in obj:
            return f"no {key!r} entry"
        if not isinstance(obj[key], types) or (isinstance(obj[key], bool) and bool not in _as_tuple(types)):
            names = " or ".join(t.__name__ for t in _as_tuple(types))
            return f"{key!r} is a {type(obj[key]).__name__}, expected {names}"
    return None


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def read_json(path, rebuild: str, error=DataError, fields: dict | None = None, fix: str | None = None) -> dict:
    """The JSON object in `path` (written by write_json); `error` naming the file and the command that writes it
    (`rebuild`, e.g. "dvc repro prepare") if it is missing, not UTF-8 JSON, not an object or lacks one of `fields`
    (see field_problem). `fix` replaces "rerun `<rebuild>`" as the advice for a corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found; run `{rebuild}`")
    fix = fix or f"rerun `{rebuild}`"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise error(f"{path}: not valid JSON ({type(e).__name__}: {clip(e)}); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}; {fix}")
    problem = field_problem(obj, fields or {})
    if problem:
        raise error(f"{path}: {problem}; {fix}")
    return obj


def load_torch(path, expected_format: str, error=CheckpointError, hint: str = "", fields: dict | None = None) -> dict:
    """Load a file written by save_torch with weights_only=True and check its format tag and `fields` (required keys
    and their types, see field_problem); raise `error` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found. {hint}".strip())
    with warnings.catch_warnings(record=True) as caught:  # e.g. "Detected pickle protocol 246" from random bytes
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, random bytes, pickle of a disallowed type, ...
            # torch's own text is not quoted: it advises weights_only=False, i.e. running whatever the file holds
            raise error(f"{path}: cannot be read ({type(e).__name__}): the file is truncated or corrupt, or was not "
                        f"written by stepwise. {hint}".strip()) from None
    for w in caught:  # a file that loads keeps its warnings; one that does not gets the one-line error alone
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(obj, dict) or obj.get(FORMAT_KEY) != expected_format:
        found = obj.get(FORMAT_KEY) if isinstance(obj, dict) else type(obj).__name__
        found = None if found is None else clip(found, 80)  # a corrupt tag may be anything, of any length
        raise error(f"{path}: expected a {expected_format!r} file, found {found!r}. {hint}".strip())
    problem = field_problem(obj, fields or {})
    if problem:
        raise error(f"{path}: {problem}: the file is corrupt or was not written by stepwise. {hint}".strip())
    return obj


def _lock_holder(fd: int) -> str:
    """'PID 1234' (plus ' on host h' from another host) as recorded in a held lock file, or 'another process'."""
    for _ in range(50):  # the holder writes its PID just after taking the lock: give it a moment
        fields = os.pread(fd, 256, 0).decode(errors="replace").split()
        if len(fields) >= 1 and fields[0].isdigit():
            host = f" on host {fields[1]}" if len(fields) > 1 and fields[1] != _HOST else ""
            return f"PID {fields[0]}{host}"
        time.sleep(0.01)
    return "another process"


@contextmanager
def exclusive_dir_lock(directory):
    """Hold an exclusive flock on `<directory>/.lock` (recording this PID and host) for the `with` block.

    A second holder, in another process or through another call in this one, fails at once with OutputLockedError
    naming the holder. The lock is released on exit and by the kernel when the holder dies; the lock file is deleted
    on a clean exit (a killed holder's file is taken over by the next holder).
    """
    import fcntl  # POSIX only: keep the rest of this module importable elsewhere

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputLockedError(f"{directory} is being written by {holder} (another `dvc repro`/trainer?); wait "
                                    f"for it or kill it") from None
        try:  # the previous holder may have deleted the file between our open and our flock: lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_HOST}\n".encode(), 0)
        yield lock
    finally:
        Path(lock).unlink(missing_ok=True)  # while still locked, so no one else holds this file
        os.close(fd)
