"""Bounce parsing: RFC 3464 delivery status notifications first, then non-standard bounces.

parse_bounce() and extract_original_headers() accept any bytes and never raise.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from flufl.bounce import all_failures, scan_message

from sourceauth.adapters.smtp.bounce_cues import may_be_bounce
from sourceauth.engine.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "BounceReport",
    "extract_original_headers",
    "parse_bounce",
    "plain_bounce",
    "prepared_for_detectors",
]

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
DIAGNOSTIC_MAX = 500

_FIELD_MAX = 500  # every report field is a single line of at most this many characters
_RAW_FIELD_MAX = 4096  # characters of a header value looked at (bounds work on huge headers)
_TEXT_MAX = 65536  # characters of human-readable text scanned by the heuristics
_MAX_PARTS = 256  # MIME parts visited
_MAX_DEPTH = 16  # multipart nesting followed
_MAX_BLOCKS = 256  # header blocks read from a delivery-status part
_FLUFL_MAX = 128 * 1024  # bytes of a message given to flufl.bounce
# What the MIME parser is given of a message (see _bounded): its cost grows with bytes and parts.
_PARSE_MAX = 512 * 1024  # bytes in all
_SEGMENT_MAX = 64 * 1024  # bytes between two boundary-like lines
_LINE_MAX = 4096  # bytes of one line
_MAX_MARKS = 2 * _MAX_PARTS  # boundary-like lines (each part has one, each multipart one more)

_DS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_MDN_TYPES = frozenset(
    {"message/disposition-notification", "message/global-disposition-notification"}
)
_HEADERS_TYPES = frozenset({"text/rfc822-headers", "message/global-headers"})
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_RETURNED_TYPES = _MESSAGE_TYPES | _HEADERS_TYPES
_GROUPWISE_MAILERS = frozenset({"nov", "ntm", "int"})
_NOTICE_SCAN = 8192  # characters of Subject and first text a GroupWise-style notice is read in
_NOT_DELIVERED_RE = re.compile(
    r"undeliver|did not reach|not\s+(?:be\s+)?delivered|could not deliver|delivery\s+fail"
    r"|non[\s-]+remis|unzustellbar|nicht\s+zugestellt",
    re.IGNORECASE,
)

# An enhanced status code (RFC 3463), not part of a longer dotted number such as an IP address.
_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_PERMANENT_RE = re.compile(r"(?<![\d.])5\.\d{1,3}\.\d{1,3}(?!\.?\d)")
_TYPE_PREFIX_RE = re.compile(r"^\s*[A-Za-z0-9][A-Za-z0-9._+-]{0,40}\s*;\s*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\s]+")
_FAILURE_SUBJECT_RE = re.compile(
    r"undeliver|returned mail|returned to sender|delivery status notification \(failure\)"
    r"|failure notice|delivery failure|delivery has failed|mail delivery failed"
    r"|non-?delivery|could not be delivered|mail system error",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class BounceReport:
    """What a bounce says about one delivery attempt (the first failed recipient, if any)."""

    failed: bool
    action: str
    status: str
    diagnostic: str
    final_recipient: str
    original_envelope_id: str
    reporting_mta: str
    format: str


_NONE = BounceReport(
    failed=False,
    action="unknown",
    status="",
    diagnostic="",
    final_recipient="",
    original_envelope_id="",
    reporting_mta="",
    format="none",
)


def parse_bounce(raw: bytes) -> BounceReport:
    """Read a bounce; worst case (garbage, not a bounce) is a non-failed report of format "none"."""
    try:
        data = _bounded(bytes(raw))
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        parts = list(_walk(msg))
    except Exception:
        log.warning("dsn_unparseable", size=_safe_len(raw), exc_info=True)
        return _NONE
    for stage in (_from_rfc3464, _from_flufl, _from_heuristic):
        try:
            report = stage(msg, parts, data)
        except Exception:
            log.warning("dsn_stage_failed", stage=stage.__name__, exc_info=True)
            continue
        if report is not None:
            return report
    return _NONE


def plain_bounce(raw: bytes, *, pre_filter: bool = True) -> str:
    """Why flufl.bounce's detectors read a message as a bounce ("" when they do not): for mail
    that would be challenged, so that a notice in no report format (GroupWise, Exchange,
    "Delivery failure notification", "non remis") from an ordinary sender draws no challenge.
    Bounded as parse_bounce is (the first _FLUFL_MAX bytes of _bounded's cut); never raises.
    Mail that shows none of the detectors' cues (bounce_cues.may_be_bounce: ordinary mail,
    tens of microseconds) is not given to them (milliseconds); pre_filter=False only to
    measure that (benchmarks/bounce_detection.py)."""
    try:
        msg = prepared_for_detectors(raw)
        if pre_filter and not may_be_bounce(msg):  # no detector's cue: none can find one
            return ""
        temporary, permanent = all_failures(msg)
    except Exception:
        # A detector raising stops flufl.bounce's scan: then the mail is treated as before.
        log.info("dsn_flufl_failed", exc_info=True)
        return ""
    for kind, found in (("permanent", permanent), ("temporary", temporary)):
        addresses = sorted(
            a.decode("ascii", "replace") if isinstance(a, bytes) else str(a) for a in found if a
        )
        if addresses:
            more = f" and {len(addresses) - 1} more" if len(addresses) > 1 else ""
            return f"flufl.bounce: {kind} failure for {_clean(addresses[0])}{more}"
    return ""


def prepared_for_detectors(raw: bytes) -> Message:
    """The message as plain_bounce gives it to flufl.bounce's detectors (may raise)."""
    data = _bounded(bytes(raw))[:_FLUFL_MAX]
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    _ensure_parsable_from(msg)
    _unless_returned(msg)
    return msg


def _unless_returned(msg: Message) -> None:
    """flufl.bounce's GroupWise detector takes every multipart/mixed message whose X-Mailer is
    GroupWise, NTMail or Exchange 5.5's ("Nov…", "NTM…", "Int…") for a bounce and any address
    in its first text part for a failed one: right for mail sent to a bounce address, wrong
    for ordinary mail with an attachment and a signature (9 % of the generated personal mail
    of benchmarks/bounce_detection.py). Unless the message returns one (message/rfc822 or
    text/rfc822-headers) and says so in its Subject or first text part, its X-Mailer is
    hidden from the detectors; no other detector reads those X-Mailers."""
    mailer = _raw_get(msg, "x-mailer")[:3].lower()
    if mailer not in _GROUPWISE_MAILERS or msg.get_content_type() != "multipart/mixed":
        return
    parts = list(_walk(msg))
    if any(part.get_content_type() in _RETURNED_TYPES for part in parts):
        said = _decoded_header(_raw_get(msg, "subject")) + "\n" + _human_text(parts[:3])
        if _NOT_DELIVERED_RE.search(said[:_NOTICE_SCAN]):
            return
    del msg["X-Mailer"]


def extract_original_headers(raw: bytes) -> list[tuple[str, str]]:
    """Headers of the message a bounce returns (text/rfc822-headers or message/rfc822), else []."""
    try:
        msg = email.message_from_bytes(bytes(raw), policy=email.policy.compat32)
        for part in _walk(msg):
            ctype = part.get_content_type()
            if ctype in _MESSAGE_TYPES:
                payload = part.get_payload()
                if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                    return _header_items(payload[0])
            elif ctype in _HEADERS_TYPES:
                data = part.get_payload(decode=True)
                if isinstance(data, bytes):
                    parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
                    return _header_items(parsed)
    except Exception:
        log.warning("dsn_original_headers_failed", size=_safe_len(raw), exc_info=True)
    return []


# --- stages -----------------------------------------------------------------------------------


def _from_rfc3464(msg: Message, parts: list[Message], raw: bytes) -> BounceReport | None:
    """A multipart/report: an MDN is never a failure; a delivery-status part is authoritative."""
    is_mdn = False
    status_part: Message | None = None
    for part in parts:
        ctype = part.get_content_type()
        if ctype == "multipart/report":
            report_type = part.get_param("report-type")
            if isinstance(report_type, str) and report_type.strip().lower() == (
                "disposition-notification"
            ):
                is_mdn = True
        elif ctype in _MDN_TYPES:
            is_mdn = True
        elif ctype in _DS_TYPES and status_part is None:
            status_part = part
    if is_mdn and status_part is None:
        return _mdn_report(parts)
    if status_part is None:
        return None
    blocks = _status_blocks(status_part)
    recipients = [b for b in blocks if {"action", "final-recipient", "status"} & b.keys()]
    if not recipients:
        return None  # a delivery-status part without recipient fields: try the fallbacks
    per_message: dict[str, str] = {}
    for block in blocks:
        for name in ("reporting-mta", "original-envelope-id"):
            if name in block and name not in per_message:
                per_message[name] = block[name]
    actions = [_effective_action(b) for b in recipients]
    chosen = next((i for i, a in enumerate(actions) if a == "failed"), None)
    if chosen is None:
        chosen = next((i for i, a in enumerate(actions) if a != "unknown"), 0)
    block = recipients[chosen]
    address = _address_field(block.get("final-recipient", "")) or _address_field(
        block.get("original-recipient", "")
    )
    diagnostic = _strip_type(block.get("diagnostic-code", ""))
    if not diagnostic:
        diagnostic = _diagnostic_from_text(_human_text(parts), address)
    status = _status_code(block.get("status", "")) or _status_code(diagnostic)
    return BounceReport(
        failed="failed" in actions,
        action=actions[chosen],
        status=status,
        diagnostic=_clean(diagnostic, DIAGNOSTIC_MAX),
        final_recipient=_clean(address),
        original_envelope_id=_clean(per_message.get("original-envelope-id", "")),
        reporting_mta=_clean(_strip_type(per_message.get("reporting-mta", ""))),
        format="rfc3464",
    )


def _from_flufl(msg: Message, parts: list[Message], raw: bytes) -> BounceReport | None:
    """flufl.bounce's detectors for the many non-standard formats (qmail, Exim, ...).

    They run over the first _FLUFL_MAX bytes only: their cost grows fast with size (seconds for a
    few MB) and every format they know states the failure near the top.
    """
    if len(raw) > _FLUFL_MAX:
        msg = email.message_from_bytes(bytes(raw[:_FLUFL_MAX]), policy=email.policy.compat32)
    _ensure_parsable_from(msg)
    try:
        failed = scan_message(msg)
    except Exception:
        # Some detectors raise on odd input and scan_message stops at the first that does.
        log.info("dsn_flufl_failed", exc_info=True)
        return None
    addresses = sorted(a.decode("ascii", "replace") for a in failed if a)
    if not addresses:
        return None
    text = _human_text(parts)
    diagnostic = _diagnostic_from_text(text, addresses[0])
    match = _PERMANENT_RE.search(diagnostic) or _PERMANENT_RE.search(text)
    return BounceReport(
        failed=True,
        action="failed",
        status=match.group(0) if match else "5.0.0",
        diagnostic=_clean(diagnostic, DIAGNOSTIC_MAX),
        final_recipient=_clean(addresses[0]),
        original_envelope_id="",
        reporting_mta="",
        format="flufl",
    )


def _from_heuristic(msg: Message, parts: list[Message], raw: bytes) -> BounceReport | None:
    """A failure-notice subject and a 5.x.x code in the human-readable text."""
    subject = _decoded_header(_raw_get(msg, "subject"))
    if not _FAILURE_SUBJECT_RE.search(subject):
        return None
    text = _human_text(parts)
    match = _PERMANENT_RE.search(text)
    if match is None:
        return None
    diagnostic = _paragraph_at(text, match.start())
    address_match = re.search(r"<([^<>\s@]{1,64}@[^<>\s@]{1,255})>", diagnostic)
    return BounceReport(
        failed=True,
        action="failed",
        status=match.group(0),
        diagnostic=_clean(diagnostic, DIAGNOSTIC_MAX),
        final_recipient=_clean(address_match.group(1)) if address_match else "",
        original_envelope_id="",
        reporting_mta="",
        format="heuristic",
    )


def _mdn_report(parts: list[Message]) -> BounceReport:
    disposition = ""
    recipient = ""
    for part in parts:
        if part.get_content_type() in _MDN_TYPES:
            for block in _status_blocks(part):
                disposition = disposition or block.get("disposition", "")
                recipient = recipient or _address_field(block.get("final-recipient", ""))
    return BounceReport(
        failed=False,
        action="unknown",
        status="",
        diagnostic=_clean(disposition, DIAGNOSTIC_MAX),
        final_recipient=_clean(recipient),
        original_envelope_id="",
        reporting_mta="",
        format="none",
    )


# --- helpers ----------------------------------------------------------------------------------

_LONG_LINE_RE = re.compile(rb"(?m)^[^\n]{%d}" % (_LINE_MAX + 1))


def _bounded(raw: bytes) -> bytes:
    """The part of a message worth parsing, whatever its size or part count: at most
    _MAX_MARKS boundary-like lines ("--..."), _SEGMENT_MAX bytes after each, lines cut at
    _LINE_MAX bytes, _PARSE_MAX bytes in all. A report states its failure in its first parts
    and near their top; what is dropped is bulk (a returned message, attachments, padding)."""
    out: list[bytes] = []
    size = 0
    pos = 0
    marks = 0
    while pos < len(raw) and size < _PARSE_MAX:
        if raw.startswith(b"--", pos):
            marks += 1
            if marks > _MAX_MARKS:
                break
        found = raw.find(b"\n--", pos)
        stop = len(raw) if found < 0 else found + 1
        kept = 0
        while pos < stop and kept < _SEGMENT_MAX and size + kept < _PARSE_MAX:
            chunk = raw[pos : min(stop, pos + _SEGMENT_MAX - kept)]
            long_line = _LONG_LINE_RE.search(chunk)
            if long_line is None:
                out.append(chunk)
                kept += len(chunk)
                pos += len(chunk)
                continue
            cut = long_line.start() + _LINE_MAX
            out.append(chunk[:cut] + b"\n")
            kept += cut + 1
            newline = raw.find(b"\n", pos + cut, stop)
            pos = stop if newline < 0 else newline + 1
        if out and not out[-1].endswith(b"\n"):
            out.append(b"\n")  # a boundary that follows stays at the start of a line
        size += kept
        pos = stop
    return b"".join(out)


def _walk(msg: Message) -> Iterator[Message]:
    """MIME parts in document order, bounded; never enters an enclosed message or report block."""
    stack: list[tuple[Message, int]] = [(msg, 0)]
    seen = 0
    while stack and seen < _MAX_PARTS:
        part, depth = stack.pop()
        seen += 1
        yield part
        if part.get_content_maintype() != "multipart" or depth >= _MAX_DEPTH:
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            children = [p for p in payload if isinstance(p, Message)]
            stack.extend((child, depth + 1) for child in reversed(children))


def _status_blocks(part: Message) -> list[dict[str, str]]:
    """The header blocks of a delivery-status (or MDN) part, names lower-cased, first value wins."""
    payload = part.get_payload()
    messages: list[Message] = []
    rest = b""
    if isinstance(payload, list):
        messages = [p for p in payload[:_MAX_BLOCKS] if isinstance(p, Message)]
        if len(messages) == 1 and not messages[0].is_multipart():
            # Only message/delivery-status is split into blocks by the parser; for the other
            # types (MDN, global DSN) the later blocks are the enclosed "message"'s body.
            body = messages[0].get_payload(decode=True)  # bytes as received, 8-bit intact
            if isinstance(body, bytes):
                rest = body
    else:
        # Not parsed as a message at all (e.g. an encoded part): split the decoded text.
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            rest = data
    if rest.strip():
        text = rest[: _TEXT_MAX * 4].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parser = BytesHeaderParser(policy=email.policy.compat32)
        for chunk in re.split(rb"\n[ \t]*\n", text)[:_MAX_BLOCKS]:
            if chunk.strip():
                messages.append(parser.parsebytes(chunk.strip(b"\n") + b"\n"))
    blocks: list[dict[str, str]] = []
    for message in messages[:_MAX_BLOCKS]:
        block: dict[str, str] = {}
        for name, value in message.raw_items():
            key = str(name).strip().lower()
            if key not in block:
                block[key] = _header_str(value)
        if block:
            blocks.append(block)
    return blocks


def _effective_action(block: dict[str, str]) -> str:
    words = re.split(r"[\s;(]+", block.get("action", "").strip().lower(), maxsplit=1)
    action = words[0] if words else ""
    if action in ACTIONS:
        return action
    status = _status_code(block.get("status", ""))
    return {"5": "failed", "4": "delayed", "2": "delivered"}.get(status[:1], "unknown")


def _status_code(text: str) -> str:
    match = _STATUS_RE.search(text[:_RAW_FIELD_MAX])
    return match.group(0) if match else ""


def _strip_type(value: str) -> str:
    """Drop the "type;" prefix of a typed field ("smtp; 550 ...", "dns; mx.example")."""
    return _TYPE_PREFIX_RE.sub("", value[:_RAW_FIELD_MAX], count=1)


def _address_field(value: str) -> str:
    address = _clean(_strip_type(value))
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


def _human_text(parts: list[Message]) -> str:
    """Decoded text/* parts outside any returned message, at most _TEXT_MAX characters."""
    chunks: list[str] = []
    size = 0
    for part in parts:
        maintype = part.get_content_maintype()
        if maintype == "multipart" and isinstance(part.get_payload(), str):
            pass  # a multipart the parser could not split (no or wrong boundary): read it as text
        elif maintype != "text" or part.get_content_type() in _HEADERS_TYPES:
            continue
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        chunk = data[: _TEXT_MAX * 4]
        try:
            text = chunk.decode(charset, "replace")
        except Exception:  # unknown or non-text codec named by the part
            text = chunk.decode("utf-8", "replace")
        chunks.append(text[: _TEXT_MAX - size])
        size += len(chunks[-1])
        if size >= _TEXT_MAX:
            break
    return "\n".join(chunks).replace("\r\n", "\n").replace("\r", "\n")


def _diagnostic_from_text(text: str, address: str) -> str:
    """The paragraph naming the address, else the first one with a status code, else ""."""
    if address:
        index = text.lower().find(address.lower())
        if index >= 0:
            return _paragraph_at(text, index)
    match = _STATUS_RE.search(text)
    return _paragraph_at(text, match.start()) if match else ""


def _paragraph_at(text: str, index: int) -> str:
    start = text.rfind("\n\n", 0, index)
    end = text.find("\n\n", index)
    return text[start + 2 if start >= 0 else 0 : end if end >= 0 else len(text)]


def _ensure_parsable_from(msg: Message) -> None:
    """flufl.bounce's Yale detector raises IndexError on a From without an address: give it one."""
    try:
        if getaddresses([_header_str(_raw_get(msg, "from"))]):
            return
    except Exception:
        log.debug("dsn_unparseable_from", exc_info=True)
    del msg["from"]
    msg["From"] = "unknown@invalid"


def _header_items(msg: Message) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for name, value in msg.raw_items():
        text = _header_str(value, limit=None)
        items.append((str(name), re.sub(r"\r?\n(?=[ \t])", "", text).strip()))
    return items


def _raw_get(msg: Message, name: str) -> str:
    """The first value of a header as stored (compat32's get() turns 8-bit values into Header)."""
    wanted = name.lower()
    for field, value in msg.raw_items():
        if str(field).lower() == wanted:
            return str(value)
    return ""


def _header_str(value: object, limit: int | None = _RAW_FIELD_MAX) -> str:
    """A raw header value as text: its UTF-8 is decoded, other 8-bit bytes become U+FFFD."""
    if value is None:
        return ""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        return ""
    if limit is not None:
        text = text[:limit]
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return text.encode("utf-8", "replace").decode("utf-8", "replace")


def _decoded_header(value: object) -> str:
    """An RFC 2047-decoded header value (undecodable words are kept as they are)."""
    text = _header_str(value)
    try:
        return str(make_header(decode_header(text)))
    except Exception:
        return text


def _clean(value: str, limit: int = _FIELD_MAX) -> str:
    """One line: control characters and whitespace runs become one space, trimmed to limit."""
    return _CONTROL_RE.sub(" ", value[: limit * 4]).strip()[:limit].strip()


def _safe_len(raw: object) -> int:
    try:
        return len(raw)  # type: ignore[arg-type]
    except Exception:
        return -1
