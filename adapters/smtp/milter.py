"""Milter mode: Postfix speaks SMTP and keeps the message in its own queue; sourceauth, called
through Postfix's `smtpd_milters` (before-queue), stores the original and decides at the end
of the message, through the same group commit as the SMTP listener, then removes the held
recipients (smfi_delrcpt). Postfix delivers the recipients left; a message with none left is
discarded (never rejected: no backscatter). Trouble answers 4xx (tempfail).

The protocol is libmilter's (sendmail's C library) through pymilter, the optional extra
`sourceauth[milter]` (docs/postfix.md says why). libmilter runs one thread per MTA connection
and calls back into Python in it; libmilter has one listener per process.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
from typing import Any

import Milter
import milter as libmilter

from sourceauth.adapters.config.values import MilterListen
from sourceauth.adapters.smtp.inbound import NOTHING_FOUND, FilterHandler, _Pending
from sourceauth.engine.addresses import AddressError, is_null_sender, normalize_address
from sourceauth.engine.api import Decision, Receipt
from sourceauth.engine.errors import InvalidInput
from sourceauth.engine.logs import get_logger

log = get_logger(__name__)


def bare(address: str) -> str:
    """An envelope address as the MTA passes it ("<a@b>", with ESMTP case kept) without <>."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


class MilterGate:
    """What every milter connection shares: the SMTP listener's handler (its committer, limits
    and bounce reader) and the largest message taken."""

    def __init__(self, handler: FilterHandler, *, max_size: int) -> None:
        self.handler = handler
        self.max_size = max_size


@Milter.header_leading_space
class MilterSession(Milter.Base):  # type: ignore[misc]
    """One connection from the MTA (one SMTP session there; several messages in a row)."""

    def __init__(self, gate: MilterGate) -> None:
        self.gate = gate
        self.client_address = ""
        self.client_helo = ""
        self._new_message()

    def _new_message(self) -> None:
        self.mail_from = ""
        # (as the MTA sent it, for smfi_delrcpt; bare, for the engine; normalized, as decided)
        self.recipients: list[tuple[str, str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0

    def _refuse(self, code: str, xcode: str, text: str, status: int) -> int:
        self.setreply(code, xcode, text.replace("%", "%%"))
        return status

    # ---------------------------------------------------------------- callbacks

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if isinstance(hostaddr, tuple) and hostaddr:
            self.client_address = str(hostaddr[0])
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, heloname: str) -> int:
        self.client_helo = str(heloname)[:255]
        return Milter.CONTINUE

    def envfrom(self, mail_from: str, *params: str) -> int:
        self._new_message()
        address = bare(mail_from)
        if not is_null_sender(address):
            try:
                normalize_address(address)
            except AddressError as exc:
                return self._refuse(
                    "501", "5.1.7", f"Bad sender address syntax: {exc}", Milter.REJECT
                )
        self.mail_from = "" if is_null_sender(address) else address
        return Milter.CONTINUE

    def envrcpt(self, to: str, *params: str) -> int:
        handler = self.gate.handler
        if len(self.recipients) >= handler.max_recipients:
            return self._refuse("452", "4.5.3", "Too many recipients", Milter.TEMPFAIL)
        address = bare(to)
        try:
            normalized = normalize_address(address)
        except AddressError as exc:
            return self._refuse(
                "501", "5.1.3", f"Bad recipient address syntax: {exc}", Milter.REJECT
            )
        app = handler.committer.app
        if app.mailbox_may_be_full(address) and app.quarantine_full(self.mail_from, address):
            # 4xx, never 5xx: the sending MTA keeps the message and retries later.
            return self._refuse(
                "452",
                "4.2.2",
                "Quarantine for this recipient is full, try again later",
                Milter.TEMPFAIL,
            )
        self.recipients.append((to, address, normalized))
        return Milter.CONTINUE

    def data(self) -> int:
        # Answered, not skipped: with the DATA step skipped (P_NODATA), Postfix writes the
        # DATA macros alone and its next write (the first header) waits, by Nagle's rule,
        # for the ACK of that packet, which libmilter's side delays by 40 ms: one stall per
        # message over TCP (21 msgs/s per session; answered, 243). benchmarks/README.md.
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, field: str, value: bytes) -> int:
        # With header_leading_space the value keeps its leading blank and its folding.
        name = field.encode("utf-8", "surrogateescape") if isinstance(field, str) else field
        value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._add(name + b":" + value + b"\r\n")
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self) -> int:
        self._add(b"\r\n")
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        self._add(chunk)
        return Milter.CONTINUE

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= self.gate.max_size:
            self.chunks.append(data)

    def eom(self) -> int:
        try:
            return self._end_of_message()
        finally:
            self._new_message()

    def abort(self) -> int:
        self._new_message()
        return Milter.CONTINUE

    def close(self) -> int:
        return Milter.CONTINUE

    # ---------------------------------------------------------------- end of message

    def _end_of_message(self) -> int:
        if self.size > self.gate.max_size:
            return self._refuse("552", "5.3.4", "Message too big for the filter", Milter.REJECT)
        if not self.recipients:
            return self._refuse("503", "5.5.1", "No valid recipients", Milter.REJECT)
        raw = b"".join(self.chunks)
        receipt = self._commit(raw)
        if isinstance(receipt, int):
            return receipt
        decided = {d.recipient: d.decision for d in receipt.decisions}
        if any(normalized not in decided for _, _, normalized in self.recipients):
            # Cannot happen (the engine decides every recipient); if it did, the client's
            # retry is a second copy, never a lost one.
            log.warning("data_deferred", via="milter", error="a recipient was not decided")
            return self._refuse(
                "451", "4.3.0", "Temporary failure, please try again later", Milter.TEMPFAIL
            )
        kept = 0
        for as_sent, _, normalized in self.recipients:
            if decided[normalized] is Decision.DELIVER:
                kept += 1
            else:
                self.delrcpt(as_sent)
        # Nothing left for the MTA to deliver: every copy is held, dropped or consumed, by a
        # recorded event. Discard (the client sees 250), never reject.
        return Milter.CONTINUE if kept else Milter.DISCARD

    def _commit(self, raw: bytes) -> Receipt | int:
        """The receipt once committed, or the milter status that answers trouble."""
        handler = self.gate.handler
        addresses = [address for _, address, _ in self.recipients]
        read = handler.body_reader(self.mail_from, addresses)
        found = NOTHING_FOUND
        if read is not None:  # on the SMTP listener's reader threads (this is a libmilter
            # thread: waiting here delays only this session)
            found = handler.reader_thread(read).submit(read, raw).result()
        future: concurrent.futures.Future[Receipt] = concurrent.futures.Future()
        handler.committer.submit(
            _Pending(
                mail_from=self.mail_from,
                recipients=tuple(addresses),
                raw=raw,
                future=future,
                loop=None,
                bounce=found.bounce,
                bounce_like=found.bounce_like,
                client_address=self.client_address,
                client_helo=self.client_helo,
                kept_by_mta=True,
                # This thread waits for the commit: holding the batch open for others only
                # delays its reply (GroupCommitter).
                linger=False,
            )
        )
        try:
            return future.result(timeout=handler.reply_within)
        except concurrent.futures.TimeoutError:
            log.warning(
                "data_deferred", via="milter", error=f"no commit within {handler.reply_within} s"
            )
        except InvalidInput as exc:
            # Refused before anything was recorded: nothing accepted, nothing lost.
            return self._refuse("550", "5.6.0", f"Message refused: {exc}", Milter.REJECT)
        except Exception as exc:
            log.warning("data_deferred", via="milter", error=str(exc))
        return self._refuse(
            "451", "4.3.0", "Temporary failure, please try again later", Milter.TEMPFAIL
        )


def _accepts(listen: MilterListen) -> bool:
    try:
        if listen.path:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
                unix.settimeout(0.5)
                unix.connect(listen.path)
        else:
            with socket.create_connection((listen.host, listen.port), timeout=0.5):
                pass
    except OSError:
        return False
    return True


class MilterServer:
    """libmilter's listener in a thread of this process (one per process: libmilter keeps
    global state). start() returns once the port accepts; stop() ends libmilter's loop."""

    def __init__(self, gate: MilterGate, listen: MilterListen, *, timeout: float) -> None:
        self.gate = gate
        self.listen = listen
        self.timeout = timeout
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="sourceauth-milter", daemon=True)

    @property
    def socket_spec(self) -> str:
        if self.listen.path:
            return f"unix:{self.listen.path}"
        family = "inet6" if ":" in self.listen.host else "inet"
        return f"{family}:{self.listen.port}@{self.listen.host}"

    def start(self) -> None:
        Milter.factory = lambda: MilterSession(self.gate)
        libmilter.set_flags(Milter.DELRCPT)
        # A callback that raises answers tempfail: the MTA keeps the message and retries.
        libmilter.set_exception_policy(Milter.TEMPFAIL)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not _accepts(self.listen):
            if self.error is not None or not self._thread.is_alive():
                raise OSError(f"milter listener on {self.listen}: {self.error or 'not started'}")
            if time.monotonic() > deadline:
                raise OSError(f"milter listener on {self.listen} did not start within 10 s")
            time.sleep(0.05)
        if self.listen.path:
            # The MTA's smtpd runs as another user (postfix). Anyone on this host may reach a
            # loopback TCP listener too; restrict the folder around the socket to narrow it.
            os.chmod(self.listen.path, 0o666)
        log.info("milter_started", listen=str(self.listen))

    def _run(self) -> None:
        try:
            Milter.runmilter("sourceauth", self.socket_spec, timeout=max(1, int(self.timeout)))
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
            log.error("milter_failed", listen=str(self.listen), error=self.error)

    def stop(self) -> None:
        """Stop accepting; libmilter lets the connections in progress finish."""
        if not self._thread.is_alive():
            return
        try:
            libmilter.stop()
        except Exception as exc:
            log.error("milter_failed", listen=str(self.listen), error=str(exc))
        self._thread.join(timeout=30)
        if self.listen.path:
            try:
                os.unlink(self.listen.path)
            except OSError:
                pass
        log.info("milter_stopped", listen=str(self.listen))
