"""Attacks through the file system and the terminal (issue 7): hostile bytes shown by the CLI,
store files readable by other users, a secret_file that is not a file. Real processes, real
files, mail taken over loopback SMTP.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import stat
import subprocess
from pathlib import Path

import pytest

from sourceauth.adapters.config import load_config
from tests.integration.smtp_harness import RunningFilter, message, write_config
from tests.integration.test_crash_safety import cli
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_outbound_idle, wait_until

PROTECTED = "bob@example.test"
# What a terminal acts on: an OSC sequence retitling the window, a bell, a CRLF starting a
# forged table row, a C1 CSI, a right-to-left override reversing what follows.
HOSTILE_SUBJECT = "Invoice \x1b]0;pwned\x07 paid\r\n0123456789abcdef0123456789abcdef  forged\x9b2J"
RLO_SENDER = "\u202egnp.exe@remote.test"
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


@pytest.fixture
def hostile_mail(tmp_path: Path) -> Path:
    """A data directory holding mail whose Subject and sender carry terminal controls."""
    with Sink() as relay, Sink() as next_hop:
        config = write_config(tmp_path, relay=relay.url, next_hop=next_hop.url)
        running = RunningFilter(load_config(config))
        try:
            # One RFC 2047 encoded word: the CRLF and the escapes ride inside it.
            subject = f"=?utf-8?b?{base64.b64encode(HOSTILE_SUBJECT.encode()).decode()}?="
            with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
                client.ehlo()
                raw = message("alice@remote.test", PROTECTED, subject=subject)
                client.sendmail("alice@remote.test", [PROTECTED], raw)
                raw = message("x@remote.test", PROTECTED, subject="rlo")
                client.sendmail(RLO_SENDER, [PROTECTED], raw, mail_options=["SMTPUTF8"])
            wait_until(lambda: len(running.app.quarantine()) == 2, message="two held messages")
            wait_outbound_idle(running.app)
            held = [h for h in running.app.quarantine() if h.sender == "alice@remote.test"]
            assert held[0].subject == HOSTILE_SUBJECT  # the view keeps what the mail said
        finally:
            running.stop()
    return config


def test_cli_output_never_carries_terminal_controls_from_mail(hostile_mail: Path) -> None:
    listed = cli(hostile_mail, "quarantine", "list")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert len(rows) == 3  # the header and one line per held message: no forged row
    assert "\\u001b]0;pwned\\u0007" in listed.stdout and "\\u000d\\u000a" in listed.stdout
    message_id = next(r.split()[0] for r in rows[1:] if "alice@remote.test" in r)
    outputs = {
        ("quarantine", "list", "--json"): "\\u001b]0;pwned\\u0007",
        ("quarantine", "show", message_id): "\\u001b]0;pwned\\u0007",
        ("quarantine", "show", message_id, "--json"): "\\u001b]0;pwned\\u0007",
        ("senders", "list"): "\\u202egnp.exe@remote.test",
        ("senders", "list", "--json"): "\\u202egnp.exe@remote.test",
        ("audit", "history", RLO_SENDER): "Sender.FirstChallenged",
        ("audit", "history", RLO_SENDER, "--json"): "Sender.FirstChallenged",
    }
    for args, shown_escaped in outputs.items():
        done = cli(hostile_mail, *args)
        assert done.returncode == 0, done.stderr
        assert UNSAFE.search(done.stdout) is None, args
        assert shown_escaped in done.stdout, (args, done.stdout)
    shown = cli(hostile_mail, "quarantine", "show", message_id).stdout
    assert len([line for line in shown.splitlines() if "forged" in line]) == 1


def test_store_files_are_private_whatever_the_directory_and_umask(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    config = tmp_path / "sourceauth.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n', encoding="utf-8")
    umask = os.umask(0)  # inherited by the command
    try:
        done = cli(config, "senders", "allow", "a@b.example")
    finally:
        os.umask(umask)
    assert done.returncode == 0, done.stderr
    files = sorted(p for p in data.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"sourceauth.db", "secret"}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o600}, modes


def run_with_secret(tmp_path: Path, secret: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "sourceauth.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "var"}"\n[challenge]\nsecret_file = "{secret}"\n',
        encoding="utf-8",
    )
    return cli(config, "senders", "allow", "probe@remote.test")  # (list needs a store first)


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink", "unreadable"])
def test_a_secret_file_that_is_not_a_readable_file_is_one_line_and_exit_2(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCEAUTH_SECRET", raising=False)  # the file must be read
    secret = tmp_path / "secret"
    if kind == "directory":
        secret.mkdir()
    elif kind == "fifo":
        os.mkfifo(secret, 0o600)
    elif kind == "symlink":
        (tmp_path / "real").write_text("x")
        secret.symlink_to(tmp_path / "real")
    else:
        secret = Path("/proc/self/mem")  # a regular 0600 file whose read fails (EIO), even as root
    done = run_with_secret(tmp_path, str(secret))  # a FIFO used to hang here: timeout=60
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sourceauth: error: challenge.secret_file")
    expected = {
        "directory": "is a directory",
        "fifo": "is a FIFO",
        "symlink": "is a symlink",
        "unreadable": "cannot read",
    }[kind]
    assert expected in lines[0]
