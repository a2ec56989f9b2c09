"""The child processes of `serve` (worker, web, acceptors) stop on signals without ever
blocking in their own signal handler (issue 7's second cause of hung workers).

A Python signal handler runs in the main thread between two bytecodes, and that may be inside
the same handler's run for the signal before. The kernel sends PR_SET_PDEATHSIG's SIGTERM
again each time a child is handed on to another thread of its dying parent, then to init: a
handler that took a lock (`threading.Event.set`) deadlocked the worker on its own lock when
the second SIGTERM arrived inside the first `set()`. Here a real child process takes a storm
of SIGTERMs and must still answer afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import pytest

from sourceauth.adapters.runtime import SignalFlag

pytestmark = pytest.mark.timeout(120)

STORM = 2.0  # seconds of SIGTERMs sent back to back, per round


class _LockingFlag:
    """The handler the children had before: `threading.Event.set` (the test's control)."""

    def __init__(self, signum: int) -> None:
        self.event = threading.Event()
        signal.signal(signum, lambda *_: self.event.set())

    def is_set(self) -> bool:
        return self.event.is_set()

    def clear(self) -> None:
        self.event.clear()


def _stormed_child(conn: Any, locking: bool) -> None:
    """Count SIGTERMs as a child's stop loop reads them; answer "count?" on `conn`."""
    flag = _LockingFlag(signal.SIGTERM) if locking else SignalFlag(signal.SIGTERM)
    conn.send("ready")
    seen = 0
    while True:
        if flag.is_set():
            seen += 1
            flag.clear()
        if conn.poll(0.001):
            if conn.recv() != "count?":
                return
            conn.send(seen)


def storms_answered(locking: bool, rounds: int) -> int:
    """Start a child, then up to `rounds` times send it SIGTERM back to back for STORM seconds
    and ask it to answer; how many storms it answered after (it stops at the first silence)."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_stormed_child, args=(theirs, locking), daemon=True)
    child.start()
    try:
        assert ours.poll(60) and ours.recv() == "ready"
        for answered in range(rounds):
            end = time.monotonic() + STORM
            while time.monotonic() < end:
                os.kill(child.pid or 0, signal.SIGTERM)
            ours.send("count?")
            if not ours.poll(10):
                return answered
            assert ours.recv() > 0, "the child saw no SIGTERM at all"
        ours.send("end")
        child.join(10)
        return rounds
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)


def test_a_storm_of_sigterms_never_blocks_the_childs_signal_handler() -> None:
    assert storms_answered(locking=False, rounds=3) == 3


def test_the_old_locking_handler_deadlocks_under_the_same_storm() -> None:
    """The control: the same storms against the Event-based handler the children had before
    deadlock it (measured: 5 of 6 children within three storms at load 20, 8 of 8 in the
    first at load 12; here up to ten are allowed), so the test above does test something."""
    assert storms_answered(locking=True, rounds=10) < 10
