"""A real SMTP/LMTP server (aiosmtpd, background thread) that stores what it receives.
For tests and benchmarks: scripted replies, optional fsync per message, 8-bit and SMTPUTF8."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

log = structlog.get_logger(__name__)

__all__ = ["Received", "Sink"]


@dataclass
class Received:
    """One accepted message. mail_from is "" for the null sender; rcpt_tos lists the
    recipients that accepted it (for LMTP, those with a 2xx reply after DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str
    mail_options: list[str] = field(default_factory=list)


def _is_ok(reply: str) -> bool:
    return reply[:1] == "2"


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.sink.mail_delay:  # a slow next hop, without stalling other sessions
            await asyncio.sleep(self.sink.mail_delay)
        reply = self.sink.mail_reply(address) if self.sink.mail_reply else "250 OK"
        if _is_ok(reply):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.sink.rcpt_reply(address) if self.sink.rcpt_reply else "250 OK"
        if _is_ok(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        sink.data_seen += 1
        if sink.data_seen in sink.cut_at_data:
            # the connection is lost after the message was sent, before the reply
            assert server.transport is not None
            server.transport.abort()
            return "421 4.4.2 connection lost (never sent)"
        rcpts = list(envelope.rcpt_tos)
        if sink.lmtp:
            replies = [
                sink.lmtp_reply(r) if sink.lmtp_reply else (sink.data_reply or "250 2.0.0 OK")
                for r in rcpts
            ]
            accepted = [r for r, reply in zip(rcpts, replies, strict=True) if _is_ok(reply)]
            answer = "\r\n".join(replies)
        else:
            answer = sink.data_reply or "250 OK"
            accepted = rcpts if _is_ok(answer) else []
        if accepted:
            content = envelope.original_content or b""
            mail_from = envelope.mail_from or ""
            peer = session.peer
            if isinstance(peer, tuple):
                peer_text = f"{peer[0]}:{peer[1]}"
            else:
                peer_text = str(peer)
            received = Received(
                mail_from="" if mail_from == "<>" else mail_from,
                rcpt_tos=accepted,
                data=bytes(content),
                peer=peer_text,
                mail_options=list(envelope.mail_options),
            )
            if sink.fsync_dir is not None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, sink._write_fsync, received.data)
            sink._record(received)
        return answer


class _Controller(Controller):
    """Serves on an already-bound socket, so the port is known and cannot be taken."""

    def __init__(self, handler: _Handler, sock: socket.socket, lmtp: bool) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, decode_data=False)
        self._sock = sock
        self._lmtp = lmtp

    def factory(self) -> SMTP:
        cls = LMTP if self._lmtp else SMTP
        return cls(self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


class Sink:
    """aiosmtpd server on 127.0.0.1 (or host) at a free port, in a background thread.

    rcpt_reply(address) / mail_reply(address) script the RCPT / MAIL replies ("250 OK" by
    default); data_reply overrides the DATA reply (for LMTP: every recipient's reply);
    lmtp_reply(address) scripts per-recipient LMTP replies after DATA. cut_at_data: the
    DATA commands (counted from 1 over the sink's life) at which the connection is dropped
    with no reply and the message not kept. fsync_dir: write each
    accepted message to a file there and fsync it (off the event loop) before replying.
    keep: store accepted messages in self.messages; with keep=False only self.count grows.
    mail_delay: seconds each MAIL command waits before its reply (other sessions go on).
    SMTPUTF8 is enabled and data is not decoded (8-bit bytes arrive as sent).
    """

    def __init__(
        self,
        *,
        lmtp: bool = False,
        rcpt_reply: Callable[[str], str] | None = None,
        data_reply: str | None = None,
        fsync_dir: str | None = None,
        keep: bool = True,
        mail_reply: Callable[[str], str] | None = None,
        lmtp_reply: Callable[[str], str] | None = None,
        host: str = "127.0.0.1",
        mail_delay: float = 0.0,
        cut_at_data: tuple[int, ...] = (),
    ) -> None:
        self.lmtp = lmtp
        self.mail_delay = mail_delay
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.fsync_dir = fsync_dir
        self.keep = keep
        self.mail_reply = mail_reply
        self.lmtp_reply = lmtp_reply
        self.host = host
        self.cut_at_data = set(cut_at_data)
        self.data_seen = 0
        self.port = 0
        self.messages: list[Received] = []
        self.count = 0
        self._cond = threading.Condition()
        self._controller: _Controller | None = None
        self._seq = 0

    @property
    def url(self) -> str:
        """The next-hop URL for this sink, e.g. smtp://127.0.0.1:40123."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'lmtp' if self.lmtp else 'smtp'}://{host}:{self.port}"

    def start(self) -> Sink:
        if self._controller is not None:
            raise RuntimeError("sink already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            sock.listen(128)
            sock.setblocking(False)
            controller = _Controller(_Handler(self), sock, self.lmtp)
            self.port = sock.getsockname()[1]
            controller.start()
        except BaseException:
            sock.close()
            raise
        self._controller = controller
        log.debug("sink_started", host=self.host, port=self.port, lmtp=self.lmtp)
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
            controller._sock.close()
            log.debug("sink_stopped", host=self.host, port=self.port, received=self.count)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least count messages arrived; TimeoutError says what did arrive."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(m.mail_from, m.rcpt_tos) for m in self.messages]
                    raise TimeoutError(
                        f"sink {self.url}: {self.count} of {count} messages after "
                        f"{timeout:g}s; received: {got!r}"
                    )
                self._cond.wait(left)
            return list(self.messages)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()
            self.count = 0

    def _record(self, received: Received) -> None:
        with self._cond:
            if self.keep:
                self.messages.append(received)
            self.count += 1
            self._cond.notify_all()

    def _write_fsync(self, data: bytes) -> None:
        assert self.fsync_dir is not None
        with self._cond:
            self._seq += 1
            seq = self._seq
        path = os.path.join(self.fsync_dir, f"{seq:08d}.{uuid.uuid4().hex[:8]}.eml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
