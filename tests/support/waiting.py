"""Waiting in tests without sleeping for a result: poll a condition until a deadline, and tell
when a running filter has no outbound work left (so "nothing else arrived" is a fact, not a
guess after a pause).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy, and return that value.

    Bounded: raises AssertionError naming `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def outbound_idle(app: Any) -> bool:
    """True when the engine has no challenge and no delivery left to send, however far in the
    future its retry is due. A send is recorded only after the remote side answered, so once
    this holds, everything the filter will ever send for the mail it took so far has arrived.
    """
    app.whitelist(limit=0)  # every query catches the views up with the log first
    views = app.views
    return not views.challenges_due(math.inf, 1) and not views.deliveries_due(math.inf, 1)


def wait_outbound_idle(*apps: Any, timeout: float = 30.0) -> None:
    """Wait until every one of `apps` (engines of running filters) has sent everything."""
    wait_until(
        lambda: all(outbound_idle(app) for app in apps),
        timeout=timeout,
        message="the filter's challenge and delivery queues to drain",
    )
