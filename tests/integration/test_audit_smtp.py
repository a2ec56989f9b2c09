"""The auditor's commands on a log written by the real SMTP flow: `sourceauth serve` (a process of
its own) on loopback, a challenge relay and a next hop that capture what they are sent, two
strangers writing to a protected user: one answers its challenge (its mail is released and
delivered), the other's challenge comes back as a DSN to the bounce address (its mail expires
and maintenance deletes it). Then every `audit` command is run on that data directory, as an
auditor would, and what it prints is checked: states, transitions, actors, reasons.
"""

from __future__ import annotations

import json
import smtplib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.smtp_harness import dsn, free_port, message, parsed, token_of
from tests.integration.test_crash_safety import Server, cli, write_config
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(600)  # ~25 commands, each a process; slow on a busy machine

BOB = "bob@example.test"
ALICE = "alice@remote.test"  # answers her challenge
CAROL = "carol@faraway.test"  # her challenge bounces


def send(port: int, mail_from: str, rcpt: str, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        assert client.sendmail(mail_from, [rcpt], raw) == {}


def ok(config: Path, *args: str) -> str:
    done = cli(config, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def moment() -> str:
    """Now, as `--at` takes it; a little time passes on either side, so that events recorded
    just before and just after fall clearly on their side."""
    time.sleep(0.05)
    at = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    return at


def senders_now(config: Path) -> dict[str, str]:
    return {s["address"]: s["state"] for s in json.loads(ok(config, "senders", "list", "--json"))}


def test_audit_commands_read_a_log_written_through_smtp(tmp_path: Path) -> None:
    port = free_port()
    with Sink() as relay, Sink() as next_hop:
        config = write_config(tmp_path, port, relay, next_hop, maintenance="1h")  # run below
        server = Server(config, port, tmp_path / "serve.log")
        server.start()
        try:
            before = moment()
            send(port, ALICE, BOB, message(ALICE, BOB, subject="Lunch?"))
            send(port, CAROL, BOB, message(CAROL, BOB, subject="Invoice 42"))
            challenges = {c.rcpt_tos[0]: c for c in relay.wait_for(2, timeout=60)}
            assert set(challenges) == {ALICE, CAROL}
            both_held = moment()

            confirm = f"confirm+{token_of(challenges[ALICE])}@example.test"
            send(port, ALICE, confirm, message(ALICE, confirm, subject="Re: your challenge"))
            delivered = next_hop.wait_for(1, timeout=60)[0]
            assert delivered.rcpt_tos == [BOB] and parsed(delivered)["Subject"] == "Lunch?"
            alice_mid = parsed(delivered)["X-SourceAuth-Id"]

            send(port, "", challenges[CAROL].mail_from, dsn(challenges[CAROL].mail_from, CAROL))
            wait_until(
                lambda: senders_now(config).get(CAROL) == "expired",
                timeout=60,
                message="carol expired by the DSN",
            )
            maintained = json.loads(ok(config, "maintain", "--json"))
            assert maintained["purged"] == 1  # carol's held copy: its original deleted
            after = moment()
            check_history(config, alice_mid)
            carol_mid = check_deleted_message(config)
            check_explain(config, alice_mid, carol_mid)
            check_state_at(config, before, both_held, after, alice_mid, carol_mid)
            check_seal_verify_export(config, tmp_path, both_held, alice_mid, carol_mid)
        finally:
            assert server.stop() == 0, server.tail()


def history(config: Path, subject: str) -> list[dict[str, Any]]:
    return list(json.loads(ok(config, "audit", "history", subject, "--json")))


def steps(entries: list[dict[str, Any]], aggregate_id: str) -> list[tuple[str, ...]]:
    return [
        (e["event"], f"{e['from_state']} → {e['to_state']}", e["actor"], e["reason"])
        for e in entries
        if e["aggregate_id"] == aggregate_id
    ]


def check_history(config: Path, alice_mid: str) -> None:
    """Alice's history reads as her state machine and her message's, each step with an actor
    and a reason, under column headers; a prefix of the message id is taken as the id."""
    entries = history(config, ALICE)
    alice_id = next(e["aggregate_id"] for e in entries if e["aggregate"] == "sender")
    assert steps(entries, alice_id) == [
        (
            "Sender.FirstChallenged",
            "unknown → challenged",
            "engine",
            "first_message_from_unknown_sender",
        ),
        ("Sender.ChallengeSent", "challenged → challenged", "relay", "relay_accepted_challenge"),
        ("Sender.Confirmed", "challenged → authorized", ALICE, "valid_reply"),
    ]
    assert steps(entries, alice_mid) == [
        ("Message.Challenged", "unknown → challenged", "engine", "challenge_queued"),
        ("Message.Released", "challenged → authorized", "engine", f"sender_confirmed:{ALICE}"),
        ("Message.Delivered", "authorized → delivered", "next_hop", "next_hop_accepted"),
    ]
    for e in entries:
        assert e["actor"] and e["reason"], e
    reply = [e for e in entries if e["event"] == "Message.Discarded"]
    assert [e["reason"] for e in reply] == ["confirm_accepted: sender confirmed"]

    table = ok(config, "audit", "history", alice_mid[:8]).splitlines()
    assert table[0].split() == ["TIME", "KIND", "ID", "EVENT", "TRANSITION", "ACTOR", "REASON"]
    assert [line.split()[4:7] for line in table[1:]] == [
        ["Message.Challenged", "unknown", "→"],
        ["Message.Released", "challenged", "→"],
        ["Message.Delivered", "authorized", "→"],
    ]
    assert all(alice_mid in line for line in table[1:])


def check_deleted_message(config: Path) -> str:
    """Carol's challenge came back as a DSN: she expired, her copy expired, and maintenance
    purged it (its original deleted). Returns that copy's id."""
    entries = history(config, CAROL)
    carol_id = next(e["aggregate_id"] for e in entries if e["aggregate"] == "sender")
    carol_mid = next(e["aggregate_id"] for e in entries if e["event"] == "Message.Challenged")
    assert steps(entries, carol_id)[1:] == [
        ("Sender.ChallengeSent", "challenged → challenged", "relay", "relay_accepted_challenge"),
        ("Sender.ChallengeFailed", "challenged → expired", "dsn", "challenge_undeliverable"),
    ]
    failed = next(e for e in entries if e["event"] == "Sender.ChallengeFailed")
    assert "5.1.1" in failed["fields"]["diagnostic"]
    assert steps(entries, carol_mid) == [
        ("Message.Challenged", "unknown → challenged", "engine", "challenge_queued"),
        ("Message.Expired", "challenged → expired", "engine", "challenge_failed"),
        ("Message.Purged", "expired → purged", "engine", "challenge_failed; original deleted"),
    ]
    purged = next(e for e in entries if e["event"] == "Message.Purged")
    assert purged["fields"]["blob_deleted"] is True
    return str(carol_mid)


def check_explain(config: Path, alice_mid: str, carol_mid: str) -> None:
    released = ok(config, "audit", "explain", alice_mid[:6]).strip()
    assert "\n" not in released
    for part in (
        f"Message {alice_mid} was received at",
        f"from <{ALICE}> for {BOB} (subject 'Lunch?'",
        "It was held while its sender was challenged (challenge_queued).",
        "the relay smtp://127.0.0.1:",
        f"a valid reply from {ALICE} confirmed it at",
        "It was released at",
        f"(sender_confirmed:{ALICE})",
        "It was delivered at",
        f"to {BOB} through smtp://127.0.0.1:",
    ):
        assert part in released, (part, released)
    assert released.endswith("It is now delivered.")

    deleted = ok(config, "audit", "explain", carol_mid).strip()
    for part in (
        f"from <{CAROL}> for {BOB} (subject 'Invoice 42'",
        "it proved undeliverable at",
        "(dsn: 5.1.1 550 5.1.1 no such user)",
        "It expired at",
        "(challenge_failed)",
        "Maintenance purged it at",
        "(challenge_failed; original deleted)",
    ):
        assert part in deleted, (part, deleted)
    assert deleted.endswith("It is now purged.")
    assert deleted.index("undeliverable") < deleted.index("expired at") < deleted.index("purged it")


def check_state_at(
    config: Path, before: str, both_held: str, after: str, alice_mid: str, carol_mid: str
) -> None:
    def at(moment: str, *subject: str) -> dict[str, Any]:
        found = json.loads(ok(config, "audit", "state", "--at", moment, *subject, "--json"))
        assert found["at"] == moment
        return {
            "senders": {
                s["address"]: (s["state"], s["actor"], s["reason"]) for s in found["senders"]
            },
            "messages": {m["id"]: (m["state"], m["reason"]) for m in found["messages"]},
        }

    assert at(before) == {"senders": {}, "messages": {}}
    held = at(both_held)
    assert held["senders"] == {
        ALICE: ("challenged", "relay", "relay_accepted_challenge"),
        CAROL: ("challenged", "relay", "relay_accepted_challenge"),
    }
    assert held["messages"] == {
        alice_mid: ("challenged", "challenge_queued"),
        carol_mid: ("challenged", "challenge_queued"),
    }
    now = at(after)
    assert now["senders"] == {
        ALICE: ("authorized", ALICE, "valid_reply"),
        CAROL: ("expired", "dsn", "challenge_undeliverable"),
    }
    assert now["messages"][alice_mid] == ("delivered", "next_hop_accepted")
    assert now["messages"][carol_mid] == ("purged", "challenge_failed; original deleted")
    # the reply and the DSN were recorded and discarded on arrival, with their reasons
    assert sorted(r for s, r in now["messages"].values() if s == "discarded") == [
        "bounce_recorded: challenge failed",
        "confirm_accepted: sender confirmed",
    ]
    assert at(after, ALICE)["senders"] == {ALICE: ("authorized", ALICE, "valid_reply")}
    assert at(both_held, carol_mid[:10])["messages"] == {
        carol_mid: ("challenged", "challenge_queued")
    }
    text = ok(config, "audit", "state", "--at", after).splitlines()
    assert text[0] == f"as of {after}" and text[1] == "senders:"
    assert text[2].split() == ["ADDRESS", "SCOPE", "STATE", "SINCE", "ACTOR", "REASON"]
    assert any(line.split()[:3] == [CAROL, "global", "expired"] for line in text)


def check_seal_verify_export(
    config: Path, tmp: Path, both_held: str, alice_mid: str, carol_mid: str
) -> None:
    head = json.loads(ok(config, "audit", "seal"))
    seal = tmp / "seal.json"
    seal.write_text(json.dumps(head), encoding="utf-8")
    verified = ok(config, "audit", "verify", "--seal", str(seal))
    assert verified.startswith("log sound: "), verified
    assert f"hash chain intact to position {head['position']}" in verified
    assert f"the sealed head at {head['position']} matches" in verified
    assert "every transition legal" in verified and "views equal a fresh rebuild" in verified

    lines = [json.loads(line) for line in ok(config, "audit", "export").splitlines()]
    assert [e["position"] for e in lines] == list(range(1, head["position"] + 1))
    assert f"{len(lines)} events" in verified
    of_carol = [e["event"] for e in lines if e["aggregate_id"] == carol_mid]
    assert of_carol == ["Message.Challenged", "Message.Expired", "Message.Purged"]
    of_alice = [e["event"] for e in lines if e["aggregate_id"] == alice_mid]
    assert of_alice == ["Message.Challenged", "Message.Released", "Message.Delivered"]
    failed = next(e for e in lines if e["event"] == "Sender.ChallengeFailed")
    assert failed["fields"]["actor"] == "dsn" and "5.1.1" in failed["fields"]["diagnostic"]

    later = [
        json.loads(line)
        for line in ok(config, "audit", "export", "--since", both_held).splitlines()
    ]
    assert later and all(
        datetime.fromisoformat(e["timestamp"]) >= datetime.fromisoformat(both_held) for e in later
    )
    assert {e["event"] for e in later} >= {
        "Sender.Confirmed",
        "Sender.ChallengeFailed",
        "Message.Purged",
    }
    assert not any(e["event"] == "Message.Challenged" for e in later)
    assert len(later) < len(lines)
