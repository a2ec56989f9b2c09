"""Challenges sent in batches: over one kept-open SMTP session to a real relay (aiosmtpd on
loopback), or into a Maildir outbox in chunks fsync'd together; `stop` honoured between
messages; a relay that is down answers the batch at once; the engine records every outcome."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sourceauth.adapters.smtp.delivery import MAILDIR_CHUNK, parse_next_hop
from sourceauth.adapters.smtp.outbound import ChallengeSender
from sourceauth.engine import tokens
from sourceauth.engine.api import OutgoingChallenge, SendOutcome
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.ports import BatchChallengeTransport
from tests.conftest import describe, settings_for
from tests.support.fakes import FakeBlobs, FakeClock, FakeDeliveries
from tests.support.ports import free_port
from tests.support.service import IN_MEMORY, memory_views
from tests.support.smtp_sink import Sink


def challenge(n: int, *, maybe_sent: bool = False) -> OutgoingChallenge:
    return OutgoingChallenge(
        challenge_id=f"{n:032x}",
        token=f"tok{n}",
        to=f"stranger{n}@example.org",
        scope="example.test",
        expires_at=time.time() + 86400,
        subject=f"Hello {n}",
        in_reply_to=f"<orig{n}@example.org>",
        recipient="bob@example.test",
        thread_id=f"thread{n}",
        maybe_sent=maybe_sent,
    )


def sender_for(relay: str) -> ChallengeSender:
    return ChallengeSender(
        relay=parse_next_hop(relay),
        confirm_address="confirm@example.test",
        bounce_address="bounces@example.test",
        hostname="mx.example.test",
        timeout=5.0,
    )


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def test_the_challenge_sender_is_a_batch_transport() -> None:
    assert isinstance(sender_for("smtp://127.0.0.1:25"), BatchChallengeTransport)


def test_a_batch_goes_over_one_session_each_message_as_composed(sink: Sink) -> None:
    sender = sender_for(sink.url)
    batch = [challenge(n) for n in range(5)]
    results = sender.send_batch(batch, lambda: False)
    assert [r.outcome if r else None for r in results] == [SendOutcome.SENT] * 5
    got = sink.wait_for(5)
    assert len({m.peer for m in got}) == 1, "one connection for the whole batch"
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    for c in batch:
        m = by_rcpt[c.to]
        assert m.mail_from == f"bounces+{c.token}@example.test"
        assert m.data == sender.compose(c)


def test_stop_leaves_the_rest_untried(sink: Sink) -> None:
    sender = sender_for(sink.url)
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    results = sender.send_batch([challenge(n) for n in range(5)], stop)
    assert [r is not None for r in results] == [True, True, False, False, False]
    assert sink.wait_for(2) and sink.count == 2


def test_a_relay_that_is_down_answers_the_whole_batch_temporary_at_once() -> None:
    port = free_port()  # nothing listens there
    sender = sender_for(f"smtp://127.0.0.1:{port}")
    results = sender.send_batch([challenge(n) for n in range(20)], lambda: False)
    assert all(r is not None and r.outcome is SendOutcome.TEMPORARY for r in results)
    assert len({r.diagnostic for r in results if r}) == 1


def test_a_session_lost_mid_batch_fails_that_one_only_and_the_next_reconnects() -> None:
    with Sink(cut_at_data=(2,)) as sink:
        results = sender_for(sink.url).send_batch([challenge(n) for n in range(4)], lambda: False)
        outcomes = [r.outcome if r else None for r in results]
        assert outcomes == [
            SendOutcome.SENT,
            SendOutcome.TEMPORARY,
            SendOutcome.SENT,
            SendOutcome.SENT,
        ]
        got = sink.wait_for(3)
        assert len({m.peer for m in got}) == 2


def test_a_maildir_outbox_takes_a_batch_larger_than_a_chunk_once(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    sender = sender_for(f"maildir:{outbox}")
    count = MAILDIR_CHUNK + 6
    batch = [challenge(n) for n in range(count)]
    results = sender.send_batch(batch, lambda: False)
    assert all(r is not None and r.outcome is SendOutcome.SENT for r in results)
    files = sorted(outbox.glob("*/new/*"))
    assert len(files) == count
    # Sent again (a lease taken over: maybe sent): every one is found, none written twice.
    again = sender.send_batch([challenge(n, maybe_sent=True) for n in range(count)], lambda: False)
    assert all(r is not None and r.outcome is SendOutcome.SENT for r in again)
    assert sorted(outbox.glob("*/new/*")) == files
    first = next(f for f in files if f.parent.parent.name.startswith("stranger0"))
    assert b"Subject:" in first.read_bytes()


def test_the_engine_sends_due_challenges_as_one_batch_and_records_each(sink: Sink) -> None:
    clock, blobs = FakeClock(), FakeBlobs()
    app = SourceAuth(
        settings=settings_for(),
        keyring=tokens.generate_keyring(),
        views_factory=memory_views,
        blobs=blobs,
        challenges=sender_for(sink.url),
        deliveries=FakeDeliveries(),
        clock=clock,
        env=dict(IN_MEMORY),
    )
    strangers = [f"new{n}@example.org" for n in range(6)]
    for address in strangers:
        app.receive(describe(blobs, address, "bob@example.test"))
    assert app.dispatch_challenges() == (6, 0, 0)
    got = sink.wait_for(6)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(strangers)
    assert len({m.peer for m in got}) == 1
    assert {app.sender(a).state for a in strangers} == {"challenged"}
    assert app.dispatch_challenges() == (0, 0, 0), "nothing is sent twice"
    assert sink.count == 6
