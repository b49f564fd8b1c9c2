"""Progress reporting that suits where the output goes: a live bar on a terminal, a line every ~30 s in a log.

`progress(iterable, desc=..., total=..., initial=...)` iterates like tqdm. On an interactive terminal it is a tqdm
bar (when tqdm is installed); otherwise (a `dvc repro` log piped to a file, CI) it writes one `log.info` line every
`interval` seconds and one at the end, so logs are not flooded with a line per step.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("stepwise.progress")
INTERVAL = 30.0  # seconds between two log lines when the output is not a terminal


class LogProgress:
    """A tqdm-like progress counter that logs `desc: n/total (rate/s, postfix)` at most every `interval` s."""

    def __init__(self, iterable=None, total: int | None = None, initial: int = 0, desc: str = "",
                 interval: float = INTERVAL, disable: bool = False, clock=time.monotonic):
        self.iterable, self.total, self.n, self.desc = iterable, total, initial, desc
        self.interval, self.disable, self.clock = interval, disable, clock
        self.start = self.last = clock()
        self.n0, self.postfix = initial, ""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = initial + len(iterable)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and self.clock() - self.last >= self.interval:
            self._emit()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self.disable and self.n > self.n0:
            self._emit()
            self.n0 = self.n  # closing twice logs once

    def _emit(self) -> None:
        self.last = now = self.clock()
        rate = (self.n - self.n0) / max(now - self.start, 1e-9)
        total = f"/{self.total}" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %d%s (%.3g it/s%s)", self.desc or "progress", self.n, total, rate, extra)


def interactive() -> bool:
    """Whether stderr is a terminal a person watches."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress(iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "", disable: bool = False):
    """A tqdm bar on a terminal, else a LogProgress (a line every ~30 s)."""
    if interactive():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, disable=disable)
