"""The tests' free ports never collide with a port the kernel picks for `bind(..., 0)`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.ports import free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import ports

    port = free_port()
    monkeypatch.setattr(ports, "_given", set())  # as if not handed out: only the probe guards
    monkeypatch.setattr(ports, "_next", port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert free_port() != port
    monkeypatch.setattr(ports, "_next", port)
    assert free_port() == port  # free again: the probe, not luck, skipped it


def test_the_kernel_never_picks_one_of_ours() -> None:
    ours = {free_port() for _ in range(100)}
    kernel_picks = set()
    for _ in range(50):  # what a sink on port 0 would get
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            kernel_picks.add(other.getsockname()[1])
    assert not ours & kernel_picks
