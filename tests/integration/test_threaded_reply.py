"""A reply to the bare confirm address (no token), threaded onto the challenge's Message-ID,
over real loopback SMTP: it confirms once, and every other tokenless reply is refused with
its reason recorded on the reply's own copy (250, never a bounce)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sourceauth.engine import tokens
from tests.integration.smtp_harness import (
    RunningFilter,
    filter_with_sinks,
    message,
    parsed,
)
from tests.support.fakes import FakeClock
from tests.support.smtp_sink import Received, Sink
from tests.support.waiting import wait_outbound_idle

PROTECTED = "bob@example.test"
STRANGER = "alice@remote.test"
CONFIRM = "confirm@example.test"


def _challenge_id_header(challenge: Received) -> str:
    return str(parsed(challenge)["Message-ID"])


def _hold_three(flt: RunningFilter, relay: Sink) -> str:
    for subject in ("one", "two", "three"):
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED, subject=subject))
    return _challenge_id_header(relay.wait_for(1)[0])


def _reply(
    flt: RunningFilter, replier: str, headers: dict[str, str], subject: str = "Re: confirm"
) -> tuple[int, bytes]:
    return flt.sendmail_reply(
        replier, [CONFIRM], message(replier, CONFIRM, subject, headers=headers)
    )


def _reply_reasons(flt: RunningFilter) -> list[str]:
    return [h.reason for h in flt.app.quarantine(state="discarded")]


def test_challenge_message_id_carries_128_unguessable_bits(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, _):
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED))
        first = _challenge_id_header(relay.wait_for(1)[0])
        flt.send("carol@remote.test", [PROTECTED], message("carol@remote.test", PROTECTED))
        second = _challenge_id_header(relay.wait_for(2)[1])
    for msgid in (first, second):
        local = msgid.strip("<>").rpartition("@")[0]
        tag = local.rsplit(".", 1)[1]
        assert tokens.parse_thread_id(msgid) is not None
        assert len(tag) * 5 >= 128  # base32: 5 bits a character
    assert first.rpartition("@")[0] != second.rpartition("@")[0]


@pytest.mark.parametrize("header", ["In-Reply-To", "References"])
def test_threaded_reply_from_the_challenged_sender_confirms_and_releases_once(
    tmp_path: Path, header: str
) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        msgid = _hold_three(flt, relay)
        thread = msgid if header == "In-Reply-To" else f"<older@remote.test> {msgid}"
        code, _ = _reply(flt, STRANGER, {header: thread})
        assert code == 250
        delivered = next_hop.wait_for(3, timeout=20)
        assert sorted(parsed(m)["Subject"] for m in delivered) == ["one", "three", "two"]
        assert {s.address: s.state for s in flt.app.whitelist()} == {STRANGER: "authorized"}
        # the same reply again (a client's retry): nothing more is released or delivered
        code, _ = _reply(flt, STRANGER, {header: thread})
        assert code == 250
        wait_outbound_idle(flt.app)
        assert len(next_hop.messages) == 3 and len(relay.messages) == 1
        reasons = sorted(_reply_reasons(flt))
        assert reasons[0].startswith("confirm_accepted: sender confirmed")
        assert reasons[1].startswith("confirm_refused: ")
        history = flt.app.history(STRANGER)
        confirmed = [e for e in history if e.event.endswith(".Confirmed")]
        assert len(confirmed) == 1 and confirmed[0].reason == "threaded_reply"


def _forged(msgid: str) -> str:
    local, _, host = msgid.strip("<>").rpartition("@")
    head, tag = local.rsplit(".", 1)
    return f"<{head}.{'a' if tag[0] != 'a' else 'b'}{tag[1:]}@{host}>"


def _unknown(msgid: str) -> str:
    host = msgid.strip("<>").rpartition("@")[2]
    return f"<challenge.{'0' * 20}.1.{'a' * 26}@{host}>"


REFUSALS = {
    "no_thread": (STRANGER, lambda m: {}, "no challenge in In-Reply-To/References"),
    "foreign_thread": (
        STRANGER,
        lambda m: {"In-Reply-To": "<not-ours@remote.test>"},
        "no challenge in In-Reply-To/References",
    ),
    "wrong_sender": (
        "mallory@evil.test",
        lambda m: {"In-Reply-To": m},
        "threaded reply is not from the challenged sender",
    ),
    "forged_id": (STRANGER, lambda m: {"In-Reply-To": _forged(m)}, "thread names a forged"),
    "unknown_id": (STRANGER, lambda m: {"References": _unknown(m)}, "unknown challenge"),
    "auto_reply": (
        STRANGER,
        lambda m: {"In-Reply-To": m, "Auto-Submitted": "auto-replied"},
        "automated reply never confirms",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_tokenless_reply_is_refused_with_its_reason(tmp_path: Path, case: str) -> None:
    replier, headers, expected = REFUSALS[case]
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        msgid = _hold_three(flt, relay)
        code, text = _reply(flt, replier, headers(msgid))
        assert code == 250, text  # recorded and dropped: never a 5xx (a bounce to a forger)
        wait_outbound_idle(flt.app)
        assert next_hop.messages == []
        assert {s.address: s.state for s in flt.app.whitelist()} == {STRANGER: "challenged"}
        reasons = _reply_reasons(flt)
        assert len(reasons) == 1 and reasons[0].startswith("confirm_refused: ")
        assert expected in reasons[0]


def test_threaded_reply_after_the_challenge_expired_is_refused(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    with filter_with_sinks(tmp_path, clock=clock, extra='challenge_lifetime = "1h"') as (
        flt,
        relay,
        next_hop,
    ):
        msgid = _hold_three(flt, relay)
        clock.advance(3601)
        code, _ = _reply(flt, STRANGER, {"In-Reply-To": msgid})
        assert code == 250
        wait_outbound_idle(flt.app)
        assert next_hop.messages == []
        reasons = _reply_reasons(flt)
        assert len(reasons) == 1 and "challenge has expired" in reasons[0]
        assert {s.address: s.state for s in flt.app.whitelist()} != {STRANGER: "authorized"}
