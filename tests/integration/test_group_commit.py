"""The group commit's window (GroupCommitter, `[storage] group_commit_wait_ms`) on a real SQLite
file: a batch stays open for more only while one of its items lingers (the SMTP listener's);
the milter's items (linger=False: each is a thread blocked on its own commit) are committed
as soon as the writer takes them, and those that queued meanwhile still share one
transaction.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import pytest

from sourceauth.adapters.smtp.inbound import GroupCommitter, _Pending
from sourceauth.engine.api import Decision, Receipt
from sourceauth.engine.application import SourceAuth
from tests.conftest import EngineFactory, raw_message

WINDOW_S = 3.0  # far longer than a commit: whether a batch waited it is plain
STRANGER = "alice@remote.test"
UNPROTECTED = "carol@elsewhere.test"


@pytest.fixture
def app(make_engine: EngineFactory) -> SourceAuth:
    return make_engine()


@pytest.fixture
def committer(app: SourceAuth) -> Iterator[GroupCommitter]:
    committer = GroupCommitter(app, app.blobs, wait_ms=WINDOW_S * 1000)
    yield committer
    if committer._thread.is_alive():
        committer.stop()


def submit(
    committer: GroupCommitter, *, linger: bool, n: int = 0
) -> concurrent.futures.Future[Receipt]:
    future: concurrent.futures.Future[Receipt] = concurrent.futures.Future()
    committer.submit(
        _Pending(
            mail_from=STRANGER,
            recipients=(UNPROTECTED,),
            raw=raw_message(STRANGER, [UNPROTECTED], subject=f"n{n}"),
            future=future,
            loop=None,
            bounce=None,
            kept_by_mta=not linger,
            linger=linger,
        )
    )
    return future


def delivered(receipt: Receipt) -> bool:
    return [d.decision for d in receipt.decisions] == [Decision.DELIVER]


def test_a_lone_item_that_does_not_linger_is_committed_without_waiting_the_window(
    committer: GroupCommitter,
) -> None:
    committer.start()
    started = time.monotonic()
    receipt = submit(committer, linger=False).result(timeout=WINDOW_S * 3)
    took = time.monotonic() - started
    assert delivered(receipt)
    assert took < WINDOW_S / 2, f"{took:.2f} s: the milter's commit waited the window"
    assert (committer.batches, committer.committed) == (1, 1)


def test_a_lone_item_that_lingers_waits_the_window(committer: GroupCommitter) -> None:
    # The SMTP listener's behaviour, unchanged (and proof the test above can fail).
    committer.start()
    started = time.monotonic()
    receipt = submit(committer, linger=True).result(timeout=WINDOW_S * 3)
    assert delivered(receipt)
    assert time.monotonic() - started >= WINDOW_S * 0.9
    assert (committer.batches, committer.committed) == (1, 1)


def test_items_that_do_not_linger_queued_together_share_one_transaction(
    committer: GroupCommitter,
) -> None:
    # Queued while the writer is busy (here: not started yet), as concurrent milter threads'
    # messages are while a commit runs: the next batch takes them all, at once.
    futures = [submit(committer, linger=False, n=n) for n in range(5)]
    started = time.monotonic()
    committer.start()
    receipts = [f.result(timeout=WINDOW_S * 3) for f in futures]
    assert time.monotonic() - started < WINDOW_S / 2
    assert all(delivered(r) for r in receipts)
    assert len({r.receipt_id for r in receipts}) == 5
    assert (committer.batches, committer.committed) == (1, 5)


def test_items_that_linger_still_batch_across_the_window(committer: GroupCommitter) -> None:
    committer.start()
    first = submit(committer, linger=True, n=1)
    time.sleep(WINDOW_S / 10)
    second = submit(committer, linger=True, n=2)
    receipts = [first.result(timeout=WINDOW_S * 3), second.result(timeout=WINDOW_S * 3)]
    assert all(delivered(r) for r in receipts)
    assert (committer.batches, committer.committed) == (1, 2)


def test_one_lingering_item_keeps_a_mixed_batch_open(committer: GroupCommitter) -> None:
    # A milter item and an SMTP item in one batch: the SMTP item's window applies, so a
    # third item arriving within it joins the same transaction.
    early = [submit(committer, linger=False, n=1), submit(committer, linger=True, n=2)]
    committer.start()
    time.sleep(WINDOW_S / 10)
    late = submit(committer, linger=False, n=3)
    receipts = [f.result(timeout=WINDOW_S * 3) for f in (*early, late)]
    assert all(delivered(r) for r in receipts)
    assert (committer.batches, committer.committed) == (1, 3)
