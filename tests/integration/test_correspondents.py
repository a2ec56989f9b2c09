"""Correspondents over real loopback SMTP: mail a protected user sends out on the
[correspondents] listener is relayed to the next hop and whitelists its recipients for that
user's scope; a local sender forged on the inbound listener whitelists nobody."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sourceauth.adapters.config import ConfigError, load_config
from tests.integration.smtp_harness import (
    RunningFilter,
    filter_with_sinks,
    free_port,
    message,
    parsed,
    write_config,
)
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_outbound_idle, wait_until

ALICE = "alice@example.test"  # a protected local user
BOB = "bob@example.test"  # another one
CAROL = "carol@remote.test"  # alice's correspondent
DAVE = "dave@remote.test"


@contextmanager
def running(
    tmp_path: Path, *, scope: str = "global", learn: bool = True
) -> Iterator[tuple[RunningFilter, Sink, Sink]]:
    extra = (
        f'scope = "{scope}"\n\n[correspondents]\n'
        f'listen = "127.0.0.1:{free_port()}"\nlearn = {str(learn).lower()}\n'
    )
    with filter_with_sinks(tmp_path, extra=extra) as (flt, relay, next_hop):
        yield flt, relay, next_hop


def send_out(flt: RunningFilter, mail_from: str, rcpts: list[str], raw: bytes) -> None:
    """What the MTA's submission service hands the correspondents listener."""
    with smtplib.SMTP("127.0.0.1", flt.filter.correspondents_port, timeout=30) as client:
        assert client.sendmail(mail_from, rcpts, raw) == {}


def states(flt: RunningFilter) -> dict[tuple[str, str], str]:
    return {(s.address, s.scope): s.state for s in flt.app.whitelist()}


def test_mail_sent_out_is_relayed_and_its_recipients_answer_unchallenged(tmp_path: Path) -> None:
    with running(tmp_path) as (flt, relay, next_hop):
        send_out(flt, ALICE, [CAROL, DAVE], message(ALICE, CAROL, subject="lunch?"))
        out = next_hop.wait_for(1)[0]
        assert out.mail_from == ALICE and sorted(out.rcpt_tos) == [CAROL, DAVE]
        assert parsed(out)["Subject"] == "lunch?" and parsed(out)["X-SourceAuth-Id"]
        assert states(flt) == {(CAROL, "global"): "authorized", (DAVE, "global"): "authorized"}
        learned = [e for e in flt.app.history(CAROL) if e.event.endswith("Authorized")]
        assert [(e.actor, e.reason) for e in learned] == [(ALICE, f"correspondent of {ALICE}")]
        # carol answers: delivered at once, no challenge
        flt.send(CAROL, [ALICE], message(CAROL, ALICE, subject="Re: lunch?"))
        answer = next_hop.wait_for(2)[1]
        assert parsed(answer)["Subject"] == "Re: lunch?" and answer.rcpt_tos == [ALICE]
        wait_outbound_idle(flt.app)
        assert relay.messages == []


def test_second_message_to_a_known_correspondent_records_no_new_verdict(tmp_path: Path) -> None:
    with running(tmp_path) as (flt, _, next_hop):
        send_out(flt, ALICE, [CAROL], message(ALICE, CAROL, subject="one"))
        send_out(flt, ALICE, [CAROL], message(ALICE, CAROL, subject="two"))
        next_hop.wait_for(2)
        verdicts = [e for e in flt.app.history(CAROL) if e.aggregate == "sender"]
        assert len(verdicts) == 1


def test_per_mailbox_scope_whitelists_for_the_sending_user_only(tmp_path: Path) -> None:
    with running(tmp_path, scope="recipient") as (flt, relay, next_hop):
        send_out(flt, ALICE, [CAROL], message(ALICE, CAROL))
        next_hop.wait_for(1)
        assert states(flt) == {(CAROL, ALICE): "authorized"}
        flt.send(CAROL, [BOB], message(CAROL, BOB, subject="to bob"))
        relay.wait_for(1)  # bob never wrote to carol: challenged
        flt.send(CAROL, [ALICE], message(CAROL, ALICE, subject="to alice"))
        assert parsed(next_hop.wait_for(2)[1])["Subject"] == "to alice"


def test_writing_to_a_held_sender_releases_its_mail(tmp_path: Path) -> None:
    with running(tmp_path) as (flt, relay, next_hop):
        flt.send(CAROL, [ALICE], message(CAROL, ALICE, subject="held"))
        relay.wait_for(1)
        assert states(flt) == {(CAROL, "global"): "challenged"}
        send_out(flt, ALICE, [CAROL], message(ALICE, CAROL, subject="sure, go ahead"))
        delivered = next_hop.wait_for(2)
        assert sorted(parsed(m)["Subject"] for m in delivered) == ["held", "sure, go ahead"]
        assert states(flt) == {(CAROL, "global"): "authorized"}


def test_forged_local_sender_on_the_inbound_listener_whitelists_nobody(tmp_path: Path) -> None:
    with running(tmp_path) as (flt, relay, next_hop):
        # from outside, claiming to be alice, to carol (unprotected): passed on, learned from never
        flt.send(ALICE, [CAROL], message(ALICE, CAROL, subject="forged"))
        next_hop.wait_for(1)
        assert states(flt) == {}
        flt.send(CAROL, [ALICE], message(CAROL, ALICE))
        relay.wait_for(1)
        wait_until(lambda: states(flt) == {(CAROL, "global"): "challenged"}, message="challenged")
        assert len(next_hop.messages) == 1


def test_without_learning_the_listener_only_relays(tmp_path: Path) -> None:
    with running(tmp_path, learn=False) as (flt, _, next_hop):
        send_out(flt, ALICE, [CAROL], message(ALICE, CAROL))
        assert next_hop.wait_for(1)[0].rcpt_tos == [CAROL]
        assert states(flt) == {}


def test_mail_out_from_an_unprotected_sender_is_relayed_and_learned_from_never(
    tmp_path: Path,
) -> None:
    with running(tmp_path) as (flt, _, next_hop):
        send_out(flt, "eve@elsewhere.test", [CAROL], message("eve@elsewhere.test", CAROL))
        assert next_hop.wait_for(1)[0].rcpt_tos == [CAROL]
        assert states(flt) == {}


def test_mail_out_answered_250_survives_a_next_hop_that_is_down(tmp_path: Path) -> None:
    tried: list[str] = []

    def refuse(address: str) -> str:
        tried.append(address)
        return "451 4.3.0 try later"

    port = free_port()

    def start(next_hop: Sink, relay: Sink) -> RunningFilter:
        extra = f'\n[correspondents]\nlisten = "127.0.0.1:{port}"\n'
        return RunningFilter(
            load_config(write_config(tmp_path, relay=relay.url, next_hop=next_hop.url, extra=extra))
        )

    with Sink(rcpt_reply=refuse) as down, Sink() as relay:
        flt = start(down, relay)
        try:
            send_out(flt, ALICE, [CAROL], message(ALICE, CAROL))
            wait_until(lambda: tried == [CAROL], message="a deferred delivery")
        finally:
            flt.stop()
    with Sink() as up, Sink() as relay:
        flt = start(up, relay)
        try:
            assert up.wait_for(1, timeout=20)[0].rcpt_tos == [CAROL]
        finally:
            flt.stop()


@pytest.mark.parametrize(
    ("next_hop", "listen", "error"),
    [
        ("maildir:./mail", "", "delivery.next_hop: must be an smtp://"),
        ("smtp://127.0.0.1:10031", "SAME", "correspondents.listen: must differ from server"),
    ],
)
def test_a_correspondents_listener_that_cannot_work_is_refused_at_start(
    tmp_path: Path, next_hop: str, listen: str, error: str
) -> None:
    port = free_port()
    where = port if listen == "SAME" else free_port()
    path = write_config(
        tmp_path,
        relay="smtp://127.0.0.1:10031",
        next_hop=next_hop,
        port=port,
        extra=f'\n[correspondents]\nlisten = "127.0.0.1:{where}"\n',
    )
    with pytest.raises(ConfigError, match=error):
        load_config(path)
