"""Routing is a pure function: an envelope and the state of its senders -> one typed route
per recipient. No aggregate, no store, no clock: plain values in, plain values out."""

from __future__ import annotations

from sourceauth.engine.api import Blob, Incoming
from sourceauth.engine.service.routing import (
    AwaitSender,
    ChallengeReply,
    ChallengeReport,
    DeliverNow,
    Discard,
    HoldSilently,
    plan,
    route,
)
from sourceauth.engine.settings import EngineSettings

SETTINGS = EngineSettings(
    protected=("example.test",),
    confirm_address="confirm@example.test",
    bounce_address="bounces@example.test",
)
BLOB = Blob("k", 10, "0" * 64)


def envelope(sender: str, *rcpts: str, headers: tuple[tuple[str, str], ...] = ()) -> Incoming:
    return Incoming(sender, tuple(rcpts), BLOB, headers)


def routes(incoming: Incoming, state: str = "unknown") -> dict[str, object]:
    p = plan(incoming, SETTINGS)
    return dict(route(p, incoming, SETTINGS, {scope: state for scope in p.scopes}))


def test_each_sender_state_routes_a_protected_recipient_its_own_way() -> None:
    mail = envelope("Alice@Remote.test", "bob@example.test", "dave@other.test")
    assert routes(mail, "unknown") == {
        "bob@example.test": AwaitSender("global"),
        "dave@other.test": DeliverNow("recipient_unprotected"),
    }
    assert routes(mail, "authorized")["bob@example.test"] == DeliverNow("sender_authorized")
    assert routes(mail, "blocked")["bob@example.test"] == Discard("sender_blocked")
    assert routes(mail, "expired")["bob@example.test"] == AwaitSender("global")


def test_a_never_challenge_class_is_held_silently_by_default() -> None:
    [(rcpt, r)] = route(
        plan(envelope("<>", "bob@example.test"), SETTINGS),
        envelope("<>", "bob@example.test"),
        SETTINGS,
        {},
    )
    assert rcpt == "bob@example.test"
    assert isinstance(r, HoldSilently) and r.reason.startswith("never_challenge:null_sender")


def test_replies_and_reports_are_answers_settled_before_any_route() -> None:
    mail = envelope("alice@remote.test", "bob@example.test", "confirm+TOK@example.test")
    p = plan(mail, SETTINGS)
    assert p.answers == (("confirm+tok@example.test", ChallengeReply("tok")),)
    assert [r for r, _ in route(p, mail, SETTINGS, {"global": "unknown"})] == ["bob@example.test"]
    report = envelope("<>", "bounces+TOK@example.test")
    assert plan(report, SETTINGS).answers == (("bounces+tok@example.test", ChallengeReport("tok")),)


def test_a_recipient_named_twice_is_routed_once_and_the_scope_follows_the_settings() -> None:
    mail = envelope("alice@remote.test", "bob@example.test", "BOB@example.test")
    assert plan(mail, SETTINGS).recipients == ("bob@example.test",)
    per_mailbox = EngineSettings(**{**vars(SETTINGS), "scope": "recipient"})
    p = plan(envelope("alice@remote.test", "bob+news@example.test"), per_mailbox)
    assert p.scopes == ("bob@example.test",)
