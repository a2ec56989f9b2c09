"""Progress of the long commands: drawn by rich on a real terminal (a pseudo-terminal the command
writes to, as a shell's would be), silent when stderr is a pipe; and the helper's own contract
(adapters/progress.py), which other commands (senders import) call.
"""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sourceauth.adapters import progress as progress_module
from sourceauth.adapters.progress import QuietTicker, RichTicker, progress

pytestmark = pytest.mark.timeout(180)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
SENDERS = ["a@one.example", "b@two.example", "c@three.example"]


def command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sourceauth.adapters.cli", *args, "--config", str(config)]


def on_terminal(argv: list[str], *, stdout_too: bool = False) -> tuple[int, str, str]:
    """Run argv with stderr (and stdout, if asked) on a new pseudo-terminal; the exit status,
    what the terminal showed (escape sequences removed) and what went to stdout otherwise."""
    master, slave = pty.openpty()
    child = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=slave if stdout_too else subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"},
    )
    os.close(slave)
    shown = read_all(master, running=lambda: child.poll() is None)
    out = child.stdout.read().decode() if child.stdout else ""
    status = child.wait(timeout=60)
    return status, ANSI.sub("", shown.decode("utf-8", "replace")).replace("\r", "\n"), out


def read_all(master: int, running: Callable[[], bool] = lambda: False) -> bytes:
    """Read a pseudo-terminal until its writers close it or, once nothing more comes,
    `running()` says they are done; then close it."""
    shown = b""
    while True:
        if select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer has gone
                break
            if not chunk:
                break
            shown += chunk
        elif not running():
            break
    os.close(master)
    return shown


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "sourceauth.toml"
    path.write_text(
        '[server]\ndata_dir = "./var"\nhostname = "mx.example.test"\n'
        '[policy]\nprotected = ["example.test"]\n'
        '[challenge]\nconfirm_address = "confirm@example.test"\n'
        'bounce_address = "bounces@example.test"\n'
        '[logging]\nlevel = "warning"\n',
        encoding="utf-8",
    )
    for address in SENDERS:
        done = subprocess.run(
            command(path, "senders", "allow", address), capture_output=True, check=False
        )
        assert done.returncode == 0, done.stderr
    return path


def test_verify_draws_each_pass_on_a_terminal_with_its_final_count(config: Path) -> None:
    status, shown, out = on_terminal(command(config, "audit", "verify"))
    assert status == 0, shown
    assert out.startswith("log sound: 3 events"), out
    for label in ("checking the chain", "rebuilding the views", "comparing sa_whitelist"):
        assert label in shown, shown
    assert re.search(r"checking the chain\s.*3/3 events", shown), shown
    assert re.search(r"comparing sa_whitelist\s.*3/3 rows", shown), shown


def test_rebuild_and_export_draw_on_a_terminal(config: Path, tmp_path: Path) -> None:
    status, shown, out = on_terminal(command(config, "projections", "rebuild"))
    assert status == 0 and "rebuilt views from 3 events" in out, (shown, out)
    assert re.search(r"rebuilding the views\s.*3/3 events", shown), shown

    target = tmp_path / "log.jsonl"
    status, shown, out = on_terminal(command(config, "audit", "export", "-o", str(target)))
    assert status == 0, shown
    assert re.search(r"exporting\s.*3/3 events", shown), shown
    assert len(target.read_text().splitlines()) == 3

    # `export > file` on a terminal: the lines go to the pipe, the bar to the terminal
    status, shown, out = on_terminal(command(config, "audit", "export"))
    assert status == 0 and len(out.splitlines()) == 3
    assert re.search(r"exporting\s.*3/3 events", shown), shown


def test_export_to_the_terminal_itself_draws_no_bar_among_its_lines(config: Path) -> None:
    status, shown, _ = on_terminal(command(config, "audit", "export"), stdout_too=True)
    assert status == 0
    assert shown.count('"event": "Sender.FirstAuthorized"') == 3, shown
    assert "exporting" not in shown and "exported 3 events" in shown


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (["audit", "verify"], ""),
        (["projections", "rebuild"], ""),
        (["audit", "export"], "exported 3 events\n"),
        (["audit", "export", "-o", "out.jsonl"], "exported 3 events\n"),
    ],
)
def test_nothing_is_drawn_when_stderr_is_a_pipe(config: Path, args: list[str], stderr: str) -> None:
    done = subprocess.run(
        command(config, *args),
        capture_output=True,
        text=True,
        check=False,
        cwd=config.parent,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == stderr


# ---------------------------------------------------------------------------- the helper


def test_the_helper_is_quiet_off_a_terminal_and_still_counts() -> None:
    sink = io.StringIO()
    with progress("importing senders", None, unit="senders", stream=sink) as bar:
        assert isinstance(bar, QuietTicker)
        for _ in range(5):
            bar.advance()
        bar.advance(10)
        bar.set_total(15)
        assert (bar.done, bar.total) == (15, 15)  # type: ignore[attr-defined]
        bar(20)
        assert bar.done == 20  # type: ignore[attr-defined]
    assert sink.getvalue() == ""


class CountingBar:
    """A real rich Progress whose updates are counted on their way through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.updates = 0

    def update(self, task: Any, **kw: Any) -> None:
        self.updates += 1
        self.inner.update(task, **kw)


def test_the_helper_draws_an_unknown_total_and_hands_rich_at_most_ten_counts_a_second() -> None:
    from rich.console import Console
    from rich.progress import Progress

    master, slave = pty.openpty()
    with open(slave, "w", encoding="utf-8", closefd=True) as terminal:
        assert progress_module.on_terminal(terminal)
        inner = Progress(console=Console(file=terminal, force_terminal=True), auto_refresh=False)
        bar = CountingBar(inner)
        ticker = RichTicker(bar, inner.add_task("importing", total=None), None)
        started = time.monotonic()
        for _ in range(200_000):
            ticker.advance()
        took = time.monotonic() - started
        assert ticker.done == 200_000
        assert bar.updates <= took / progress_module.PUSH_EVERY + 1, (bar.updates, took)
        ticker.finish()
        assert inner.tasks[0].completed == 200_000 and inner.tasks[0].total == 200_000

        with progress("importing senders", None, unit="senders", stream=terminal) as drawn:
            assert isinstance(drawn, RichTicker)
            drawn.advance(7)
    shown = read_all(master)
    assert re.search(r"importing senders\s.*7/7 senders", ANSI.sub("", shown.decode())), shown


def test_senders_import_draws_its_count_on_a_terminal_and_nothing_on_a_pipe(
    config: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "whitelist.txt"
    listing.write_text("".join(f"user{i}@import.example\n" for i in range(5)), encoding="utf-8")
    argv = command(config, "senders", "import", str(listing), "--format", "plain")
    status, shown, _ = on_terminal(argv)
    assert status == 0, shown
    assert re.search(r"imported\s.*5/5 senders", shown), shown

    listing.write_text("other@import.example\n", encoding="utf-8")
    done = subprocess.run(argv, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert b"imported" not in done.stderr and b"\x1b[" not in done.stderr, done.stderr
