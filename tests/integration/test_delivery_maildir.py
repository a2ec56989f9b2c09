"""Maildir delivery through the engine's dispatcher: exactly once per X-SourceAuth-Id, also
for a copy re-sent after a crash whose first write a client already moved to cur/, without a
scan of the mailbox on a copy's first attempt (a big mailbox does not slow each delivery)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from sourceauth.adapters.smtp import delivery
from sourceauth.adapters.smtp.delivery import parse_next_hop
from sourceauth.adapters.smtp.outbound import NextHopDelivery
from sourceauth.engine.api import DeliveryJob, DeliveryResult
from sourceauth.engine.application import SourceAuth
from tests.conftest import EngineFactory, incoming
from tests.support.fakes import FakeClock

DAVE = "dave@other.test"  # not protected: the copy is queued for delivery at once
LEASE = 60.0


class Crash(BaseException):
    """The worker dies between the Maildir write and the commit of its outcome."""


class Transport:
    """NextHopDelivery into tmp_path/mail; `crash` makes a batch die after its writes."""

    def __init__(self) -> None:
        self.real: NextHopDelivery | None = None
        self.crash = False
        self.jobs: list[DeliveryJob] = []

    def deliver_batch(self, jobs: Sequence[DeliveryJob]) -> list[DeliveryResult | None]:
        assert self.real is not None
        self.jobs.extend(jobs)
        done: list[DeliveryResult | None] = list(self.real.deliver_batch(jobs))
        if self.crash:
            raise Crash
        return done

    def deliver(self, job: DeliveryJob) -> DeliveryResult:
        result = self.deliver_batch([job])[0]
        assert result is not None
        return result


@pytest.fixture
def mail(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "mail"
    delivery._KNOWN_MAILDIRS.clear()


def engine_with(make_engine: EngineFactory, mail: Path) -> tuple[SourceAuth, Transport]:
    transport = Transport()
    app = make_engine(deliveries=transport, work_lease=LEASE)
    transport.real = NextHopDelivery(parse_next_hop(f"maildir:{mail}"), app.blobs, "mx.test")
    return app, transport


def files(mail: Path, sub: str) -> list[str]:
    return sorted(os.listdir(mail / DAVE / sub))


def test_copy_resent_after_a_crash_is_not_written_again_once_a_client_moved_it_to_cur(
    make_engine: EngineFactory, mail: Path, clock: FakeClock
) -> None:
    first, crashing = engine_with(make_engine, mail)
    crashing.crash = True
    first.receive(incoming(first, "alice@remote.test", DAVE))
    with pytest.raises(Crash):
        first.dispatch_deliveries()
    (name,) = files(mail, "new")
    assert crashing.jobs[0].maybe_sent is False  # a first attempt: no scan of cur/
    # the user's client reads it: new/<name> -> cur/<name>:2,S
    os.rename(mail / DAVE / "new" / name, mail / DAVE / "cur" / f"{name}:2,S")
    delivery._KNOWN_MAILDIRS.clear()  # the crashed process's memory is gone

    clock.advance(LEASE + 1)  # the dead worker's lease lapses; a restarted one takes over
    second, transport = engine_with(make_engine, mail)
    assert second.dispatch_deliveries() == (1, 0, 0)
    assert transport.jobs[0].maybe_sent is True  # taken over from a lapsed lease
    assert files(mail, "new") == []
    assert files(mail, "cur") == [f"{name}:2,S"]
    assert second.dispatch_deliveries() == (0, 0, 0)


def test_a_retry_after_a_failed_commit_also_scans_cur(
    make_engine: EngineFactory, mail: Path, clock: FakeClock
) -> None:
    """The same engine again: the failed round kept its lease, so the next round (after the
    lease lapses) knows the copy may have been written."""
    app, transport = engine_with(make_engine, mail)
    transport.crash = True
    app.receive(incoming(app, "alice@remote.test", DAVE))
    with pytest.raises(Crash):
        app.dispatch_deliveries()
    assert app.dispatch_deliveries() == (0, 0, 0)  # its lease still held
    (name,) = files(mail, "new")
    os.rename(mail / DAVE / "new" / name, mail / DAVE / "cur" / f"{name}:2,RS")
    transport.crash = False
    clock.advance(LEASE + 1)
    assert app.dispatch_deliveries() == (1, 0, 0)
    assert files(mail, "new") == []
    assert files(mail, "cur") == [f"{name}:2,RS"]


def test_a_first_delivery_into_a_mailbox_of_10000_files_lists_no_directory(
    make_engine: EngineFactory, mail: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, transport = engine_with(make_engine, mail)
    for sub in ("tmp", "new", "cur"):
        (mail / DAVE / sub).mkdir(parents=True)
    for i in range(10_000):
        sub = "cur" if i % 2 else "new"
        (mail / DAVE / sub / f"{i:040x}.mx.test{':2,S' if i % 2 else ''}").touch()
    listed: list[str] = []
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path: str) -> object:
        listed.append(str(path))
        return real_scandir(path)

    def listdir(path: str) -> list[str]:
        listed.append(str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    for n in range(5):
        app.receive(incoming(app, f"sender{n}@remote.test", DAVE))
    assert app.dispatch_deliveries() == (5, 0, 0)
    assert [j.maybe_sent for j in transport.jobs] == [False] * 5
    assert not [p for p in listed if str(mail) in p]
    monkeypatch.undo()
    assert len(files(mail, "new")) == 5_000 + 5


def to_dave(mail: Path, sourceauth_id: str, *, maybe_written: bool) -> DeliveryResult:
    return delivery.deliver(
        parse_next_hop(f"maildir:{mail}"),
        mail_from="a@r.test",
        recipients=[DAVE],
        raw=b"Subject: x\r\n\r\nbody\r\n",
        sourceauth_id=sourceauth_id,
        maybe_written=maybe_written,
    )


def test_a_retry_scans_the_mailbox_and_finds_its_copy_in_cur(mail: Path) -> None:
    assert to_dave(mail, "id1", maybe_written=False).delivered == (DAVE,)
    (name,) = files(mail, "new")
    os.rename(mail / DAVE / "new" / name, mail / DAVE / "cur" / f"{name}:2,S")
    again = to_dave(mail, "id1", maybe_written=True)
    assert again.delivered == (DAVE,)
    assert files(mail, "new") == [] and len(files(mail, "cur")) == 1


def test_a_mailbox_removed_behind_the_cache_is_made_again(mail: Path) -> None:
    for sid in ("one", "two"):
        result = to_dave(mail, sid, maybe_written=False)
        assert result.delivered == (DAVE,), result
        assert len(files(mail, "new")) == 1
        if sid == "one":
            shutil.rmtree(mail / DAVE)
    assert sorted(os.listdir(mail / DAVE)) == ["cur", "new", "tmp"]


def test_a_batch_of_copies_fsyncs_each_new_directory_once_and_each_file_before_its_link(
    make_engine: EngineFactory, mail: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = engine_with(make_engine, mail)
    erin = "erin@other.test"
    for n in range(20):
        app.receive(incoming(app, f"sender{n}@remote.test", [DAVE, erin]))
    synced: list[tuple[tuple[str, ...], bool]] = []
    real = delivery.fsync_all

    def fsync_all(paths: Sequence[str], *, directory: bool = False) -> None:
        if not directory:  # every staged file is still in tmp/ when it is fsync'd
            assert all("/tmp/" in p and os.path.exists(p) for p in paths)
        synced.append((tuple(paths), directory))
        real(paths, directory=directory)

    monkeypatch.setattr(delivery, "fsync_all", fsync_all)
    assert app.dispatch_deliveries() == (20, 0, 0)
    dir_calls = [sorted(paths) for paths, directory in synced if directory]
    # the two new mailboxes and the folder naming them, together; then each new/ once
    assert dir_calls == [
        sorted([str(mail), str(mail / DAVE), str(mail / erin)]),
        sorted(str(mail / who / "new") for who in (DAVE, erin)),
    ]
    assert sum(len(paths) for paths, directory in synced if not directory) == 40
    assert len(files(mail, "new")) == 20 and len(os.listdir(mail / erin / "new")) == 20
    assert files(mail, "tmp") == []


def test_one_unwritable_mailbox_in_a_batch_defers_only_its_recipient(
    make_engine: EngineFactory, mail: Path
) -> None:
    app, _ = engine_with(make_engine, mail)
    mail.mkdir()
    (mail / "erin@other.test").write_text("not a directory")
    app.receive(incoming(app, "alice@remote.test", [DAVE, "erin@other.test"]))
    app.receive(incoming(app, "bert@remote.test", [DAVE]))
    assert app.dispatch_deliveries() == (1, 1, 0)
    assert len(files(mail, "new")) == 2
