"""Shared fixtures: a fake clock, a keyring, engines on a real SQLite file, and message helpers.

The fakes here stand for the network only (the challenge relay and the next hop); the
event store, the views and the blob store are the real ones, on files under tmp_path.
Helpers are plain functions too, so other test modules can `from tests.conftest import …`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator, Sequence
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import pytest

from sourceauth.adapters.smtp.inbound import parse_headers
from sourceauth.adapters.storage.wiring import Storage, open_engine
from sourceauth.engine import tokens
from sourceauth.engine.addresses import is_null_sender
from sourceauth.engine.api import (
    Blob,
    BounceInfo,
    Incoming,
)
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.settings import EngineSettings
from tests.support.fakes import START, FakeChallenges, FakeClock, FakeDeliveries

__all__ = ["START", "FakeChallenges", "FakeClock", "FakeDeliveries"]  # imported from here too

PROTECTED = ("example.test",)
CONFIRM = "confirm@example.test"
BOUNCES = "bounces@example.test"


# ------------------------------------------------------------------------------ time and keys


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keyring() -> tokens.Keyring:
    return tokens.generate_keyring()


# ------------------------------------------------------------------------------ network fakes


@pytest.fixture
def relay() -> FakeChallenges:
    """The challenge relay, accepting every challenge."""
    return FakeChallenges()


@pytest.fixture
def next_hop() -> FakeDeliveries:
    """The next hop, accepting every recipient."""
    return FakeDeliveries()


# ------------------------------------------------------------------------------ engines


EngineFactory = Callable[..., SourceAuth]


@pytest.fixture
def make_engine(
    tmp_path: Path, clock: FakeClock, keyring: tokens.Keyring
) -> Iterator[EngineFactory]:
    """Build a SourceAuth on tmp_path/sourceauth.db (blobs in tmp_path/blobs), closed at teardown.

    make_engine(challenges=FakeChallenges(), deliveries=FakeDeliveries(), scope="recipient", …):
    keyword arguments naming EngineSettings fields override the test defaults (protected
    example.test, confirm@ and bounces@example.test); `path`, `clock` and `keyring` may be
    given to open a second engine on the same file or with another key.
    """
    opened: list[SourceAuth] = []

    def build(**kwargs: Any) -> SourceAuth:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("keyring", keyring)
        app = build_engine(tmp_path, **kwargs)
        opened.append(app)
        return app

    yield build
    for app in opened:
        try:
            app.close()
        except Exception:  # a test may have closed it already
            pass


def build_engine(
    directory: Path,
    *,
    clock: Callable[[], float],
    keyring: tokens.Keyring,
    path: Path | None = None,
    challenges: Any = None,
    deliveries: Any = None,
    **overrides: Any,
) -> SourceAuth:
    """A SourceAuth on directory/sourceauth.db (or `path`) with blobs in directory/blobs."""
    return open_engine(
        settings=settings_for(**overrides),
        keyring=keyring,
        storage=Storage(
            sqlite_path=path or directory / "sourceauth.db",
            blob_dir=directory / "blobs",
            # A real file; fsync per commit is measured elsewhere and only slows tests here.
            sqlite_synchronous="NORMAL",
            blob_fsync=False,
        ),
        clock=clock,
        challenges=challenges,
        deliveries=deliveries,
    )


def settings_for(**overrides: Any) -> EngineSettings:
    """The test policy: example.test protected, confirm@/bounces@example.test, plus overrides."""
    names = {f.name for f in dataclasses.fields(EngineSettings)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"not EngineSettings fields: {sorted(unknown)}")
    base: dict[str, Any] = {
        "protected": PROTECTED,
        "confirm_address": CONFIRM,
        "bounce_address": BOUNCES,
    }
    return EngineSettings(**{**base, **overrides})


# ------------------------------------------------------------------------------ messages


def raw_message(
    mail_from: str,
    to: Sequence[str],
    *,
    subject: str = "hello",
    headers: Sequence[tuple[str, str]] = (),
    body: str = "Hello Bob,\r\nlunch on Friday?\r\n",
    message_id: str | None = None,
) -> bytes:
    """An RFC 5322 message: From/To/Subject/Date/Message-ID, then `headers`, then the body."""
    lines = [
        ("From", "MAILER-DAEMON@remote.test" if is_null_sender(mail_from) else mail_from),
        ("To", ", ".join(to)),
        ("Subject", subject),
        ("Date", formatdate(START)),
        ("Message-ID", message_id or make_msgid(domain="remote.test")),
        *headers,
    ]
    head = "".join(f"{k}: {v}\r\n" for k, v in lines)
    return (head + "\r\n" + body).encode("utf-8")


def incoming(
    app: SourceAuth,
    mail_from: str,
    to: Sequence[str] | str,
    **kw: Any,
) -> Incoming:
    """Store a real blob in the engine's blob store and describe it as the SMTP layer would."""
    return describe(app.blobs, mail_from, to, **kw)


def describe(
    blobs: Any,
    mail_from: str,
    to: Sequence[str] | str,
    *,
    subject: str = "hello",
    headers: Sequence[tuple[str, str]] = (),
    body: str = "Hello Bob,\r\nlunch on Friday?\r\n",
    bounce: BounceInfo | None = None,
    raw: bytes | None = None,
    bounce_like: str = "",
) -> Incoming:
    """Put the message's bytes in `blobs` (put(key, data) -> ref with key, size, sha256) and
    describe it as the SMTP layer would: envelope, blob reference, parsed headers."""
    recipients = (to,) if isinstance(to, str) else tuple(to)
    data = (
        raw
        if raw is not None
        else raw_message(mail_from, recipients, subject=subject, headers=headers, body=body)
    )
    ref = blobs.put(uuid.uuid4().hex, data)
    return Incoming(
        mail_from=mail_from,
        recipients=recipients,
        blob=Blob(ref.key, ref.size, ref.sha256),
        headers=parse_headers(data),
        bounce=bounce,
        bounce_like=bounce_like,
    )


def challenge_id_of(app: SourceAuth, address: str, scope: str = "global") -> str:
    """The current challenge id of a sender (read from its aggregate)."""
    sender: Any = app.repository.get(app.sender_id(address, scope))
    assert sender.challenge_id, f"{address} has never been challenged"
    return str(sender.challenge_id)


def token_of(app: SourceAuth, address: str, scope: str = "global") -> str:
    """The token of a sender's current challenge: what its Reply-To carries."""
    return app.token_for(challenge_id_of(app, address, scope))


def settle(app: SourceAuth) -> None:
    """Bring the views up to the end of the log, as every query does."""
    app.whitelist(limit=0)


def reply_to_challenge(
    app: SourceAuth, address: str, *, token: str | None = None, scope: str = "global", **kw: Any
) -> Incoming:
    """An ordinary reply from `address` to confirm+TOKEN@example.test."""
    token = token if token is not None else token_of(app, address, scope)
    local, domain = CONFIRM.split("@")
    kw.setdefault("subject", "Re: please confirm")
    return incoming(app, address, f"{local}+{token}@{domain}", **kw)


def log_position(app: SourceAuth) -> int:
    """The id of the last recorded event (0 for an empty log)."""
    return int(app.recorder.max_notification_id() or 0)


def events_since(app: SourceAuth, position: int) -> list[Any]:
    """The domain events recorded after `position`, in log order."""
    found: list[Any] = []
    while True:
        page = app.recorder.select_notifications(
            start=position, limit=500, inclusive_of_start=False
        )
        if not page:
            return found
        found += [app.mapper.to_domain_event(n) for n in page]
        position = page[-1].id


def event_name(event: Any) -> str:
    """'Sender.Confirmed', 'Message.Challenged', …"""
    return type(event).__qualname__
