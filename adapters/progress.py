"""Progress of a long command on a terminal (rich), and silence everywhere else.

    from sourceauth.adapters.progress import progress

    with progress("importing senders", total=None, unit="senders") as bar:
        for line in lines:
            ...
            bar.advance()          # or bar.update(done), bar(done), bar.set_total(n)

The bar is drawn on stderr only when stderr is a terminal; otherwise `progress` hands back a
ticker whose calls do nothing, so a command's output and logs stay clean in pipes, files and
cron mail. Advancing is cheap whatever the rate: the count lives in a plain integer and reaches
rich at most ten times a second (rich redraws twice a second on its own thread).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, TextIO

PUSH_EVERY = 0.1  # seconds between two hand-overs of the count to rich
REDRAWS_PER_SECOND = 2  # each redraw costs rich ~5 ms of CPU: 2 a second is ~1 % of a core


class Ticker(Protocol):
    """What a long loop calls: `advance(n)` by steps, `update(done)` or `ticker(done)` to an
    absolute count, `set_total(n)` once the total is known (None: unknown, a pulsing bar)."""

    def advance(self, n: int = 1) -> None: ...

    def update(self, done: int) -> None: ...

    def set_total(self, total: int | None) -> None: ...

    def __call__(self, done: int) -> None: ...


ProgressFactory = Callable[..., AbstractContextManager[Ticker]]


class QuietTicker:
    """Counts and shows nothing (stderr is not a terminal)."""

    def __init__(self, total: int | None = None) -> None:
        self.done = 0
        self.total = total

    def advance(self, n: int = 1) -> None:
        self.done += n

    def update(self, done: int) -> None:
        self.done = done

    def set_total(self, total: int | None) -> None:
        self.total = total

    def __call__(self, done: int) -> None:
        self.done = done


class RichTicker(QuietTicker):
    """Counts in a plain integer and hands the count to a rich task at most every
    PUSH_EVERY seconds."""

    def __init__(self, bar: Any, task: Any, total: int | None) -> None:
        super().__init__(total)
        self._bar = bar
        self._task = task
        self._due = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self._due:
            self._push(now)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now >= self._due:
            self._push(now)

    __call__ = update

    def set_total(self, total: int | None) -> None:
        self.total = total
        self._bar.update(self._task, total=total)

    def _push(self, now: float) -> None:
        self._due = now + PUSH_EVERY
        self._bar.update(self._task, completed=self.done)

    def finish(self) -> None:
        self._bar.update(self._task, completed=self.done, total=self.total or self.done)


def on_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


@contextmanager
def progress(
    label: str,
    total: int | None = None,
    *,
    unit: str = "events",
    stream: TextIO | None = None,
) -> Iterator[Ticker]:
    """A progress bar for `label` on `stream` (stderr) when it is a terminal, else a quiet
    ticker. `total` None means unknown (the bar pulses and counts). On leaving, the bar shows
    the final count and stays on screen as one line."""
    out = sys.stderr if stream is None else stream
    if not on_terminal(out):
        yield QuietTicker(total)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(file=out, force_terminal=True),
        refresh_per_second=REDRAWS_PER_SECOND,
        redirect_stdout=False,  # stdout may be the command's output (audit export)
        redirect_stderr=False,
    )
    ticker = RichTicker(bar, bar.add_task(label, total=total), total)
    bar.start()
    try:
        yield ticker
        ticker.finish()
    finally:
        bar.stop()


@contextmanager
def quiet(label: str, total: int | None = None, **_: Any) -> Iterator[Ticker]:
    """The same shape as `progress`, never drawn (library callers' default)."""
    yield QuietTicker(total)
