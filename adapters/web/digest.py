"""The optional digest: one plain-text mail to each protected recipient with held mail, listing
it (date, sender, subject, size; never a body) with the signed link to review it. Sent through
the next hop by the outbound workers every `[web] digest_interval` when `[web] digest` is on."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from sourceauth.adapters.smtp.delivery import NextHop, deliver
from sourceauth.engine import tokens
from sourceauth.engine.api import HeldMessage
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.logs import get_logger
from sourceauth.engine.message import HELD_STATES

log = get_logger(__name__)

_LISTED = 200  # messages listed in one digest; the link shows them all


def _text(value: str, limit: int = 120) -> str:
    """A value from the wire as one printable line."""
    return "".join(ch if ch.isprintable() else " " for ch in value[: limit * 4])[:limit].strip()


def compose_digest(
    recipient: str, held: list[HeldMessage], link: str, *, sender: str, now: float
) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Mail Source Authentication <{sender}>"
    msg["To"] = recipient
    msg["Subject"] = f"{len(held)} message{'s' if len(held) != 1 else ''} held for you"
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = f"<digest.{uuid.uuid4().hex}@{sender.rpartition('@')[2] or 'localhost'}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    lines = [
        f"These messages to {recipient} are held until their senders confirm.",
        "Release, discard, always allow or block them here:",
        "",
        link,
        "",
    ]
    for m in held[:_LISTED]:
        when = datetime.fromtimestamp(m.received, UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(f"{when}  {_text(m.sender, 80)}  {_text(m.subject) or '(no subject)'}")
    if len(held) > _LISTED:
        lines.append(f"... and {len(held) - _LISTED} more (see the link).")
    msg.set_content("\n".join(lines) + "\n", charset="utf-8")
    return msg.as_bytes()


class Digest:
    """One digest per recipient with held mail; returns how many recipients took one."""

    def __init__(
        self,
        app: SourceAuth,
        *,
        next_hop: NextHop,
        base_url: str,
        review_ttl: float,
        sender: str,
        hostname: str,
    ) -> None:
        self.app, self.next_hop, self.base_url = app, next_hop, base_url
        self.review_ttl, self.sender, self.hostname = review_ttl, sender, hostname

    def send_all(self) -> int:
        by_recipient: dict[str, list[HeldMessage]] = defaultdict(list)
        for state in sorted(HELD_STATES):
            for m in self.app.quarantine(state=state):
                for recipient in m.recipients:
                    by_recipient[recipient].append(m)
        sent = 0
        now = self.app.clock()
        for recipient, held in sorted(by_recipient.items()):
            held.sort(key=lambda m: m.received)
            token = tokens.sign_review_link(self.app.keyring, recipient, int(now + self.review_ttl))
            raw = compose_digest(
                recipient, held, f"{self.base_url}/review/{token}", sender=self.sender, now=now
            )
            result = deliver(
                self.next_hop,
                mail_from="",  # a notice: nothing may bounce back to anyone
                recipients=(recipient,),
                raw=raw,
                sourceauth_id=f"digest-{uuid.uuid4().hex}",
                helo=self.hostname,
            )
            sent += len(result.delivered)
            log.info(
                "digest_sent", recipient=recipient, held=len(held), delivered=bool(result.delivered)
            )
        return sent
