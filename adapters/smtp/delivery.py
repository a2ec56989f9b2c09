"""Next-hop delivery: SMTP, LMTP and exactly-once Maildir, with a stable X-SourceAuth-Id.
Blocking by design: callers run these functions in a worker thread, never on the event loop."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import smtplib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from sourceauth.adapters.durable import (
    _LINK_UNSUPPORTED,
    fsync_all,
    fsync_dir,
    unlink_quietly,
    write_new_file,
)
from sourceauth.engine.api import DeliveryResult
from sourceauth.engine.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "Connection",
    "MaildirCopy",
    "NextHop",
    "NextHopError",
    "Outcome",
    "Outgoing",
    "RecipientResult",
    "deliver",
    "deliver_maildir_batch",
    "delivery_done",
    "delivery_result",
    "parse_next_hop",
    "send_message",
    "send_messages",
    "stamp",
]

HEADER_NAME = b"X-SourceAuth-Id"
MAILDIR_CHUNK = 64  # copies written into Maildirs and fsync'd together
_HEADER_NAME_LOWER = HEADER_NAME.lower()

# An id is used verbatim in a header and as the first part of a Maildir file name, and the
# exactly-once check matches the prefix "<id>." - so no dots, no separators, no whitespace.
_ID_RE = re.compile(r"[A-Za-z0-9_+=@-]{1,200}")
_FIELD_RE = re.compile(rb"[!-9;-~]+[ \t]*:")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f<>]")
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


class Outcome(StrEnum):
    """What happened to one recipient."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome with the reply that decided it (server's or synthesised)."""

    recipient: str
    outcome: Outcome
    code: int
    text: str


class NextHopError(ValueError):
    """A next-hop or relay URL that cannot be used."""


@dataclass(frozen=True)
class NextHop:
    """A parsed next hop. host/port are empty/0 for maildir; path is empty for smtp/lmtp."""

    scheme: Literal["smtp", "lmtp", "maildir"]
    host: str
    port: int
    path: str

    def __str__(self) -> str:
        if self.scheme == "maildir":
            return f"maildir:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


_EXPECTED = "expected smtp://HOST[:PORT], lmtp://HOST[:PORT] or maildir:PATH"


def parse_next_hop(url: str, base_dir: str | os.PathLike[str] = ".") -> NextHop:
    """Parse a next-hop URL; relative maildir paths are resolved against base_dir.

    smtp defaults to port 25, lmtp to 24; IPv6 literals are written in brackets.
    """
    if not isinstance(url, str):
        raise NextHopError(f"bad next hop {url!r}: not a string ({_EXPECTED})")
    text = url.strip()

    def bad(why: str) -> NextHopError:
        return NextHopError(f"bad next hop {url!r}: {why} ({_EXPECTED})")

    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("smtp", "lmtp", "maildir"):
        raise bad("unknown scheme")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise bad("control characters")
    if scheme == "maildir":
        if not rest:
            raise bad("empty maildir path")
        if rest.startswith("//"):
            raise bad("write maildir:/absolute/path or maildir:relative/path, not maildir://")
        path = os.path.abspath(os.path.join(os.fspath(base_dir), rest))
        return NextHop(scheme="maildir", host="", port=0, path=path)

    if not rest.startswith("//"):
        raise bad(f"{scheme} needs //HOST")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("unexpected path, query or fragment")
    if parts.username is not None or parts.password is not None:
        raise bad("credentials are not supported in the URL")
    try:
        port = parts.port
    except ValueError as exc:
        raise bad(f"invalid port ({exc}); IPv6 addresses go in brackets") from None
    host = parts.hostname or ""
    netloc = parts.netloc
    if not host:
        raise bad("missing host")
    if netloc.startswith("["):
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise bad(f"invalid IPv6 address {host!r}") from None
    elif not _HOST_RE.fullmatch(host):
        raise bad(f"invalid host {host!r}")
    if port is None:
        if netloc.endswith(":"):
            raise bad("empty port")
        port = 25 if scheme == "smtp" else 24
    if not 1 <= port <= 65535:
        raise bad(f"port {port} out of range 1-65535")
    return NextHop(scheme="smtp" if scheme == "smtp" else "lmtp", host=host, port=port, path="")


# ---------------------------------------------------------------------------------------------
# Header stamping (bytes in, bytes out)


def _check_id(sourceauth_id: str) -> None:
    if not isinstance(sourceauth_id, str) or not _ID_RE.fullmatch(sourceauth_id):
        raise ValueError(
            f"invalid sourceauth_id {sourceauth_id!r}: 1-200 characters of A-Z a-z 0-9 _ + = @ -"
        )


def _eol(raw: bytes) -> bytes:
    """The message's own line ending, judged by its first line (CRLF if it has none)."""
    nl = raw.find(b"\n")
    if nl > 0 and raw[nl - 1 : nl] != b"\r":
        return b"\n"
    if nl == 0:
        return b"\n"
    return b"\r\n"


def _header_fields(raw: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(start, end, lower-case name, unfolded value) of each field in the header section.

    The header section ends at the first empty line or the first line that is neither a
    field nor a continuation (so a message that starts with its body has no fields).
    """
    spans: list[list[int]] = []  # [start, end] of each field, continuation lines included
    pos, size = 0, len(raw)
    while pos < size:
        nl = raw.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        first = raw[pos : pos + 1]
        if first in (b" ", b"\t") and spans:
            spans[-1][1] = end
        elif first in (b"\r", b"\n") or not _FIELD_RE.match(raw, pos, end):
            break
        else:
            spans.append([pos, end])
        pos = end
    fields: list[tuple[int, int, bytes, bytes]] = []
    for start, end in spans:
        name, _, value = raw[start:end].partition(b":")
        value = value.replace(b"\r", b"").replace(b"\n", b"").strip(b" \t")
        fields.append((start, end, name.rstrip(b" \t").lower(), value))
    return fields


def stamp(raw: bytes, sourceauth_id: str) -> bytes:
    """Return raw with exactly one X-SourceAuth-Id field carrying sourceauth_id.

    A field that already carries this id is kept where it is; every X-SourceAuth-Id field
    with another value is removed (senders must not forge it). Otherwise the field is
    prepended, ending with the message's own line ending (CRLF unless the first line ends
    with a bare LF). All other bytes are kept exactly. Idempotent.
    """
    _check_id(sourceauth_id)
    wanted = sourceauth_id.encode("ascii")
    ours = [f for f in _header_fields(raw) if f[2] == _HEADER_NAME_LOWER]
    keep = next((f for f in ours if f[3] == wanted), None)
    drop = [f for f in ours if f is not keep]
    pieces: list[bytes] = []
    if keep is None:
        pieces.append(HEADER_NAME + b": " + wanted + _eol(raw))
    pos = 0
    for start, end, _, _ in drop:
        pieces.append(raw[pos:start])
        pos = end
    pieces.append(raw[pos:])
    if len(pieces) == 1:
        return raw
    return b"".join(pieces)


def _message_id_key(raw: bytes) -> str:
    """A file-name-safe id derived from the Message-ID (or, lacking one, the whole message)."""
    for _, _, name, value in _header_fields(raw):
        if name == b"message-id" and value:
            return hashlib.sha256(value).hexdigest()[:40]
    return hashlib.sha256(raw).hexdigest()[:40]


# ---------------------------------------------------------------------------------------------
# Envelope addresses


class _BadAddress(ValueError):
    pass


def _envelope_address(address: str) -> str:
    """The bare address ("" for the null sender); rejects what would inject into commands."""
    if not isinstance(address, str):
        raise _BadAddress(f"not a string: {address!r}")
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if _CONTROL_RE.search(addr):
        raise _BadAddress(f"invalid characters in address {address!r}")
    return addr


def _needs_utf8(address: str) -> bool:
    return not address.isascii()


def _classify(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.PERMANENT
    return Outcome.TEMPORARY


def _reply_text(msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _default_helo() -> str:
    return socket.gethostname() or "localhost"


# ---------------------------------------------------------------------------------------------
# SMTP / LMTP


def _crlf_lines(data: bytes) -> bytes:
    """data with every bare CR and bare LF turned into CRLF, as SMTP requires (RFC 5321 2.3.8).

    A next hop that reads a bare CR or LF as a line end would otherwise see a line break where
    we saw none: "\\r.\\r\\n" ends DATA early there (SMTP smuggling), and smtplib dot-stuffs
    only after LF."""
    crlf = data.count(b"\r\n")
    if crlf == data.count(b"\r") == data.count(b"\n"):
        return data
    return _LINE_END_RE.sub(b"\r\n", data)


class _Session:
    """One SMTP/LMTP transaction for several recipients; fills in one result per recipient."""

    def __init__(
        self,
        hop: NextHop,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        timeout: float,
        helo: str | None,
    ) -> None:
        self.hop = hop
        self.recipients = list(recipients)
        self.data = _crlf_lines(data)
        self.timeout = timeout
        self.helo = helo or _default_helo()
        self.stage = "connect"
        self.results: list[RecipientResult | None] = [None] * len(self.recipients)
        self.addresses: list[str] = []
        self.mail_from = ""
        self.bad_sender: str | None = None
        try:
            self.mail_from = _envelope_address(mail_from)
        except _BadAddress as exc:
            self.bad_sender = str(exc)
        for i, rcpt in enumerate(self.recipients):
            try:
                addr = _envelope_address(rcpt)
                if not addr:
                    raise _BadAddress("empty recipient address")
            except _BadAddress as exc:
                self._set(i, 501, f"5.1.3 {exc}")
                addr = ""
            self.addresses.append(addr)

    def _set(self, i: int, code: int, text: str) -> None:
        self.results[i] = RecipientResult(self.recipients[i], _classify(code), code, text)

    def _fill(self, code: int, text: str) -> None:
        for i, result in enumerate(self.results):
            if result is None:
                self._set(i, code, text)

    def pending(self) -> bool:
        """Whether any recipient still needs the next hop (bad addresses are answered here)."""
        if self.bad_sender is not None:
            self._fill(501, f"5.1.7 {self.bad_sender}")
        return any(r is None for r in self.results)

    def client(self) -> smtplib.SMTP:
        if self.hop.scheme == "lmtp":
            return smtplib.LMTP(local_hostname=self.helo, timeout=self.timeout)
        return smtplib.SMTP(local_hostname=self.helo, timeout=self.timeout)

    def guarded(self, step: Callable[[smtplib.SMTP], bool], client: smtplib.SMTP) -> bool:
        """Run one step on client; trouble becomes every open recipient's result. True when
        the step ran to its end and said the connection is still fit for use."""
        try:
            return step(client)
        except (smtplib.SMTPConnectError, smtplib.SMTPHeloError) as exc:
            self._fill(exc.smtp_code, f"{self.stage}: {_reply_text(exc.smtp_error)}")
        except (smtplib.SMTPException, OSError) as exc:
            # refused, timed out, disconnected, garbled: the next hop may recover
            detail = str(exc) or type(exc).__name__
            status = "4.4.1" if self.stage == "connect" else "4.4.2"
            self._fill(451, f"{status} {self.stage} {self.hop}: {detail}")
        return False

    def run(self) -> list[RecipientResult]:
        """One connection for this one message."""
        if self.pending():
            client = self.client()
            self.stage = "connect"
            try:
                if self.guarded(self.greet, client):
                    self.guarded(self.send, client)
            finally:
                _quit(client)
        return self.done()

    def done(self) -> list[RecipientResult]:
        return [r for r in self.results if r is not None]

    def greet(self, client: smtplib.SMTP) -> bool:
        """Connect and EHLO/LHLO (HELO as a fallback); False (results filled) if refused."""
        hop = self.hop
        self.stage = "connect"
        code, msg = client.connect(hop.host, hop.port)
        if not 200 <= code < 300:  # smtplib raises SMTPConnectError before this; be safe
            self._fill(code, f"connect: {_reply_text(msg)}")
            return False
        self.stage = "LHLO" if hop.scheme == "lmtp" else "EHLO"
        code, msg = client.ehlo()
        if not 200 <= code < 300 and hop.scheme == "smtp":
            self.stage = "HELO"
            code, msg = client.helo()
        if not 200 <= code < 300:
            self._fill(code, f"{self.stage}: {_reply_text(msg)}")
            return False
        return True

    def send(self, client: smtplib.SMTP) -> bool:
        """One mail transaction on a greeted connection. True: it ended at a reply, so the
        connection can carry another transaction (after RSET)."""
        self.stage = "MAIL"
        utf8_wanted = _needs_utf8(self.mail_from) or any(
            _needs_utf8(a) for i, a in enumerate(self.addresses) if self.results[i] is None
        )
        utf8 = utf8_wanted and client.has_extn("smtputf8")
        if _needs_utf8(self.mail_from) and not utf8:
            self._fill(553, "5.6.7 sender address needs SMTPUTF8, which the next hop lacks")
            return True
        options = ""
        if utf8:
            options += " SMTPUTF8"
            client.command_encoding = "utf-8"
        if client.has_extn("8bitmime") and not self.data.isascii():
            options += " BODY=8BITMIME"
        client.putcmd("mail", f"FROM:<{self.mail_from}>{options}")
        code, msg = client.getreply()
        if not 200 <= code < 300:
            self._fill(code, f"MAIL: {_reply_text(msg)}")
            return True

        self.stage = "RCPT"
        accepted: list[int] = []
        for i, addr in enumerate(self.addresses):
            if self.results[i] is not None:
                continue
            if _needs_utf8(addr) and not utf8:
                self._set(
                    i, 553, "5.6.7 recipient address needs SMTPUTF8, which the next hop lacks"
                )
                continue
            client.putcmd("rcpt", f"TO:<{addr}>")
            code, msg = client.getreply()
            if 200 <= code < 300:
                accepted.append(i)
            else:
                self._set(i, code, _reply_text(msg))
        if not accepted:
            return True

        self.stage = "DATA"
        try:
            code, msg = client.data(self.data)
        except smtplib.SMTPDataError as exc:  # DATA itself refused: no per-recipient replies
            self._fill(exc.smtp_code, f"DATA: {_reply_text(exc.smtp_error)}")
            return True
        if self.hop.scheme == "smtp":
            self._fill(code, _reply_text(msg))
            return True
        # LMTP: one reply per accepted recipient, in RCPT order
        self._set(accepted[0], code, _reply_text(msg))
        for i in accepted[1:]:
            code, msg = client.getreply()
            self._set(i, code, _reply_text(msg))
        return True


def _quit(client: smtplib.SMTP) -> None:
    """QUIT if still connected, then close; trouble here changes no result."""
    try:
        if client.sock is not None:
            client.quit()
    except (smtplib.SMTPException, OSError):
        pass
    client.close()


# ---------------------------------------------------------------------------------------------
# Maildir


@lru_cache(maxsize=1)
def _maildir_hostname() -> str:
    host = socket.gethostname() or "localhost"
    return host.replace("/", r"\057").replace(":", r"\072")


def _mailbox_name(address: str) -> str:
    """A single, safe directory name for a recipient (lower-cased; unsafe bytes %-escaped)."""
    out: list[str] = []
    for ch in address.lower():
        if ch in "/\\%" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    name = "".join(out)
    if name.startswith("."):
        name = "%2E" + name[1:]
    if not name:
        name = "%00"
    if len(name.encode("utf-8", "surrogatepass")) > 200:
        digest = hashlib.sha256(address.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = name.encode("utf-8", "surrogatepass")[:150].decode("utf-8", "ignore")
        name = f"{name}~{digest}"
    return name


# Mailboxes this process has created or found whole: a write into one of them skips the
# mkdir attempts. A mailbox removed behind our back is made again (the write's ENOENT).
# Bounded (a challenge outbox has a mailbox per stranger): emptied when full.
_KNOWN_MAILDIRS: set[str] = set()
_KNOWN_MAILDIRS_MAX = 50_000


def _make_maildir(mailbox: str) -> bool:
    """mkdir the mailbox and its tmp/, new/ and cur/ where missing; whether any was made."""
    created = False
    root = os.path.dirname(mailbox)
    if not os.path.isdir(root):
        os.makedirs(root, mode=0o700, exist_ok=True)
    for path in (mailbox, *(os.path.join(mailbox, sub) for sub in ("tmp", "new", "cur"))):
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            if not os.path.isdir(path):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
    return created


def _known(mailbox: str) -> None:
    if len(_KNOWN_MAILDIRS) >= _KNOWN_MAILDIRS_MAX:
        _KNOWN_MAILDIRS.clear()
    _KNOWN_MAILDIRS.add(mailbox)


def _ensure_maildir(mailbox: str) -> None:
    if mailbox in _KNOWN_MAILDIRS:
        return
    if _make_maildir(mailbox):
        # the new entries (tmp/new/cur in the mailbox, the mailbox in the root) made durable
        # once; later writes fsync only new/
        fsync_dir(mailbox)
        fsync_dir(os.path.dirname(mailbox))
    _known(mailbox)


def _ensure_maildirs(mailboxes: Iterable[str]) -> dict[str, OSError]:
    """`_ensure_maildir` for every mailbox of a batch, the directories of those made now
    fsync'd together (a challenge outbox makes a mailbox per new stranger: two fsyncs each, one
    after the other, were most of a challenge's cost). The mailboxes that could not be made
    durable, with the reason; their writes fail, the others go on."""
    made: list[str] = []
    failed: dict[str, OSError] = {}
    for mailbox in dict.fromkeys(mailboxes):
        if mailbox in _KNOWN_MAILDIRS:
            continue
        try:
            if _make_maildir(mailbox):
                made.append(mailbox)
            else:
                _known(mailbox)
        except OSError as exc:
            failed[mailbox] = exc
    if made:
        bad = _fsync_each(sorted({*made, *(os.path.dirname(m) for m in made)}), directory=True)
        for mailbox in made:
            trouble = bad.get(mailbox) or bad.get(os.path.dirname(mailbox))
            if trouble is None:
                _known(mailbox)
            else:
                failed[mailbox] = trouble
    return failed


def _already_there(mailbox: str, key: str, name: str, maybe_written: bool) -> bool:
    """Whether <key>.* is in the mailbox. new/<name> (what this host writes) is looked up
    always; when the copy may have been written before (a retry, a lease taken over after a
    crash), new/ and cur/ are scanned for <key>.* too: a client moves new/<name> to
    cur/<name>:2,FLAGS, and another host writes <key>.<its name>. A first attempt cannot have
    been written: it skips the scans, whose cost grows with the mailbox."""
    if os.path.lexists(os.path.join(mailbox, "new", name)):
        return True
    if not maybe_written:
        return False
    prefix = key + "."
    for sub in ("new", "cur"):  # listdir: names only, ~1.4x faster than scandir's entries
        if any(n.startswith(prefix) for n in os.listdir(os.path.join(mailbox, sub))):
            return True
    return False


@dataclass
class _Write:
    """One recipient's file of a Maildir batch, through its stages."""

    mailbox: str
    name: str
    content: bytes
    tmp: str = ""
    result: tuple[int, str] | None = None  # (code, text) once decided
    linked: bool = False


@dataclass(frozen=True)
class MaildirCopy:
    """One copy for `deliver_maildir_batch`: already stamped (or a challenge, unstamped)."""

    mail_from: str
    recipients: Sequence[str]
    data: bytes
    key: str
    maybe_written: bool = True


def _failed(exc: OSError, where: str) -> tuple[int, str]:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code, status = (452, "4.3.1") if full else (451, "4.3.0")
    return code, f"{status} maildir {exc.filename or where}: {exc.strerror or exc}"


def _stage(w: _Write, key: str, maybe_written: bool) -> None:
    """Write w's bytes to a file in tmp/ (not yet fsync'd) unless the copy is there already."""
    for again in (False, True):
        _ensure_maildir(w.mailbox)
        tmp = os.path.join(
            w.mailbox,
            "tmp",
            f"{w.name}.{os.getpid()}_{threading.get_ident()}_{uuid.uuid4().hex[:8]}",
        )
        try:
            if _already_there(w.mailbox, key, w.name, maybe_written):
                w.result = (250, f"2.0.0 already in {w.mailbox} (exactly-once)")
                return
            write_new_file(tmp, w.content, fsync=False)
            w.tmp = tmp
            return
        except FileNotFoundError:
            if again:
                raise
            # removed since we made it: make it again (its copies went with it)
            _KNOWN_MAILDIRS.discard(w.mailbox)


def _fsync_each(paths: Sequence[str], *, directory: bool) -> dict[str, OSError]:
    """fsync them all together; on trouble, one by one to learn which failed."""
    if not paths:
        return {}
    try:
        fsync_all(paths, directory=directory)
        return {}
    except OSError:
        pass
    failed: dict[str, OSError] = {}
    for path in paths:
        try:
            fsync_all([path], directory=directory)
        except OSError as exc:
            failed[path] = exc
    return failed


def _write_batch(writes: Sequence[_Write], keys: Sequence[str], maybes: Sequence[bool]) -> None:
    """Each write lands in new/ exactly once: staged in tmp/, the staged files fsync'd together,
    each linked to new/<name> (never over a racing writer's file), then each new/ directory
    fsync'd once for the batch. Sets every write's result."""
    unusable = _ensure_maildirs(w.mailbox for w in writes)
    for w, key, maybe in zip(writes, keys, maybes, strict=True):
        if w.mailbox in unusable:
            w.result = _failed(unusable[w.mailbox], w.mailbox)
            continue
        try:
            _stage(w, key, maybe)
        except OSError as exc:
            w.result = _failed(exc, w.mailbox)
    staged = [w for w in writes if w.result is None]
    bad = _fsync_each([w.tmp for w in staged], directory=False)
    for w in staged:
        final = os.path.join(w.mailbox, "new", w.name)
        try:
            if w.tmp in bad:
                raise bad[w.tmp]
            try:
                os.link(w.tmp, final)
            except FileExistsError:
                w.result = (250, f"2.0.0 already in {w.mailbox} (exactly-once)")
                continue
            except OSError as exc:
                if exc.errno not in _LINK_UNSUPPORTED:
                    raise
                os.rename(w.tmp, final)
            w.linked = True
        except OSError as exc:
            w.result = _failed(exc, w.mailbox)
        finally:
            unlink_quietly(w.tmp)
    linked = [w for w in staged if w.linked]
    dirs = sorted({os.path.join(w.mailbox, "new") for w in linked})
    bad = _fsync_each(dirs, directory=True)
    for w in linked:
        new = os.path.join(w.mailbox, "new")
        if new in bad:
            # in new/ but not durably: a retry (maybe_written) finds it and writes no other
            w.result = _failed(bad[new], new)
        else:
            w.result = (250, f"2.0.0 delivered to {os.path.join(new, w.name)}")


def _final_delivery_headers(mail_from: str, recipient: str, data: bytes) -> bytes:
    eol = _eol(data)
    return (
        b"Return-Path: <"
        + mail_from.encode("utf-8", "surrogateescape")
        + b">"
        + eol
        + b"Delivered-To: "
        + recipient.encode("utf-8", "surrogateescape")
        + eol
    )


def deliver_maildir_batch(root: str, copies: Sequence[MaildirCopy]) -> list[list[RecipientResult]]:
    """Deliver several copies into the Maildirs under root, one result per recipient of each:
    every file fsync'd before it is linked into new/, every new/ fsync'd before this returns,
    together (the file system commits a batch in about one journal commit, not one per file).
    A file <key>.<host> is never written twice (see `_already_there`)."""
    out: list[list[RecipientResult | _Write]] = []
    writes: list[_Write] = []
    keys: list[str] = []
    maybes: list[bool] = []
    seen: dict[tuple[str, str], _Write] = {}
    host = _maildir_hostname()
    for copy in copies:
        results: list[RecipientResult | _Write] = []
        out.append(results)
        try:
            sender: str | None = _envelope_address(copy.mail_from)
        except _BadAddress:
            sender = None
        for rcpt in copy.recipients:
            if sender is None:
                results.append(
                    RecipientResult(rcpt, Outcome.PERMANENT, 501, "5.1.7 invalid sender address")
                )
                continue
            try:
                addr = _envelope_address(rcpt)
                if not addr:
                    raise _BadAddress("empty recipient address")
            except _BadAddress as exc:
                results.append(RecipientResult(rcpt, Outcome.PERMANENT, 501, f"5.1.3 {exc}"))
                continue
            mailbox = os.path.join(root, _mailbox_name(addr))
            name = f"{copy.key}.{host}"
            w = seen.get((mailbox, name))
            if w is None:  # one mailbox twice in a batch is written once
                content = _final_delivery_headers(sender, addr, copy.data) + copy.data
                w = seen[(mailbox, name)] = _Write(mailbox, name, content)
                writes.append(w)
                keys.append(copy.key)
                maybes.append(copy.maybe_written)
            results.append(w)
    _write_batch(writes, keys, maybes)
    done: list[list[RecipientResult]] = []
    for copy, results in zip(copies, out, strict=True):
        answers: list[RecipientResult] = []
        for rcpt, r in zip(copy.recipients, results, strict=True):
            if isinstance(r, RecipientResult):
                answers.append(r)
                continue
            code, text = r.result or (451, "4.3.0 maildir: not written")
            answers.append(RecipientResult(rcpt, _classify(code), code, text))
        done.append(answers)
    return done


def _deliver_maildir(
    root: str,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    key: str,
    maybe_written: bool = True,
) -> list[RecipientResult]:
    return deliver_maildir_batch(
        root, [MaildirCopy(mail_from, recipients, data, key, maybe_written)]
    )[0]


# ---------------------------------------------------------------------------------------------
# Public entry points


def delivery_result(hop: NextHop, results: Sequence[RecipientResult]) -> DeliveryResult:
    """The engine's DeliveryResult: recipients by outcome, in the order given, and the replies
    of those not delivered as its diagnostic (what the events record)."""

    def having(outcome: Outcome) -> tuple[str, ...]:
        return tuple(r.recipient for r in results if r.outcome is outcome)

    diagnostic = "; ".join(
        f"{r.recipient}: {r.code} {r.text}" for r in results if r.outcome is not Outcome.DELIVERED
    )
    return DeliveryResult(
        delivered=having(Outcome.DELIVERED),
        temporary=having(Outcome.TEMPORARY),
        rejected=having(Outcome.PERMANENT),
        diagnostic=diagnostic[:500],
        next_hop=str(hop),
    )


def _log_refused(
    purpose: str, hop: NextHop, results: Sequence[RecipientResult], **ids: str
) -> None:
    for r in results:
        if r.outcome is not Outcome.DELIVERED:
            log.warning(
                "recipient_refused",
                purpose=purpose,
                outcome=str(r.outcome),
                next_hop=str(hop),
                recipient=r.recipient,
                code=r.code,
                text=r.text,
                **ids,
            )


def deliver(
    next_hop: NextHop,
    *,
    mail_from: str,
    recipients: Sequence[str],
    raw: bytes,
    sourceauth_id: str,
    timeout: float = 30.0,
    helo: str | None = None,
    maybe_written: bool = True,
) -> DeliveryResult:
    """Deliver raw, stamped with X-SourceAuth-Id, to every recipient through next_hop.

    Never raises for trouble at the next hop: each recipient ends up delivered, temporary
    (retry later) or rejected. Raises ValueError for programming errors (no recipients,
    invalid id). maybe_written=False (the copy's first attempt, never handed on before) lets a
    Maildir skip its scan of new/ and cur/ for an earlier copy.
    """
    if isinstance(recipients, str) or not recipients:
        raise ValueError("recipients must be a non-empty sequence of addresses")
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError("raw must be bytes")
    data = stamp(bytes(raw), sourceauth_id)
    if next_hop.scheme == "maildir":
        results = _deliver_maildir(
            next_hop.path, mail_from, recipients, data, sourceauth_id, maybe_written
        )
    else:
        results = _Session(next_hop, mail_from, recipients, data, timeout, helo).run()
    return delivery_done(next_hop, results, sourceauth_id)


def delivery_done(
    next_hop: NextHop, results: Sequence[RecipientResult], sourceauth_id: str
) -> DeliveryResult:
    """The DeliveryResult of one copy's recipient results, refusals and the outcome logged."""
    _log_refused("delivery", next_hop, results, sourceauth_id=sourceauth_id)
    result = delivery_result(next_hop, results)
    log.info(
        "delivery_done",
        next_hop=str(next_hop),
        sourceauth_id=sourceauth_id,
        delivered=len(result.delivered),
        temporary=len(result.temporary),
        rejected=len(result.rejected),
    )
    return result


def _reset(client: smtplib.SMTP) -> bool:
    """RSET on a kept-open connection: False when it is gone or refuses (then reconnect)."""
    try:
        code, _ = client.rset()
    except (smtplib.SMTPException, OSError):
        return False
    return 200 <= code < 300


class Connection:
    """A kept-open SMTP/LMTP connection to the next hop that carries several transactions,
    RSET between them, and at most `max_messages` before it is closed and opened again.

    `deliver` says how the connection fared beside the copy's result: "sent" (the
    transaction ended at a reply: the connection is reusable), "down" (no connection or no
    greeting: the copy has the reason as its result) or "broken" (lost mid-transaction: the
    copy is temporary, the connection closed)."""

    def __init__(
        self, hop: NextHop, *, timeout: float = 30.0, helo: str | None = None, max_messages: int
    ) -> None:
        if hop.scheme == "maildir":
            raise ValueError("a Connection is for smtp:// and lmtp:// next hops")
        self.hop = hop
        self.timeout = timeout
        self.helo = helo
        self.max_messages = max(1, max_messages)
        self.transactions = 0
        self.last_used = time.monotonic()
        self._client: smtplib.SMTP | None = None

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def deliver(
        self, *, mail_from: str, recipients: Sequence[str], raw: bytes, sourceauth_id: str
    ) -> tuple[DeliveryResult, str]:
        """Like `deliver` (the function), over this connection."""
        if isinstance(recipients, str) or not recipients:
            raise ValueError("recipients must be a non-empty sequence of addresses")
        data = stamp(bytes(raw), sourceauth_id)
        answers, status = self.send(mail_from=mail_from, recipients=recipients, data=data)
        return delivery_done(self.hop, answers, sourceauth_id), status

    def send(
        self, *, mail_from: str, recipients: Sequence[str], data: bytes
    ) -> tuple[list[RecipientResult], str]:
        """One transaction of data as it is (not stamped) over this connection: a result per
        recipient, and how the connection fared ("sent", "down" or "broken", as for
        `deliver`)."""
        session = _Session(self.hop, mail_from, recipients, data, self.timeout, self.helo)
        status = self._send(session)
        return session.done(), status

    def _send(self, session: _Session) -> str:
        if not session.pending():
            return "sent"
        client = self._client
        if client is not None and not _reset(client):
            self.close()
            client = None
        if client is None:
            client = session.client()
            if not session.guarded(session.greet, client):
                _quit(client)
                return "down"
            self._client, self.transactions = client, 0
        self.transactions += 1
        self.last_used = time.monotonic()
        if not session.guarded(session.send, client):
            self.close()
            return "broken"
        if self.transactions >= self.max_messages:
            self.close()
        return "sent"

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            _quit(client)


@dataclass(frozen=True)
class Outgoing:
    """One message for `send_messages`: sent as it is (not stamped) to one recipient."""

    mail_from: str
    recipient: str
    raw: bytes
    maybe_written: bool = True  # as for `deliver`


def send_messages(
    relay: NextHop,
    messages: Sequence[Outgoing],
    *,
    timeout: float = 30.0,
    helo: str | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> list[RecipientResult | None]:
    """Send several messages through the relay at once (challenges): over one kept-open
    SMTP/LMTP connection, RSET between transactions, or into a Maildir outbox in chunks written
    and fsync'd together. One result per message, in order; None for a message not tried
    because `stop()` became true first (the caller leaves it for the next round).

    A relay that cannot be reached answers every message not tried yet with the same
    temporary result (no connection attempt per message); a session lost mid-transaction
    makes that message temporary and the next one opens a new session."""
    results: list[RecipientResult | None] = [None] * len(messages)
    keys = [_message_id_key(bytes(m.raw)) for m in messages]
    if relay.scheme == "maildir":
        for start in range(0, len(messages), MAILDIR_CHUNK):
            if stop():
                break
            chunk = range(start, min(start + MAILDIR_CHUNK, len(messages)))
            copies = [
                MaildirCopy(
                    messages[i].mail_from,
                    [messages[i].recipient],
                    bytes(messages[i].raw),
                    keys[i],
                    messages[i].maybe_written,
                )
                for i in chunk
            ]
            for i, answers in zip(chunk, deliver_maildir_batch(relay.path, copies), strict=True):
                results[i] = answers[0]
    else:
        conn = Connection(relay, timeout=timeout, helo=helo, max_messages=len(messages))
        try:
            down: RecipientResult | None = None
            for i, m in enumerate(messages):
                if down is not None:
                    results[i] = RecipientResult(m.recipient, down.outcome, down.code, down.text)
                    continue
                if stop():
                    break
                answers, status = conn.send(
                    mail_from=m.mail_from, recipients=[m.recipient], data=bytes(m.raw)
                )
                results[i] = answers[0]
                if status == "down":
                    down = answers[0]
        finally:
            conn.close()
    for result, key in zip(results, keys, strict=True):
        if result is None:
            continue
        _log_refused("challenge", relay, [result], message_key=key)
        log.info(
            "send_done",
            relay=str(relay),
            message_key=key,
            recipient=result.recipient,
            outcome=str(result.outcome),
            code=result.code,
        )
    return results


def send_message(
    relay: NextHop,
    *,
    mail_from: str,
    recipient: str,
    raw: bytes,
    timeout: float = 30.0,
    helo: str | None = None,
    maybe_written: bool = True,
) -> RecipientResult:
    """Send raw (unchanged, no X-SourceAuth-Id) to one recipient: used for challenges.

    A maildir relay is an outbox: <path>/<recipient>/new/<key>.<host>, key derived from the
    Message-ID, so a re-send of the same challenge is written once (maybe_written: as for
    `deliver`).
    """
    if not isinstance(recipient, str):
        raise TypeError("recipient must be a str")
    one = Outgoing(mail_from, recipient, bytes(raw), maybe_written)
    (result,) = send_messages(relay, [one], timeout=timeout, helo=helo)
    if result is None:  # cannot happen: nothing asked it to stop
        raise RuntimeError("send_messages left the message untried")
    return result
