"""Free TCP ports on 127.0.0.1 for listeners a test configures by number.

A port the kernel hands out for `bind(("127.0.0.1", 0))` comes from the ephemeral range
(`/proc/sys/net/ipv4/ip_local_port_range`), the same range every later `bind(..., 0)` and
every outgoing connection's source port draws from. Handing such a port to a config file
and starting a server on port 0 before the filter binds it lets the kernel give the same
port to both: a CI run failed that way on 2026-12-01 (a test sink on port 0 took the
correspondents listener's configured port: "address already in use").

So the ports here come from *below* the ephemeral range, where the kernel never picks one
by itself, in turn from a random start, each checked bindable (nothing listening, no
socket lingering in TIME_WAIT) and never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_FLOOR = 20000  # above the well-known and most registered services' ports


def _ephemeral_start() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_CEILING = max(_FLOOR + 1000, _ephemeral_start())  # exclusive
_lock = threading.Lock()
_next = random.randrange(_FLOOR, _CEILING)
_given: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and the kernel will not hand out itself."""
    global _next
    with _lock:
        for _ in range(_CEILING - _FLOOR):
            port = _next
            _next = _FLOOR if _next + 1 >= _CEILING else _next + 1
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {_FLOOR}..{_CEILING - 1}")
