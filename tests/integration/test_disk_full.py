"""A full disk (issue 7): `sourceauth serve`'s data directory on a 4 MiB tmpfs filled to the
last byte. Mail is answered 4xx, never 250 and lost; once space is back it is taken, and every
message answered 250 is in the log, whose `audit verify` passes.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.smtp_harness import message
from tests.integration.test_abuse_smtp import serve_config
from tests.integration.test_crash_safety import Server, cli
from tests.support.smtp_sink import Sink

QUEUED_AS = re.compile(rb"queued as ([0-9a-f]+)")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def send(port: int, n: int) -> tuple[int, bytes]:
    raw = message("alice@remote.test", "bob@example.test", body=f"message {n}\r\n" * 200)
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo()
        client.mail("alice@remote.test")
        client.rcpt("bob@example.test")
        return client.data(raw)


@pytest.mark.timeout(240)
def test_a_full_disk_defers_mail_and_loses_nothing_once_space_is_back(
    tmp_path: Path, small_disk: Path
) -> None:
    with Sink() as relay, Sink() as next_hop:
        config, port = serve_config(tmp_path, relay, next_hop)
        config.write_text(
            config.read_text().replace(
                f'data_dir = "{tmp_path / "var"}"', f'data_dir = "{small_disk}"'
            )
        )
        server = Server(config, port, tmp_path / "serve.log")
        server.start()
        accepted: list[bytes] = []
        try:
            for n in range(5):
                code, text = send(port, n)
                assert code == 250, text
                accepted.append(QUEUED_AS.search(text).group(1))  # type: ignore[union-attr]
            filler = small_disk / "filler"
            with filler.open("wb") as out, contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            refused = [send(port, 100 + n) for n in range(5)]
            for code, text in refused:
                assert code != 250 and 400 <= code < 500, (code, text)
            filler.unlink()
            for n in range(5):
                code, text = send(port, 200 + n)
                assert code == 250, text
                accepted.append(QUEUED_AS.search(text).group(1))  # type: ignore[union-attr]
        finally:
            assert server.stop() == 0, server.tail()
        verified = cli(config, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        exported = cli(config, "audit", "export")
        assert exported.returncode == 0, exported.stderr
        for receipt in accepted:
            assert receipt.decode() in exported.stdout
