"""Progress people can see: ``tqdm`` bars on the command line, and log lines with rate and ETA
from the Dagster assets.

``progress(iterable)`` is a bar only when standard error is a terminal and ``quiet`` is not
set (``--quiet`` on the commands, or ``DEER_QUIET=1``); otherwise it returns the iterable
untouched, so logs and pipes stay clean. ``ProgressLog`` is for code that reports through a
logger (assets): it logs every ``every`` batches, with the rate and the estimated time left.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TypeVar

T = TypeVar("T")

LOG_EVERY_BATCHES = 10


def bars_enabled(quiet: bool | None = None) -> bool:
    """True when a progress bar would be seen: stderr is a terminal, ``quiet`` is not set and
    DEER_QUIET is not 1 (the commands' ``--quiet`` sets it for everything they call)."""
    from deer_pipeline.settings import quiet_progress

    if quiet or quiet_progress():
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             quiet: bool | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar when one would be seen, else ``iterable`` itself."""
    if not bars_enabled(quiet):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


class ProgressBar:
    """A manual bar (``update(n)``) that is a no-op when bars are off; a context manager."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", quiet: bool | None = None):
        self._bar = None
        if bars_enabled(quiet):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def set_quiet(quiet: bool) -> None:
    """``--quiet`` on a command: no bars from anything it calls (sets DEER_QUIET=1)."""
    if quiet:
        os.environ["DEER_QUIET"] = "1"


def write(line: str) -> None:
    """Print a line without breaking a progress bar that is on screen."""
    if bars_enabled():
        from tqdm import tqdm

        tqdm.write(line)
    else:
        print(line)


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0:      # NaN
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLog:
    """Log progress every ``every`` batches: done/total, rate and ETA.

    >>> p = ProgressLog(log.info, total=1000, what="crops", every=10)
    >>> for batch in batches: ...; p.batch_done(len(batch))
    """

    def __init__(self, log, total: int | None, what: str = "items", every: int = LOG_EVERY_BATCHES,
                 clock=time.monotonic):
        self.log, self.total, self.what, self.every = log, total, what, max(1, int(every))
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.batches = 0
        self.lines: list[str] = []

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            return (f"{self.what}: {self.done}/{self.total} ({self.done / self.total:.0%}), "
                    f"{rate:.1f}/s, ETA {format_duration(left)}")
        return f"{self.what}: {self.done} done, {rate:.1f}/s"

    def batch_done(self, n: int) -> None:
        self.done += int(n)
        self.batches += 1
        if self.batches % self.every == 0 or (self.total is not None and self.done >= self.total):
            text = self.line()
            self.lines.append(text)
            self.log(text)
