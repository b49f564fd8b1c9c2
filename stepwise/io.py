"""Atomic writes and checked loads: nothing is ever half-written, nothing corrupt is silently used."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError

FORMAT_KEY = "format"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success fsync and rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj, path) -> None:
    """torch.save `obj` to `path` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_json(obj, path) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(text: str, path) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_torch(path, expected_format: str, error=CheckpointError, hint: str = "") -> dict:
    """Load a file written by save_torch with weights_only=True and check its format tag; raise `error` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found. {hint}".strip())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of disallowed type, ...
        raise error(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    f"the file is truncated or corrupt. {hint}".strip()) from None
    if not isinstance(obj, dict) or obj.get(FORMAT_KEY) != expected_format:
        found = obj.get(FORMAT_KEY) if isinstance(obj, dict) else type(obj).__name__
        raise error(f"{path}: expected a {expected_format!r} file, found {found!r}. {hint}".strip())
    return obj
