"""The outbound side: challenges leave through the relay with a VERP return path, and
released or unprotected mail goes to the next hop. Both are engine ports (blocking calls).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sourceauth.adapters.smtp.challenge import (
    DEFAULT_BODY_TEMPLATE,
    DEFAULT_SUBJECT_TEMPLATE,
    ChallengeContent,
    compose_challenge,
    verp_address,
)
from sourceauth.adapters.smtp.delivery import NextHop, Outcome, deliver, send_message
from sourceauth.engine.api import (
    DeliveryJob,
    DeliveryResult,
    OutgoingChallenge,
    SendOutcome,
    SendResult,
)
from sourceauth.engine.logs import get_logger
from sourceauth.engine.ports import BlobCorrupt, BlobNotFound, BlobStore, BlobStoreUnavailable

log = get_logger(__name__)


@dataclass
class ChallengeSender:
    """Composes a challenge (never the original body) and sends it through the relay."""

    relay: NextHop
    confirm_address: str
    bounce_address: str
    hostname: str
    delimiter: str = "+"
    subject_template: str = DEFAULT_SUBJECT_TEMPLATE
    body_template: str = DEFAULT_BODY_TEMPLATE
    display_name: str = "Mail Source Authentication"
    timeout: float = 30.0
    link_base: str = ""  # "<base_url>/confirm/" when the web is on

    def compose(self, challenge: OutgoingChallenge) -> bytes:
        content = ChallengeContent(
            challenge_from=self.confirm_address,
            reply_to=verp_address(self.confirm_address, challenge.token, self.delimiter),
            to=challenge.to,
            original_subject=challenge.subject,
            original_date="",
            original_message_id=challenge.in_reply_to,
            protected_recipient=challenge.recipient,
            token=challenge.token,
            hostname=self.hostname,
            expires_at=datetime.fromtimestamp(challenge.expires_at, tz=UTC),
            challenge_id=challenge.challenge_id,
            thread_id=challenge.thread_id,
            confirm_url=f"{self.link_base}{challenge.token}" if self.link_base else "",
        )
        return compose_challenge(
            content,
            subject_template=self.subject_template,
            body_template=self.body_template,
            display_name=self.display_name,
        )

    def send(self, challenge: OutgoingChallenge) -> SendResult:
        raw = self.compose(challenge)
        result = send_message(
            self.relay,
            mail_from=verp_address(self.bounce_address, challenge.token, self.delimiter),
            recipient=challenge.to,
            raw=raw,
            timeout=self.timeout,
            helo=self.hostname,
        )
        text = f"{result.code} {result.text}".strip()
        if result.outcome == Outcome.DELIVERED:
            return SendResult(SendOutcome.SENT, f"{self.relay}: {text}")
        if result.outcome == Outcome.PERMANENT:
            return SendResult(SendOutcome.PERMANENT, text)
        return SendResult(SendOutcome.TEMPORARY, text)


@dataclass
class NextHopDelivery:
    """Reads the original from the blob store (checking its SHA-256) and hands it on,
    stamped with the copy's stable X-SourceAuth-Id."""

    next_hop: NextHop
    blobs: BlobStore
    hostname: str
    timeout: float = 30.0
    on_unreadable: Callable[[], None] | None = None  # [metrics]: count each unreadable original

    def deliver(self, job: DeliveryJob) -> DeliveryResult:
        try:
            raw = self.blobs.get(job.receipt_id, verify_sha256=job.sha256)
        except BlobStoreUnavailable as exc:
            # Storage trouble passes: the copy is retried with the usual backoff.
            log.warning("delivery_blob_unavailable", message_id=job.message_id, error=str(exc))
            return DeliveryResult(
                temporary=job.recipients,
                diagnostic=f"original unavailable: {exc}",
                next_hop=str(self.next_hop),
            )
        except (BlobNotFound, BlobCorrupt) as exc:
            # Never a permanent failure: the original may be on another node's disk or come
            # back from a restore. The copy stays queued and retried; the operator is told.
            log.error("delivery_blob_unreadable", message_id=job.message_id, error=str(exc))
            if self.on_unreadable is not None:
                self.on_unreadable()
            return DeliveryResult(
                temporary=job.recipients,
                diagnostic=f"original unreadable: {exc}",
                next_hop=str(self.next_hop),
            )
        return deliver(
            self.next_hop,
            mail_from=job.mail_from,
            recipients=job.recipients,
            raw=raw,
            sourceauth_id=job.message_id,
            timeout=self.timeout,
            helo=self.hostname,
        )
