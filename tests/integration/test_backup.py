"""`sourceauth backup` while the filter takes mail over SMTP, and `sourceauth restore` into a
fresh data directory: the restored store passes `audit verify` and reads with the same keyring."""

from __future__ import annotations

import json
import smtplib
import sqlite3
import threading
from pathlib import Path

from sourceauth.adapters.config import load_config
from tests.integration.smtp_harness import RunningFilter, message, write_config
from tests.integration.test_cli import run
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

BOB = "bob@example.test"


def _config(directory: Path, extra: str = "") -> Path:
    directory.mkdir(exist_ok=True)
    return write_config(
        directory, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9", extra=extra
    )


def _senders(config: Path) -> set[tuple[str, str, str]]:
    out = run("senders", "list", "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    return {(s["address"], s["id"], s["state"]) for s in json.loads(out.stdout)}


def test_backup_taken_during_smtp_load_restores_and_passes_audit_verify(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    backup_file = tmp_path / "sourceauth-backup.sqlite"
    with Sink() as relay, Sink() as next_hop:
        config = write_config(
            live,
            relay=f"smtp://127.0.0.1:{relay.port}",
            next_hop=f"smtp://127.0.0.1:{next_hop.port}",
        )
        flt = RunningFilter(load_config(config))
        stop = threading.Event()
        sent = [0] * 4

        def load(worker: int) -> None:
            with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
                for i in range(5_000):  # bounded; the test stops it long before
                    if stop.is_set():
                        return
                    sender = f"s{worker}-{i % 25}@remote.test"
                    rcpt = BOB if i % 2 else "x@other.test"
                    client.sendmail(sender, [rcpt], message(sender, rcpt, f"m{i}"))
                    sent[worker] += 1

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        try:
            for t in threads:
                t.start()
            wait_until(lambda: flt.filter.committer.committed >= 40, message="40 messages in")
            taken = run("backup", str(backup_file), "--config", str(config))
            during = flt.filter.committer.committed
            # the load goes on after the backup (a message in flight at `during` may already
            # have been counted: wait for one more commit, not for one more reply)
            wait_until(lambda: flt.filter.committer.committed > during, message="load after")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            flt.stop()
    assert taken.returncode == 0, taken.stderr
    assert sum(sent) > during >= 40  # the load went on after the backup
    assert all(sent), sent  # each of the four clients sent throughout
    assert backup_file.stat().st_mode & 0o777 == 0o600

    restored = _config(tmp_path / "restored")
    put_back = run("restore", str(backup_file), "--config", str(restored))
    assert put_back.returncode == 0, put_back.stderr
    verified = run("audit", "verify", "--config", str(restored))
    assert verified.returncode == 0, verified.stderr
    assert (tmp_path / "restored" / "var" / "secret").read_bytes() == (
        live / "var" / "secret"
    ).read_bytes()
    assert (tmp_path / "restored" / "var" / "secret").stat().st_mode & 0o777 == 0o600
    before, after = _senders(config), _senders(restored)
    # Same keyring: the same sender ids; the backup holds what was committed when it was taken.
    assert after and {(a, i) for a, i, _ in after} <= {(a, i) for a, i, _ in before}


def test_restore_refuses_an_existing_store_without_force_and_keeps_it_with_force(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path / "one")
    assert run("senders", "allow", "a@b.example", "--config", str(config)).returncode == 0
    backup_file = tmp_path / "backup.sqlite"
    assert run("backup", str(backup_file), "--config", str(config)).returncode == 0
    again = run("backup", str(backup_file), "--config", str(config))
    assert again.returncode == 2 and "exists" in again.stderr

    assert run("senders", "allow", "c@d.example", "--config", str(config)).returncode == 0
    refused = run("restore", str(backup_file), "--config", str(config))
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert {a for a, _, _ in _senders(config)} == {"a@b.example", "c@d.example"}

    in_use = sqlite3.connect(tmp_path / "one" / "var" / "sourceauth.db")  # as `serve` has it
    try:
        assert in_use.execute("SELECT COUNT(*) FROM sa_whitelist").fetchone() == (2,)
        busy = run("restore", str(backup_file), "--force", "--config", str(config))
        assert busy.returncode == 2 and "in use" in busy.stderr
    finally:
        in_use.close()
    forced = run("restore", str(backup_file), "--force", "--config", str(config))
    assert forced.returncode == 0, forced.stderr
    assert {a for a, _, _ in _senders(config)} == {"a@b.example"}
    kept = list((tmp_path / "one" / "var").glob("sourceauth.db.before-restore-*"))
    assert len(kept) == 1


def test_restore_of_a_file_that_is_no_backup_is_a_clear_error(tmp_path: Path) -> None:
    config = _config(tmp_path / "one")
    for bogus in (config, tmp_path / "missing.sqlite"):
        out = run("restore", str(bogus), "--config", str(config))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "backup" in out.stderr
    assert not (tmp_path / "one" / "var").exists()


def test_backup_without_a_store_exits_1_and_creates_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path / "one")
    out = run("backup", str(tmp_path / "b.sqlite"), "--config", str(config))
    assert out.returncode == 1 and "no store" in out.stderr
    assert not (tmp_path / "one" / "var").exists() and not (tmp_path / "b.sqlite").exists()


def test_originals_kept_as_files_travel_in_the_backup(tmp_path: Path) -> None:
    files = '[storage]\nblobs = "files"\n'
    config = _config(tmp_path / "one", extra=files)
    flt = RunningFilter(load_config(config))
    try:
        flt.send("alice@remote.test", [BOB], message("alice@remote.test", BOB, "kept"))
    finally:
        flt.stop()
    backup_file = tmp_path / "backup.sqlite"
    taken = run("backup", str(backup_file), "--config", str(config))
    assert taken.returncode == 0 and "1 original files" in taken.stdout, taken.stdout

    restored = _config(tmp_path / "two", extra=files)
    assert run("restore", str(backup_file), "--config", str(restored)).returncode == 0
    originals = [p for p in (tmp_path / "two" / "var" / "blobs").rglob("*") if p.is_file()]
    assert len(originals) == 1 and b"kept" in originals[0].read_bytes()
    assert run("audit", "verify", "--config", str(restored)).returncode == 0
    held = json.loads(run("quarantine", "list", "--json", "--config", str(restored)).stdout)
    assert [m["sender"] for m in held] == ["alice@remote.test"]

    wrong = _config(tmp_path / "three")
    mismatch = run("restore", str(backup_file), "--config", str(wrong))
    assert mismatch.returncode == 2 and 'blobs = "files"' in mismatch.stderr.replace("'", '"')
