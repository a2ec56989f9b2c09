"""The inbound SMTP filter: aiosmtpd speaks SMTP, the engine decides, and 250 is answered
only after the blob is fsync'd and the message's events are committed (group commit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.header
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from sourceauth.adapters.smtp import xforward
from sourceauth.adapters.smtp.dsn import parse_bounce, plain_bounce
from sourceauth.engine.addresses import (
    AddressError,
    is_null_sender,
    normalize_address,
    split_extension,
)
from sourceauth.engine.api import BounceInfo, Headers, Incoming, Receipt
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.errors import InvalidInput, SourceAuthError
from sourceauth.engine.logs import LogThrottle, get_logger
from sourceauth.engine.ports import BlobError, BlobStore, StagedBlobs

log = get_logger(__name__)

HEADER_SCAN_LIMIT = 256 * 1024  # never parse more than this many bytes as headers
# nor more than this many lines: parsing costs about 10 us a field, on the commit thread, and
# 256 KiB of tiny fields took half a second. The MTA prepends what the engine trusts.
HEADER_LINE_LIMIT = 2000
# Plain-bounce scans (flufl.bounce's detectors, milliseconds each) waiting or running at once;
# over this, mail is taken without one (and may be challenged, as before): a flood of
# strangers slows its own scans, never every session.
PLAIN_BOUNCE_BACKLOG = 16


def parse_headers(raw: bytes) -> Headers:
    """Header fields as (name, unfolded value); Subject decoded from RFC 2047. Never raises."""
    head = raw[:HEADER_SCAN_LIMIT]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    if end >= 0:
        head = head[: end + 2]
    newline = -1
    for _ in range(HEADER_LINE_LIMIT):
        newline = head.find(b"\n", newline + 1)
        if newline < 0:
            break
    else:
        head = head[: newline + 1]
    try:
        msg = BytesHeaderParser(policy=compat32).parsebytes(head)
        items = msg.items()
    except Exception:
        return ()
    out: list[tuple[str, str]] = []
    for name, value in items:
        text = str(value).replace("\r", "").replace("\n", "")
        if name.lower() == "subject":
            try:
                text = str(email.header.make_header(email.header.decode_header(text)))
            except Exception:
                pass
        out.append((name, text))
    return tuple(out)


class Record(Protocol):
    def __call__(
        self, batch: Sequence[Incoming], *, attachments: Sequence[tuple[str, bytes]] = ()
    ) -> list[Receipt]: ...


@dataclass
class _Pending:
    mail_from: str
    recipients: tuple[str, ...]
    raw: bytes
    # An asyncio future settled on `loop` (the SMTP listener), or, with no loop, a thread's
    # concurrent future (the milter's callbacks run in libmilter's threads).
    future: asyncio.Future[Receipt] | concurrent.futures.Future[Receipt]
    loop: asyncio.AbstractEventLoop | None
    bounce: BounceInfo | None
    queued: float = field(default_factory=time.monotonic)
    bounce_like: str = ""
    client_address: str = ""
    client_helo: str = ""
    kept_by_mta: bool = False
    # Whether the committer may hold this item's batch open (`wait_ms`) for more to arrive.
    # The SMTP listeners' sessions (one event loop) keep the window. A milter session is a
    # libmilter thread blocked on its own future: the window could only gather other
    # sessions' messages, which the next batch takes at once anyway (they queue while this
    # one commits), so it only delays the reply (measured: benchmarks/README.md, Postfix).
    linger: bool = True


class GroupCommitter:
    """One writer thread: takes what arrived meanwhile (up to `max_batch`), stages every blob
    (one group fsync, or inside the event transaction), records every decision in one
    transaction, then answers each.

    A batch stays open up to `wait_ms` for more only while one of its items lingers
    (_Pending.linger); a batch of items that do not (the milter's) is what the queue holds
    when the writer takes it, committed at once."""

    def __init__(
        self,
        app: SourceAuth,
        blobs: BlobStore,
        *,
        max_batch: int = 256,
        wait_ms: float = 2.0,
        on_commit: Callable[[list[Receipt]], None] | None = None,
        record: Record | None = None,
    ) -> None:
        self.app = app
        # What a batch is recorded with: the inbound decisions by default; the correspondents
        # listener passes SourceAuth.submit_outbound_many (adapters/runtime.py).
        self.record: Record = record or app.receive_many
        self.blobs = blobs
        self.max_batch = max_batch
        self.wait = wait_ms / 1000.0
        self.on_commit = on_commit
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sourceauth-commit", daemon=True)
        self.batches = 0
        self.committed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish everything already queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def submit(self, item: _Pending) -> None:
        self._queue.put(item)

    def _take(self) -> tuple[list[_Pending], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.wait
        linger = self.wait > 0 and first.linger
        stopping = False
        while len(batch) < self.max_batch:
            try:
                item = (
                    self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    if linger
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                stopping = True
                break
            batch.append(item)
            linger = linger or (self.wait > 0 and item.linger)
        return batch, stopping

    def _run(self) -> None:
        while True:
            batch, stopping = self._take()
            if batch:
                self._commit(batch)
            if stopping:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        items = [(uuid.uuid4().hex, item.raw) for item in batch]
        try:
            staged = self.blobs.stage(items)
        except (BlobError, OSError) as exc:
            log.error("blob_store_failed", error=str(exc), batch=len(batch))
            for item in batch:
                _resolve(item, exc=exc)
            return
        incomings = [
            Incoming(
                mail_from=item.mail_from,
                recipients=item.recipients,
                blob=blob,
                headers=parse_headers(item.raw),
                bounce=item.bounce,
                bounce_like=item.bounce_like,
                client_address=item.client_address,
                client_helo=item.client_helo,
                kept_by_mta=item.kept_by_mta,
            )
            for item, blob in zip(batch, staged.blobs, strict=True)
        ]
        try:
            receipts = self.record(incomings, attachments=staged.with_events)
        except Exception as exc:
            log.error("commit_failed", error=str(exc), batch=len(batch))
            if len(batch) > 1 and isinstance(exc, SourceAuthError):
                for item, incoming in zip(batch, incomings, strict=True):
                    self._commit_one(item, incoming, staged)
                return
            for item in batch:
                _resolve(item, exc=exc)
            return
        self.batches += 1
        self.committed += len(batch)
        _answer_all(batch, receipts)
        if self.on_commit is not None:
            self.on_commit(receipts)

    def _commit_one(self, item: _Pending, incoming: Incoming, staged: StagedBlobs) -> None:
        try:
            attachments = staged.with_events_for(incoming.blob.key)
            receipt = self.record([incoming], attachments=attachments)[0]
        except Exception as exc:
            _resolve(item, exc=exc)
            return
        _resolve(item, receipt=receipt)
        if self.on_commit is not None:
            self.on_commit([receipt])


@dataclass(frozen=True)
class BodyFindings:
    """What reading a message's body found before it is recorded (Incoming.bounce and
    Incoming.bounce_like)."""

    bounce: BounceInfo | None = None
    bounce_like: str = ""


NOTHING_FOUND = BodyFindings()
BodyReader = Callable[[bytes], BodyFindings]


def read_report(raw: bytes) -> BodyFindings:
    """A report sent to the bounce address: what it says of the delivery."""
    report = parse_bounce(raw)
    detail = " ".join(x for x in (report.status, report.diagnostic) if x)
    return BodyFindings(bounce=BounceInfo(failed=report.failed, diagnostic=detail or report.action))


def read_plain_bounce(raw: bytes) -> BodyFindings:
    """Mail that could draw a challenge: is it a bounce in no report format (plain_bounce)?"""
    return BodyFindings(bounce_like=plain_bounce(raw))


def _answer_all(batch: list[_Pending], receipts: list[Receipt]) -> None:
    """Every 250 of one commit settled by one callback per event loop (one wake-up of the
    loop, not one per message)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, Receipt]]] = {}
    for item, receipt in zip(batch, receipts, strict=True):
        if item.loop is None:  # a thread's future (the milter): settled here
            _resolve(item, receipt=receipt)
        else:
            by_loop.setdefault(item.loop, []).append((item, receipt))

    def settle(pairs: list[tuple[_Pending, Receipt]]) -> None:
        for item, receipt in pairs:
            if not item.future.done():
                item.future.set_result(receipt)

    for loop, pairs in by_loop.items():
        loop.call_soon_threadsafe(settle, pairs)


def _resolve(
    item: _Pending, *, receipt: Receipt | None = None, exc: BaseException | None = None
) -> None:
    def settle() -> None:
        if item.future.done():
            return
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(receipt)  # type: ignore[arg-type]

    if item.loop is None:
        settle()
    else:
        item.loop.call_soon_threadsafe(settle)


class FilterHandler:
    """aiosmtpd handler: validates the envelope, hands DATA to the committer, replies."""

    def __init__(
        self,
        committer: GroupCommitter,
        *,
        max_recipients: int,
        bounce_address: str,
        delimiter: str = "+",
        reply_within: float | None = None,
        outbound: bool = False,
    ) -> None:
        self.committer = committer
        # The correspondents listener: recipients are anywhere, never held here, so no
        # quarantine quota applies to them.
        self.outbound = outbound
        self.max_recipients = max_recipients
        # A store that does not answer (a database server down or unreachable) gets the
        # client a 451 after this many seconds; the commit may still land: then the client's
        # retry is a second copy, never a lost one. None waits for the commit however long.
        self.reply_within = reply_within
        self.bounce_address = normalize_address(bounce_address)
        self.delimiter = delimiter
        # Bodies are read here (body_reader), one at a time, never on the commit thread: a
        # hostile one (huge, thousands of parts) delays only itself. parse_bounce bounds its
        # own work, as plain_bounce does (flufl.bounce's detectors on mail that may be
        # challenged).
        self.bounce_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sa-bounce")
        # Plain-bounce scans have their own thread: a stranger's mail never queues behind a
        # hostile report's parse (nor a report behind a flood of scans).
        self.scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sa-scan")
        self._scans = 0  # plain-bounce scans waiting or running (event loop only)
        self._throttle = LogThrottle()

    def body_reader(self, mail_from: str, recipients: Sequence[str]) -> BodyReader | None:
        """What a message's body is read for before it is recorded (the SMTP listener and the
        milter both ask here), on the thread reader_thread names: a report to the bounce
        address is parsed; mail that could draw a challenge (SourceAuth.may_be_challenged,
        memory only) is scanned for a plain bounce; anything else is not read (None)."""
        if self.to_bounce_address(recipients):
            return read_report
        if self.committer.app.may_be_challenged(mail_from, recipients):
            return read_plain_bounce
        return None

    def reader_thread(self, read: BodyReader) -> ThreadPoolExecutor:
        return self.scanner if read is read_plain_bounce else self.bounce_reader

    async def _read_body(self, read: BodyReader, raw: bytes) -> BodyFindings:
        """Run `read` off the event loop and never on the commit thread; plain-bounce scans
        at most PLAIN_BOUNCE_BACKLOG at once (past that the mail is taken unscanned)."""
        loop = asyncio.get_running_loop()
        if read is not read_plain_bounce:
            return await loop.run_in_executor(self.bounce_reader, read, raw)
        if self._scans >= PLAIN_BOUNCE_BACKLOG:
            suppressed = self._throttle.passes("plain_bounce_skipped")
            if suppressed is not None:
                log.warning("plain_bounce_skipped", backlog=self._scans, suppressed=suppressed)
            return NOTHING_FOUND
        self._scans += 1
        try:
            return await loop.run_in_executor(self.scanner, read, raw)
        finally:
            self._scans -= 1

    def to_bounce_address(self, recipients: Sequence[str]) -> bool:
        for rcpt in recipients:
            try:
                base, _ = split_extension(normalize_address(rcpt), self.delimiter)
            except AddressError:
                continue
            if base == self.bounce_address:
                return True
        return False

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not is_null_sender(address):
            try:
                normalize_address(address)
            except AddressError as exc:
                # Only text outside RFC 5321/6531's grammar gets here (every valid Path is
                # taken): a syntax error, 501, never 553 (a policy refusal).
                return f"501 5.1.7 Bad sender address syntax: {exc}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients"
        try:
            normalize_address(address)
        except AddressError as exc:
            return f"501 5.1.3 Bad recipient address syntax: {exc}"
        app = self.committer.app
        full = False
        # mailbox_may_be_full reads memory only; the exact check reads the store
        if not self.outbound and app.mailbox_may_be_full(address):
            full = await asyncio.get_running_loop().run_in_executor(
                None, app.quarantine_full, envelope.mail_from or "", address
            )
        if full:
            # 4xx, never 5xx: the sending MTA keeps the message and retries later.
            return "452 4.2.2 Quarantine for this recipient is full, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:
            raw = envelope.content if isinstance(envelope.content, bytes) else b""
        if not envelope.rcpt_tos:
            return "503 5.5.1 No valid recipients"
        loop = asyncio.get_running_loop()
        mail_from = envelope.mail_from or ""
        read = self.body_reader(mail_from, envelope.rcpt_tos)
        found = NOTHING_FOUND if read is None else await self._read_body(read, raw)
        future: asyncio.Future[Receipt] = loop.create_future()
        client_address, client_helo = xforward.client_of(session)
        xforward.forget(session)
        self.committer.submit(
            _Pending(
                mail_from=mail_from,
                recipients=tuple(envelope.rcpt_tos),
                raw=raw,
                future=future,
                loop=loop,
                bounce=found.bounce,
                bounce_like=found.bounce_like,
                client_address=client_address,
                client_helo=client_helo,
            )
        )
        try:
            if self.reply_within is None:
                receipt = await future  # cancelled only with the session: the commit goes on
            else:
                receipt = await asyncio.wait_for(asyncio.shield(future), self.reply_within)
        except TimeoutError:
            log.warning("data_deferred", error=f"no commit within {self.reply_within} s")
            return "451 4.3.0 Temporary failure, please try again later"
        except InvalidInput as exc:
            # Refused before anything was recorded: nothing accepted, nothing lost.
            return f"550 5.6.0 Message refused: {exc}"
        except Exception as exc:
            log.warning("data_deferred", error=str(exc))
            return "451 4.3.0 Temporary failure, please try again later"
        return f"250 2.0.0 OK queued as {receipt.receipt_id}"


class SessionLimits:
    """Concurrent SMTP sessions, in all and per client address (event loop thread only)."""

    def __init__(self, max_sessions: int, per_client: int) -> None:
        self.max_sessions = max_sessions
        self.per_client = per_client
        self.total = 0
        self.clients: Counter[str] = Counter()
        self.throttle = LogThrottle()

    def admit(self, client: str) -> str | None:
        """None when the session may start (and is counted), else the reply refusing it."""
        if self.total >= self.max_sessions:
            return "421 4.7.0 Too many sessions, try again later"
        if self.clients[client] >= self.per_client:
            return "421 4.7.0 Too many sessions from your address, try again later"
        self.total += 1
        self.clients[client] += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        self.clients[client] -= 1
        if self.clients[client] <= 0:
            del self.clients[client]


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_SIMPLE_PATH = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>")


class FilterSMTP(SMTP):
    """aiosmtpd's SMTP with the filter's own answers where aiosmtpd's would mislead, and a
    session over the limits told 421 and closed before its greeting: a flood of connections
    costs a descriptor each for a moment, never a session."""

    def __init__(self, *args: Any, limits: SessionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.client: str | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        refusal = self.limits.admit(client)
        if refusal is None:
            self.client = client
            return
        self._handler_coroutine.cancel()  # the greeting is never sent
        transport.write(refusal.encode("ascii") + b"\r\n")
        transport.close()
        suppressed = self.limits.throttle.passes("session_refused")
        if suppressed is not None:
            log.warning(
                "session_refused",
                client=client,
                reply=refusal,
                sessions=self.limits.total,
                suppressed=suppressed,
            )

    def connection_lost(self, error: Exception | None) -> None:
        if self.client is not None:
            self.limits.release(self.client)
            self.client = None
        super().connection_lost(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common path, <dot-atom@dot-atom> and its parameters, read by one regular
        # expression: aiosmtpd's RFC 5322 parser took ~150 us a call (twice per message, on
        # the event loop: ~9 % of the SMTP process under load); it still reads the rest
        # (quoted local parts, address literals, source routes, comments, UTF-8).
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None:
            rest = arg[simple.end() :].lstrip(" \t")
            address = simple.group(1)
            limit = self.local_part_limit
            if not rest.startswith("(") and not (limit and len(address.rpartition("@")[0]) > limit):
                return address, rest
        # aiosmtpd answers 553 to what its RFC 5322 parser cannot read; that is a syntax error
        # (501: "" makes aiosmtpd send its syntax reply), never a policy refusal. Behind
        # Postfix either becomes a bounce, but only to text outside RFC 5321's grammar.
        address, rest = super()._getaddr(arg)
        return ("", rest) if address is None else (address, rest)


def inbound_server_factory(
    handler: FilterHandler, *, hostname: str, max_size: int, limits: SessionLimits
) -> Callable[[], Any]:
    def factory() -> SMTP:
        return FilterSMTP(
            handler,
            hostname=hostname,
            enable_SMTPUTF8=True,
            decode_data=False,
            data_size_limit=max_size,
            ident="sourceauth",
            limits=limits,
        )

    return factory
