"""The library logs nothing unless the integrator configures logging (engine/logs.py): run as a
fresh process, the adapters' warnings and errors stay silent by default and appear once
structlog (or the stdlib `logging`) is configured."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Library code that logs at info, warning and error: a delivery with one refused recipient, a
# corrupt original read back, and a DSN parser fed garbage.
EXAMPLE = textwrap.dedent(
    """
    import hashlib, sys, uuid
    from pathlib import Path
    from sourceauth.adapters.smtp.delivery import deliver, parse_next_hop
    from sourceauth.adapters.smtp.dsn import parse_bounce
    from sourceauth.adapters.storage.blobs import FileBlobStore
    from sourceauth.engine.ports import BlobCorrupt

    {setup}

    work = Path(sys.argv[1])
    (work / "mail" / "taken@example.test").parent.mkdir(parents=True)
    (work / "mail" / "taken@example.test").write_bytes(b"")  # a file where a mailbox should be
    deliver(
        parse_next_hop(f"maildir:{{work / 'mail'}}"),
        mail_from="a@remote.test",
        recipients=["ok@example.test", "taken@example.test"],
        raw=b"Subject: hi\\r\\n\\r\\nbody\\r\\n",
        sourceauth_id="LOGTEST1",
    )
    blobs = FileBlobStore(work / "blobs")
    ref = blobs.put(uuid.uuid4().hex, b"original")
    try:
        blobs.get(ref.key, verify_sha256=hashlib.sha256(b"other").hexdigest())
    except BlobCorrupt:
        pass
    parse_bounce(b"\\xff\\xfe not a message at all")
    """
)

STRUCTLOG_JSON = """
import structlog
structlog.configure(
    processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
    logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
)
"""

STDLIB = """
import logging
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
"""


def run(tmp_path: Path, setup: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "example.py"
    script.write_text(EXAMPLE.format(setup=setup))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(work)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.timeout(120)
def test_the_library_prints_nothing_when_logging_is_not_configured(tmp_path: Path) -> None:
    done = run(tmp_path, setup="")
    assert (done.stdout, done.stderr) == ("", "")


@pytest.mark.timeout(120)
def test_events_follow_the_structlog_configuration_once_there_is_one(tmp_path: Path) -> None:
    done = run(tmp_path, setup=STRUCTLOG_JSON)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    events = {(line["event"], line["level"]) for line in lines}
    assert {
        ("recipient_refused", "warning"),
        ("delivery_done", "info"),
        ("blob_corrupt", "error"),
    } <= events
    refused = next(line for line in lines if line["event"] == "recipient_refused")
    assert refused["recipient"] == "taken@example.test" and refused["purpose"] == "delivery"
    assert done.stderr == ""


@pytest.mark.timeout(120)
def test_events_reach_stdlib_logging_when_only_that_is_configured(tmp_path: Path) -> None:
    done = run(tmp_path, setup=STDLIB)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert "sourceauth.adapters.smtp.delivery WARNING recipient_refused" in lines
    assert "sourceauth.adapters.smtp.delivery INFO delivery_done" in lines
    assert "sourceauth.adapters.storage.blobs ERROR blob_corrupt" in lines
