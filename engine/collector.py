"""The cyclic garbage collector paused around bounded bursts of allocation.

A unit of work (a group commit of a few hundred decisions) allocates tens of thousands of
short-lived objects, all freed by reference counting, none in a cycle. Each 700 allocations
the collector walks the young generation, each tenth time the middle one, and from time to
time the whole heap: with the sender cache and the caller's own objects that is hundreds of
thousands of objects, for nothing. Paused for the unit, the collector runs once after it
instead (the allocation count carries over), and garbage in cycles waits one unit at most.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]

_lock = threading.Lock()
_holders = 0  # threads inside collector_paused() now
_resume = False  # whether the collector was on when the first of them came in


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic collector inside (nested and concurrent uses are counted): it is on
    again when the last one leaves if it was on when the first one came in, and left as it is
    if it was off (an application that turned it off keeps it off)."""
    global _holders, _resume
    with _lock:
        if _holders == 0:
            _resume = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _resume:
                gc.enable()
