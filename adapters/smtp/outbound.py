"""The outbound side: challenges leave through the relay with a VERP return path, and
released or unprotected mail goes to the next hop. Both are engine ports (blocking calls).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sourceauth.adapters.smtp.challenge import (
    DEFAULT_BODY_TEMPLATE,
    DEFAULT_SUBJECT_TEMPLATE,
    ChallengeContent,
    compose_challenge,
    verp_address,
)
from sourceauth.adapters.smtp.delivery import (
    MAILDIR_CHUNK,
    Connection,
    MaildirCopy,
    NextHop,
    Outcome,
    Outgoing,
    RecipientResult,
    deliver,
    deliver_maildir_batch,
    delivery_done,
    send_messages,
    stamp,
)
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
        """One challenge: `send_batch` of one, never stopped."""
        (result,) = self.send_batch([challenge], lambda: False)
        if result is None:  # cannot happen: nothing asked it to stop
            raise RuntimeError("send_batch left the challenge untried")
        return result

    def send_batch(
        self, challenges: Sequence[OutgoingChallenge], stop: Callable[[], bool]
    ) -> list[SendResult | None]:
        """Several challenges at once: over one SMTP session to the relay (RSET between), or
        into a Maildir outbox in chunks fsync'd together. None for one not tried because
        `stop()` became true first."""
        messages = [
            Outgoing(
                mail_from=verp_address(self.bounce_address, c.token, self.delimiter),
                recipient=c.to,
                raw=self.compose(c),
                maybe_written=c.maybe_sent,
            )
            for c in challenges
        ]
        results = send_messages(
            self.relay, messages, timeout=self.timeout, helo=self.hostname, stop=stop
        )
        return [None if r is None else self._outcome(r) for r in results]

    def _outcome(self, result: RecipientResult) -> SendResult:
        text = f"{result.code} {result.text}".strip()
        if result.outcome == Outcome.DELIVERED:
            return SendResult(SendOutcome.SENT, f"{self.relay}: {text}")
        if result.outcome == Outcome.PERMANENT:
            return SendResult(SendOutcome.PERMANENT, text)
        return SendResult(SendOutcome.TEMPORARY, text)


IDLE_CLOSE = 10.0  # seconds a kept-open next-hop connection may sit unused before it is closed


@dataclass
class NextHopDelivery:
    """Reads the original from the blob store (checking its SHA-256) and hands it on,
    stamped with the copy's stable X-SourceAuth-Id.

    `deliver_batch` (what the delivery worker calls) hands many copies on over at most
    `connections` parallel sessions to an smtp/lmtp next hop, each kept open for up to
    `batch` transactions (RSET between) and across calls while it is used."""

    next_hop: NextHop
    blobs: BlobStore
    hostname: str
    timeout: float = 30.0
    on_unreadable: Callable[[], None] | None = None  # [metrics]: count each unreadable original
    connections: int = 1
    batch: int = 1
    _idle: list[Connection] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    # Set by `halt`: a batch in progress tries no more copies (they stay queued, untouched).
    _halted: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def _original(self, job: DeliveryJob) -> bytes | DeliveryResult:
        try:
            return self.blobs.get(job.receipt_id, verify_sha256=job.sha256)
        except BlobStoreUnavailable as exc:
            # Storage trouble passes: the copy is retried with the usual backoff.
            log.warning("delivery_blob_unavailable", message_id=job.message_id, error=str(exc))
            return self._temporary(job, f"original unavailable: {exc}")
        except (BlobNotFound, BlobCorrupt) as exc:
            # Never a permanent failure: the original may be on another node's disk or come
            # back from a restore. The copy stays queued and retried; the operator is told.
            log.error("delivery_blob_unreadable", message_id=job.message_id, error=str(exc))
            if self.on_unreadable is not None:
                self.on_unreadable()
            return self._temporary(job, f"original unreadable: {exc}")

    def _temporary(self, job: DeliveryJob, diagnostic: str) -> DeliveryResult:
        return DeliveryResult(
            temporary=job.recipients, diagnostic=diagnostic, next_hop=str(self.next_hop)
        )

    def deliver(self, job: DeliveryJob) -> DeliveryResult:
        raw = self._original(job)
        if isinstance(raw, DeliveryResult):
            return raw
        return deliver(
            self.next_hop,
            mail_from=job.mail_from,
            recipients=job.recipients,
            raw=raw,
            sourceauth_id=job.message_id,
            timeout=self.timeout,
            helo=self.hostname,
            maybe_written=job.maybe_sent,
        )

    def deliver_batch(self, jobs: Sequence[DeliveryJob]) -> list[DeliveryResult | None]:
        """One result per job, in order; None for a copy not tried (a session broke mid-way
        and no other was left to take it, or `halt` came first): it stays queued, untouched,
        for the next round.
        A next hop that cannot be reached at all makes every copy not yet tried temporary."""
        if self.next_hop.scheme == "maildir":
            return self._maildir_batch(jobs)
        if self.connections == 1 and self.batch == 1:
            return [None if self._halted.is_set() else self.deliver(job) for job in jobs]
        results: list[DeliveryResult | None] = [None] * len(jobs)
        todo = deque(range(len(jobs)))
        down: list[str] = []  # the reason the hop could not be reached, once it could not
        sent: list[int] = []

        def work() -> None:
            conn = self._checkout()
            try:
                while True:
                    with self._lock:
                        if not todo or self._halted.is_set():
                            return
                        i = todo.popleft()
                        reason = down[0] if down and not sent else None
                    if reason is not None:
                        results[i] = self._temporary(jobs[i], reason)
                        continue
                    job = jobs[i]
                    raw = self._original(job)
                    if isinstance(raw, DeliveryResult):
                        results[i] = raw
                        continue
                    results[i], status = conn.deliver(
                        mail_from=job.mail_from,
                        recipients=job.recipients,
                        raw=raw,
                        sourceauth_id=job.message_id,
                    )
                    with self._lock:
                        if status == "sent":
                            sent.append(i)
                        elif status == "down":
                            down.append(results[i].diagnostic)  # type: ignore[union-attr]
                    if status == "broken":
                        log.warning(
                            "delivery_session_broken",
                            next_hop=str(self.next_hop),
                            message_id=job.message_id,
                            left=len(todo),
                        )
                        return
                    if status == "down" and sent:
                        return  # others reach the hop: leave the rest to them
            finally:
                self._checkin(conn)

        width = min(self.connections, len(jobs))
        pool = self._executor()
        for future in [pool.submit(work) for _ in range(width)]:
            future.result()
        return results

    def _maildir_batch(self, jobs: Sequence[DeliveryJob]) -> list[DeliveryResult | None]:
        """Into the Maildirs in chunks, each written and fsync'd together (one commit of the
        file system for a chunk, not two a copy); a halt leaves the chunks not begun queued."""
        results: list[DeliveryResult | None] = [None] * len(jobs)
        for start in range(0, len(jobs), MAILDIR_CHUNK):
            if self._halted.is_set():
                break
            todo: list[int] = []
            copies: list[MaildirCopy] = []
            for i in range(start, min(start + MAILDIR_CHUNK, len(jobs))):
                job = jobs[i]
                raw = self._original(job)
                if isinstance(raw, DeliveryResult):
                    results[i] = raw
                    continue
                todo.append(i)
                copies.append(
                    MaildirCopy(
                        job.mail_from,
                        job.recipients,
                        stamp(raw, job.message_id),
                        job.message_id,
                        job.maybe_sent,
                    )
                )
            answers = deliver_maildir_batch(self.next_hop.path, copies)
            for i, answer in zip(todo, answers, strict=True):
                results[i] = delivery_done(self.next_hop, answer, jobs[i].message_id)
        return results

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.connections, thread_name_prefix="sa-next-hop"
                )
            return self._pool

    def _checkout(self) -> Connection:
        now = time.monotonic()
        stale: list[Connection] = []
        with self._lock:
            conn = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if now - candidate.last_used < IDLE_CLOSE:
                    conn = candidate
                else:
                    stale.append(candidate)
        for old in stale:
            old.close()
        return conn or Connection(
            self.next_hop, timeout=self.timeout, helo=self.hostname, max_messages=self.batch
        )

    def _checkin(self, conn: Connection) -> None:
        if not conn.is_open:
            return
        with self._lock:
            self._idle.append(conn)

    def halt(self) -> None:
        """The process stops: each session of a batch in progress ends after its current
        transaction; the copies not tried yet come back as None (queued for the next round)."""
        self._halted.set()

    def close(self) -> None:
        """QUIT every kept-open connection (the delivery worker stops)."""
        with self._lock:
            idle, self._idle = self._idle, []
            pool, self._pool = self._pool, None
        for conn in idle:
            conn.close()
        if pool is not None:
            pool.shutdown(wait=True)
