"""Composing the challenge message: headers, templated plain-text body, RFC 5322 bytes with CRLF.

Nothing here sends mail; every input is sanitised so no value can start a header of its own.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email import quoprimime
from email.header import Header
from email.utils import format_datetime

from sourceauth.engine.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "DEFAULT_BODY_TEMPLATE",
    "DEFAULT_SUBJECT_TEMPLATE",
    "ChallengeContent",
    "compose_challenge",
    "defang",
    "normalize_message_id",
    "verp_address",
]

DEFAULT_SUBJECT_TEMPLATE = "Please confirm your message: $subject"
DEFAULT_BODY_TEMPLATE = """\
Hello,

your message to $recipient with the subject "$subject", sent $date,
is being held until you confirm that you are a real sender.

To confirm, simply reply to this message. Keep the Reply-To address
($reply_address) as it is: it identifies your message. You need not
write anything in the reply.
$link
This request lapses at $expires. Once it has lapsed, the held
message will not be delivered.

If you did not send that message, someone may have used your address
($sender); ignore this message and nothing will be delivered.

--\x20
Mail Source Authentication
"""

# The challenge goes to an address anyone can forge: attacker text it echoes must be short
# and carry no working link or address (docs/security.md, "Policy and caps").
SUBJECT_MAX = 60  # characters kept from the original subject, after defanging
REMOVED = "[link removed]"
_FIELD_MAX = 320  # characters kept from the other free-text values (date, recipient)
_ADDRESS_MAX = 512
_LINE_MAX = 998  # RFC 5322 hard limit, CRLF excluded

_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,128}\Z")
_THREAD_ID_RE = re.compile(r"[0-9A-Za-z._-]{1,128}\Z")
_HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[0-9A-Za-z_-]+(?:\.[0-9A-Za-z_-]+)*\.?\Z")
_ATEXT = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"  # RFC 5322 atext, RFC 6532 UTF-8
_DOT_ATOM_RE = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"\Z')
_PHRASE_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+\Z")
_DOMAIN_SPECIALS_RE = re.compile(r"[\s\"(),:;<>@\[\\\]]")
_MSGID_RE = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+\Z")  # no <, >
_MSGID_MAX = 900
_NAME_MAX = 200
_NEWLINES_RE = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ChallengeContent:
    """Everything the challenge message says; the original body is deliberately not among it."""

    challenge_from: str
    reply_to: str
    to: str
    original_subject: str
    original_date: str
    original_message_id: str
    protected_recipient: str
    token: str
    hostname: str
    expires_at: datetime
    challenge_id: str
    confirm_url: str = ""  # with the web on: the confirmation page ($link)
    # The Message-ID's local part, unguessable (engine/tokens.py thread_id): a reply to the
    # bare confirm address that names it in In-Reply-To/References confirms (replies.py).
    thread_id: str = ""


def compose_challenge(
    content: ChallengeContent,
    *,
    subject_template: str = DEFAULT_SUBJECT_TEMPLATE,
    body_template: str = DEFAULT_BODY_TEMPLATE,
    display_name: str = "Mail Source Authentication",
    now: datetime | None = None,
) -> bytes:
    """The challenge as RFC 5322 bytes with CRLF line endings.

    Template placeholders: $subject $date $recipient $expires $sender $reply_address $token $link
    (string.Template.safe_substitute: unknown ones stay as written).  Raises ValueError only for
    values a caller bug produces: an empty or over-long From/To/Reply-To address, a Reply-To that
    does not contain the token, a challenge_id not 1-128 of [0-9A-Za-z_-], a thread_id not 1-128
    of [0-9A-Za-z._-], an invalid hostname.
    Values from the wire (subject, date, Message-ID, recipient) are sanitised, never rejected.
    """
    challenge_id = _single_line(content.challenge_id)
    if not _ID_RE.match(challenge_id):
        raise ValueError("challenge_id must be 1-128 characters of [0-9A-Za-z_-]")
    hostname = _single_line(content.hostname)
    if not _HOSTNAME_RE.match(hostname):
        raise ValueError("hostname is not a valid host name")
    from_address = _format_address(content.challenge_from, "challenge_from")
    to_address = _format_address(content.to, "to")
    reply_address = _format_address(content.reply_to, "reply_to")
    token = _single_line(content.token[:_ADDRESS_MAX])
    if not token or token not in reply_address:
        raise ValueError("reply_to must carry the token (see verp_address)")

    # Inputs are cut before sanitising too (bounded work on huge values); the cut is generous
    # enough that whitespace collapsing cannot make the visible text shorter than the limit.
    subject = defang(_single_line(content.original_subject[: SUBJECT_MAX * 8]))
    subject = subject[:SUBJECT_MAX].strip()
    date = defang(_single_line(content.original_date[: _FIELD_MAX * 8]))[:_FIELD_MAX].strip()
    recipient = _single_line(content.protected_recipient[: _FIELD_MAX * 8])[:_FIELD_MAX].strip()
    expires = format_datetime(_as_utc(content.expires_at))
    values = {
        "subject": subject or "(no subject)",
        "date": date or "(date unknown)",
        "recipient": recipient or "(unknown recipient)",
        "expires": expires,
        "sender": to_address,
        "reply_address": reply_address,
        "token": token,
        "link": f"\nOr open this page and press its button:\n{content.confirm_url}\n"
        if content.confirm_url
        else "",
    }
    rendered_subject = _single_line(string.Template(subject_template).safe_substitute(values))
    body = string.Template(body_template).safe_substitute(values)
    thread_id = _single_line(content.thread_id)
    if thread_id and not _THREAD_ID_RE.match(thread_id):
        raise ValueError("thread_id must be 1-128 characters of [0-9A-Za-z._-]")
    message_id = f"<{thread_id or 'challenge.' + challenge_id}@{hostname}>"
    original_id = normalize_message_id(content.original_message_id)
    if content.original_message_id.strip() and not original_id:
        log.debug("challenge_original_message_id_dropped", challenge_id=challenge_id)

    name = _single_line(display_name[: _NAME_MAX * 8])[:_NAME_MAX].strip()
    headers: list[tuple[str, str]] = [
        ("Date", format_datetime(_as_utc(now or datetime.now(UTC)))),
        ("From", _format_mailbox(name, from_address)),
        ("To", to_address),
        ("Reply-To", reply_address),
        ("Subject", rendered_subject),
        ("Message-ID", message_id),
    ]
    if original_id:
        headers += [("In-Reply-To", original_id), ("References", original_id)]
    body_bytes, transfer_encoding = _encode_body(body)
    headers += [
        ("Auto-Submitted", "auto-replied"),
        ("X-Auto-Response-Suppress", "All"),
        ("X-SourceAuth-Challenge", challenge_id),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", transfer_encoding),
    ]
    lines = [_header_line(field, value) for field, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body_bytes


# A token that a mail client could turn into a link or an address: a scheme, an @, or a
# host name (labels and a final alphabetic label), also with IDNA's other full stops.
_LINKISH_RE = re.compile(
    r"(?:[a-z][a-z0-9+.-]*://|\b(?:mailto|tel|sms|data|javascript|file|news|https?|ftp):"
    r"|@|\bwww\.|[\w-]\.[^\W\d_]{2,}\b)",
    re.IGNORECASE,
)
_FULL_STOPS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def defang(text: str) -> str:
    """Single-line text with every link-like or address-like word replaced by REMOVED."""
    words = []
    for word in text.split(" "):
        folded = unicodedata.normalize("NFKC", word).translate(_FULL_STOPS)
        words.append(REMOVED if _LINKISH_RE.search(folded) else word)
    return " ".join(words)


def verp_address(base: str, token: str, delimiter: str = "+") -> str:
    """("bounces@example.test", "abc") -> "bounces+abc@example.test"."""
    local, at, domain = base.rpartition("@")
    if not at:
        return f"{base}{delimiter}{token}"
    return f"{local}{delimiter}{token}@{domain}"


def normalize_message_id(value: str) -> str:
    """Return "<id@host>" for "id@host" or "<id@host>"; "" when empty or not a plausible msg-id."""
    if len(value) > _MSGID_MAX * 4:
        return ""
    text = _single_line(value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return f"<{text}>" if len(text) <= _MSGID_MAX and _MSGID_RE.match(text) else ""


# --- helpers ----------------------------------------------------------------------------------


def _single_line(value: str) -> str:
    """Control, line-separator and surrogate characters and whitespace runs become one space."""
    return _BREAKING_RE.sub(" ", str(value)).strip()


# Runs of whitespace (str.isspace) and of Unicode categories Cc, Cs, Zl and Zp: one regex pass
# instead of a category lookup per character (a test holds it to that definition).
_BREAKING_RE = re.compile("[\\s\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")


def _format_address(value: str, field: str) -> str:
    """One bare addr-spec that a parser reads as exactly one address (local part quoted if need)."""
    if len(value) > _ADDRESS_MAX * 4:
        raise ValueError(f"{field}: address longer than {_ADDRESS_MAX} characters")
    text = _single_line(value)
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        raise ValueError(f"{field}: empty address")
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, ""
    if not (_DOT_ATOM_RE.match(local) or _QUOTED_RE.match(local)):
        local = _quote_string(local)
    if domain.startswith("[") and domain.endswith("]"):
        domain = "[" + re.sub(r"[^0-9A-Za-z.:-]", "", domain[1:-1]) + "]"
    else:
        domain = _DOMAIN_SPECIALS_RE.sub("", domain)
    address = f"{local}@{domain}" if domain else local
    if len(address) > _ADDRESS_MAX:
        raise ValueError(f"{field}: address longer than {_ADDRESS_MAX} characters")
    return address


def _format_mailbox(name: str, address: str) -> str:
    """'Display Name <address>': the name as an atom phrase, a quoted string or RFC 2047 words."""
    if not name:
        return address
    if name.isascii() and "=?" not in name:
        phrase = name if _PHRASE_RE.match(name) else _quote_string(name)
    else:
        phrase = Header(name, "utf-8", header_name="From").encode(linesep="\r\n")
    return f"{phrase} <{address}>"


def _quote_string(text: str) -> str:
    """An RFC 5322 quoted-string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header_line(field: str, value: str) -> str:
    """One header field, RFC 2047-encoded and folded when it is not plain short ASCII."""
    line = f"{field}: {value}"
    if field == "Subject" and (not value.isascii() or "=?" in value or len(line) > _LINE_MAX):
        return f"{field}: " + Header(value, "utf-8", header_name=field).encode(linesep="\r\n")
    return line


def _encode_body(body: str) -> tuple[bytes, str]:
    """CRLF line endings; 7bit when plain ASCII with short lines, else quoted-printable UTF-8."""
    text = _clean_body(body)
    lines = _NEWLINES_RE.split(text)
    if text.isascii() and all(len(line) <= _LINE_MAX for line in lines):
        return ("\r\n".join(lines).rstrip("\r\n") + "\r\n").encode("ascii"), "7bit"
    octets = "\n".join(lines).encode("utf-8").decode("latin-1")  # what body_encode expects
    encoded = quoprimime.body_encode(octets, maxlinelen=76, eol="\r\n")
    return (encoded.rstrip("\r\n") + "\r\n").encode("ascii"), "quoted-printable"


def _clean_body(body: str) -> str:
    """Control characters other than line breaks and tabs removed; surrogates replaced."""
    text = body.encode("utf-8", "replace").decode("utf-8", "replace")
    return _UNWANTED_RE.sub("", text)


# Exactly the characters of Unicode categories Cc, Cs, Zl and Zp but CR, LF and TAB: one regex
# pass instead of a category lookup per character (a challenge body is ~1,500 of them).
_UNWANTED_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _as_utc(moment: datetime) -> datetime:
    """Aware datetimes converted to UTC; naive ones taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
