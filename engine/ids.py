"""Random ids for the hot path: message ids and challenge ids drawn from one buffer of
`os.urandom` bytes, one system call per 4 KB instead of one per id (`uuid.uuid4` makes one each).
"""

from __future__ import annotations

import os
import threading
import uuid

POOL_BYTES = 4096


class RandomPool:
    """Bytes from `os.urandom`, handed out once each. A forked child starts with an empty
    pool (see `reset`): parent and child never hand out the same bytes."""

    def __init__(self, size: int = POOL_BYTES) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._buffer = b""
        self._position = 0

    def take(self, count: int) -> bytes:
        with self._lock:
            start = self._position
            end = start + count
            if end > len(self._buffer):
                self._buffer = os.urandom(max(self._size, count))
                start, end = 0, count
            self._position = end
            return self._buffer[start:end]

    def reset(self) -> None:
        """Forget the buffer (a new lock too: another thread may have held it at the fork)."""
        self._lock = threading.Lock()
        self._buffer = b""
        self._position = 0


_POOL = RandomPool()
os.register_at_fork(after_in_child=_POOL.reset)


def random_bytes(count: int) -> bytes:
    """`count` bytes from the operating system's CSPRNG, as `os.urandom(count)` gives them."""
    return _POOL.take(count)


def new_uuid4() -> uuid.UUID:
    """A random (version 4) UUID, as `uuid.uuid4()` makes it."""
    return uuid.UUID(bytes=_POOL.take(16), version=4)
