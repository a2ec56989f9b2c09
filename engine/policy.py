"""What may be challenged: never-challenge classes, the authentication gate and rate limits.

Pure decisions over envelope and header data; the caller passes the time and logs the outcome.
"""

from __future__ import annotations

import functools
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from publicsuffixlist import PublicSuffixList

from sourceauth.engine.addresses import (
    AddressError,
    is_null_sender,
    matches,
    normalize_address,
    normalize_pattern,
    split_extension,
)

__all__ = [
    "DEFAULT_SPAM_HEADERS",
    "AuthGate",
    "ChallengeRateLimiter",
    "Classification",
    "ExemptAction",
    "Exemption",
    "Headers",
    "Limits",
    "check_auth_gate",
    "check_authorized_sender",
    "classify",
    "is_automated",
    "is_protected",
    "registered_domain",
    "spam_flag",
]

Headers = Sequence[tuple[str, str]]
"""(name, unfolded decoded value) in message order; names compare case-insensitively."""

DEFAULT_SPAM_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Spam-Flag", "YES"),
    ("X-Spam-Status", "Yes"),
)

_DAEMON_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster"})
_LIST_HEADERS = (
    "list-id",
    "list-unsubscribe",
    "list-post",
    "list-help",
    "list-subscribe",
    "list-owner",
    "list-archive",
    "mailing-list",
    "x-mailing-list",
)
_LIST_LOCAL_SUFFIXES = ("-request", "-owner", "-bounces")
_LIST_LOCAL_PREFIXES = ("owner-",)
_BULK_PRECEDENCES = frozenset({"bulk", "list", "junk"})
_REPORT_TYPES = frozenset(
    {
        "multipart/report",
        "message/delivery-status",
        "message/global-delivery-status",
        "message/disposition-notification",
    }
)
# Headers auto-responders set besides RFC 3834's Auto-Submitted (their mere presence counts).
_AUTOREPLY_HEADERS = (
    "x-autoreply",
    "x-autorespond",
    "x-autoresponder",
    "x-autoreply-from",
    "x-mail-autoreply",
)
_AUTOREPLY_PRECEDENCES = frozenset({"auto_reply", "auto-reply"})
_LIST_SET = frozenset(_LIST_HEADERS)
_AUTOREPLY_SET = frozenset(_AUTOREPLY_HEADERS)
_CLASSIFY_HEADERS = frozenset(
    {"from", "auto-submitted", "precedence", "content-type", *_LIST_HEADERS, *_AUTOREPLY_HEADERS}
)
_AUTOMATED_HEADERS = _CLASSIFY_HEADERS
# Header text is hostile: reasons quote at most this much of it, parsers read at most this.
_SHOWN_CHARS = 100
_PARSED_CHARS = 16_384

_Fields = dict[str, list[str]]


class Exemption(StrEnum):
    """Classes of mail that must never be challenged (DESIGN.md §2), in order of precedence."""

    NULL_SENDER = "null_sender"
    MAILER_DAEMON = "mailer_daemon"
    AUTO_SUBMITTED = "auto_submitted"
    MAILING_LIST = "mailing_list"
    BULK = "bulk"
    DSN = "dsn"
    PLAIN_BOUNCE = "plain_bounce"
    SPAM = "spam"


class ExemptAction(StrEnum):
    """What the engine does with mail of an exempt class."""

    HOLD = "hold"
    DELIVER = "deliver"
    DISCARD = "discard"


@dataclass(frozen=True)
class Classification:
    """Why a message is exempt from challenge: its class and a human-readable reason."""

    exemption: Exemption
    detail: str


class _Message:
    """The parts of one message the never-challenge tests read, each parsed once."""

    __slots__ = ("fields", "mail_from", "sender_local")

    def __init__(self, mail_from: str, headers: Headers, wanted: frozenset[str]) -> None:
        self.mail_from = mail_from
        self.sender_local = _envelope_local_part(mail_from)
        self.fields = _index(headers, wanted)

    def envelope_detail(self) -> str:
        return f"MAIL FROM:<{_shown(self.mail_from.strip('<> '))}>"


def classify(
    mail_from: str,
    headers: Headers,
    *,
    spam_headers: Sequence[tuple[str, str]] = DEFAULT_SPAM_HEADERS,
    bounce_like: str = "",
) -> Classification | None:
    """Return the first exemption class the message falls in, or None if it may be challenged.

    mail_from is the raw envelope sender ("" or "<>" is the null sender). spam_headers are
    (header name, value prefix) tests; a prefix matches case-insensitively at a word boundary
    and an empty prefix matches the header's mere presence. bounce_like is the inbound
    adapter's finding that the body is a bounce in no report format (Incoming.bounce_like).
    """
    message = _Message(mail_from, headers, _classify_headers(tuple(spam_headers)))
    for test in _CLASSIFY_TESTS:
        found = test(message)
        if found is not None:
            return found
    if bounce_like:
        return Classification(Exemption.PLAIN_BOUNCE, _shown(bounce_like))
    return _spam(message.fields, spam_headers)


@functools.lru_cache(maxsize=64)
def _classify_headers(spam_headers: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """The headers classify reads: its own and the spam tests' (one set per configuration)."""
    return _CLASSIFY_HEADERS | {name.strip().lower() for name, _ in spam_headers}


def spam_flag(
    headers: Headers, spam_headers: Sequence[tuple[str, str]] = DEFAULT_SPAM_HEADERS
) -> Classification | None:
    """The upstream spam flag alone (see classify), for mail that no exemption applies to."""
    wanted = frozenset(name.strip().lower() for name, _ in spam_headers)
    return _spam(_index(headers, wanted), spam_headers)


def is_automated(mail_from: str, headers: Headers) -> Classification | None:
    """Return why a reply to a confirm address is automated (and must never confirm), or None.

    Upstream spam flags are not consulted: a human reply quoting a challenge may look spammy.
    """
    message = _Message(mail_from, headers, _AUTOMATED_HEADERS)
    for test in _AUTOMATED_TESTS:
        found = test(message)
        if found is not None:
            return found
    return None


def is_protected(recipient: str, protected: Sequence[str], delimiter: str = "+") -> bool:
    """Tell whether recipient uses source authentication (see addresses.matches for patterns).

    Raises AddressError for an invalid recipient or pattern; validate both before calling.
    """
    return _is_protected(recipient, tuple(protected), delimiter)


@functools.lru_cache(maxsize=1 << 16)
def _is_protected(recipient: str, protected: tuple[str, ...], delimiter: str) -> bool:
    return matches(recipient, protected, delimiter=delimiter)


# --- never-challenge classes -------------------------------------------------------------


def _null_sender(message: _Message) -> Classification | None:
    if is_null_sender(message.mail_from):
        return Classification(Exemption.NULL_SENDER, "MAIL FROM:<>")
    return None


def _mailer_daemon(message: _Message) -> Classification | None:
    if message.sender_local in _DAEMON_LOCAL_PARTS:
        return Classification(Exemption.MAILER_DAEMON, message.envelope_detail())
    for value in message.fields.get("from", ()):
        if any(local in _DAEMON_LOCAL_PARTS for local in _header_local_parts(value)):
            return Classification(Exemption.MAILER_DAEMON, f"From: {_shown(value)}")
    return None


def _auto_submitted(message: _Message) -> Classification | None:
    for value in message.fields.get("auto-submitted", ()):
        # RFC 3834: anything but "no" (parameters and comments aside), even empty, is automatic.
        if _first_token(value) != "no":
            return Classification(Exemption.AUTO_SUBMITTED, f"Auto-Submitted: {_shown(value)}")
    return None


def _autoreply(message: _Message) -> Classification | None:
    for value in message.fields.get("precedence", ()):
        if _first_token(value) in _AUTOREPLY_PRECEDENCES:
            return Classification(Exemption.AUTO_SUBMITTED, f"Precedence: {_shown(value)}")
    if _AUTOREPLY_SET.isdisjoint(message.fields):
        return None
    for name in _AUTOREPLY_HEADERS:
        for value in message.fields.get(name, ()):
            return Classification(
                Exemption.AUTO_SUBMITTED, f"{_header_name(name)}: {_shown(value)}"
            )
    return None


def _mailing_list(message: _Message) -> Classification | None:
    if not _LIST_SET.isdisjoint(message.fields):  # one set test for mail of no list
        for name in _LIST_HEADERS:
            for value in message.fields.get(name, ()):
                return Classification(
                    Exemption.MAILING_LIST, f"{_header_name(name)}: {_shown(value)}"
                )
    local = message.sender_local
    if local.endswith(_LIST_LOCAL_SUFFIXES) or local.startswith(_LIST_LOCAL_PREFIXES):
        return Classification(Exemption.MAILING_LIST, message.envelope_detail())
    return None


def _bulk(message: _Message) -> Classification | None:
    for value in message.fields.get("precedence", ()):
        if _first_token(value) in _BULK_PRECEDENCES:
            return Classification(Exemption.BULK, f"Precedence: {_shown(value)}")
    return None


def _dsn(message: _Message) -> Classification | None:
    for value in message.fields.get("content-type", ()):
        if "".join(_first_token(value).split()) in _REPORT_TYPES:
            return Classification(Exemption.DSN, f"Content-Type: {_shown(value)}")
    return None


def _spam(fields: _Fields, spam_headers: Sequence[tuple[str, str]]) -> Classification | None:
    for name, prefix in spam_headers:
        wanted = prefix.strip().lower()
        for value in fields.get(name.strip().lower(), ()):
            text = value.strip().lower()
            boundary = text[len(wanted) : len(wanted) + 1]
            if text.startswith(wanted) and not (wanted and boundary.isalnum()):
                return Classification(Exemption.SPAM, f"{name}: {_shown(value)}")
    return None


_Test = Callable[[_Message], Classification | None]
_CLASSIFY_TESTS: tuple[_Test, ...] = (
    _null_sender,
    _mailer_daemon,
    _auto_submitted,
    _autoreply,
    _mailing_list,
    _bulk,
    _dsn,
)
_AUTOMATED_TESTS: tuple[_Test, ...] = (
    _null_sender,
    _mailer_daemon,
    _auto_submitted,
    _autoreply,
    _mailing_list,
    _bulk,
    _dsn,
)


# --- authentication gate -----------------------------------------------------------------


@dataclass(frozen=True)
class AuthGate:
    """Challenge only senders whose domain passed SPF or aligned DKIM at a trusted server.

    The MTA that stamps Authentication-Results with a trusted authserv-id must remove any
    header carrying that id which arrived with the message (RFC 8601 §5). When enabled, mail
    from an authorized sender whose domain the trusted results show failing is treated with
    authorized_fail_action (the whitelist is keyed on an unauthenticated envelope sender).
    """

    enabled: bool = False
    trusted_authserv_ids: tuple[str, ...] = ()
    require: Literal["spf_or_dkim", "spf", "dkim"] = "spf_or_dkim"
    authorized_fail_action: ExemptAction = ExemptAction.HOLD


@dataclass(frozen=True)
class _MethodResult:
    method: str
    result: str
    properties: dict[str, str]


# Results that are evidence against the sender domain (RFC 7208 §2.6, RFC 6376 §3.9, RFC 7489).
_SPF_FAILURES = frozenset({"fail", "softfail"})
_DKIM_FAILURES = frozenset({"fail"})


@dataclass
class _GateVerdict:
    passed: str = ""  # the passing result shown, when one counts
    from_trusted: bool = False
    failed: bool = False  # a trusted result shows the domain failing SPF, DKIM or DMARC
    seen: list[str] = field(default_factory=list)


def _gate_verdict(gate: AuthGate, domain: str, headers: Headers) -> _GateVerdict:
    """Read the trusted Authentication-Results about domain (stops at the first pass)."""
    verdict = _GateVerdict()
    trusted = {authserv_id.strip().lower() for authserv_id in gate.trusted_authserv_ids}
    want_spf = gate.require in ("spf_or_dkim", "spf")
    want_dkim = gate.require in ("spf_or_dkim", "dkim")
    for name, value in headers:
        # Longer than any real one; never truncated, since a cut value could name another domain.
        if name.strip().lower() != "authentication-results" or len(value) > _PARSED_CHARS:
            continue
        authserv_id, results = _parse_authentication_results(value)
        if authserv_id is None or authserv_id not in trusted:
            continue
        verdict.from_trusted = True
        for result in results:
            if result.method == "spf":
                mailfrom = result.properties.get("smtp.mailfrom", "")
                shown = f"spf={result.result} smtp.mailfrom={mailfrom}"
                if _domain(mailfrom) == domain:
                    if want_spf and result.result == "pass":
                        verdict.passed = f"{_shown(shown)} by {_shown(authserv_id)}"
                        return verdict
                    verdict.failed |= result.result in _SPF_FAILURES
            elif result.method == "dkim":
                if "header.d" in result.properties:
                    signer = result.properties["header.d"]
                    shown = f"dkim={result.result} header.d={signer}"
                else:
                    signer = result.properties.get("header.i", "")
                    shown = f"dkim={result.result} header.i={signer}"
                signing_domain = _domain(signer)
                aligned = signing_domain is not None and _dkim_aligned(signing_domain, domain)
                if want_dkim and result.result == "pass" and aligned:
                    verdict.passed = f"{_shown(shown)} by {_shown(authserv_id)}"
                    return verdict
                verdict.failed |= aligned and result.result in _DKIM_FAILURES
            elif result.method == "dmarc":
                header_from = _domain(result.properties.get("header.from", ""))
                verdict.failed |= result.result == "fail" and header_from == domain
                continue
            else:
                continue
            verdict.seen.append(_shown(shown))
    return verdict


def check_auth_gate(gate: AuthGate, sender_domain: str, headers: Headers) -> tuple[bool, str]:
    """Return (passed, reason) for sender_domain under gate; never raises on header content.

    SPF counts when spf=pass and smtp.mailfrom's domain equals sender_domain; DKIM counts when
    dkim=pass and header.d (else header.i's domain) equals sender_domain or is its parent or
    child within the same registered domain (Public Suffix List).
    """
    if not gate.enabled:
        return True, "auth gate disabled"
    domain = _domain(sender_domain)
    if domain is None:
        return False, "no sender domain to authenticate"
    verdict = _gate_verdict(gate, domain, headers)
    if verdict.passed:
        return True, verdict.passed
    if not verdict.from_trusted:
        return False, "no Authentication-Results from a trusted authserv-id"
    return False, f"no {_wanted(gate)} for {domain} (seen: {_seen(verdict)})"


def check_authorized_sender(gate: AuthGate, sender_domain: str, headers: Headers) -> str | None:
    """Why mail claiming an authorized sender looks forged, or None (deliver it as usual).

    Forged means: the gate is enabled, a trusted server reports no counted pass for the
    domain (see check_auth_gate) and at least one failure for it (spf=fail|softfail, an
    aligned dkim=fail, or dmarc=fail). No results, or only none/neutral/temperror, is no
    evidence either way: a domain that publishes nothing cannot be checked.
    """
    if not gate.enabled:
        return None
    domain = _domain(sender_domain)
    if domain is None:
        return None
    verdict = _gate_verdict(gate, domain, headers)
    if verdict.passed or not verdict.failed:
        return None
    return f"no {_wanted(gate)} for {domain} and a failure (seen: {_seen(verdict)})"


def _wanted(gate: AuthGate) -> str:
    return {"spf_or_dkim": "spf=pass or aligned dkim=pass", "spf": "spf=pass"}.get(
        gate.require, "aligned dkim=pass"
    )


def _seen(verdict: _GateVerdict) -> str:
    return "; ".join(verdict.seen[:4]) or "nothing"


def _dkim_aligned(signing_domain: str, sender_domain: str) -> bool:
    if signing_domain == sender_domain:
        return True
    related = signing_domain.endswith("." + sender_domain) or sender_domain.endswith(
        "." + signing_domain
    )
    # Parent/child only: siblings under a public suffix (a.co.uk, b.co.uk) must not align.
    return related and _organisational(signing_domain) == _organisational(sender_domain)


def _organisational(domain: str) -> str:
    return registered_domain(domain)


# The list bundled with the package (a snapshot, updated by upgrading it): never fetched.
_PSL = PublicSuffixList()


@functools.lru_cache(maxsize=1 << 16)
def registered_domain(domain: str) -> str:
    """The registered (organisational) domain by the Public Suffix List: "a.b.example.co.uk"
    -> "example.co.uk". A public suffix itself, or a name under an unknown top-level domain
    with one label, is its own registered domain."""
    key = domain.strip().rstrip(".").lower()
    return _PSL.privatesuffix(key) or key


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|=|[^\s="]+')


def _parse_authentication_results(value: str) -> tuple[str | None, list[_MethodResult]]:
    """Parse an RFC 8601 header into (lower-cased authserv-id or None, method results)."""
    segments = _split_outside_quotes(_strip_comments(value), ";")
    head = _TOKEN.findall(segments[0])
    # A header without an authserv-id (some services start with "spf=...") is nobody's.
    if not head or "=" in head:
        return None, []
    authserv_id = _unquote(head[0]).lower()
    results: list[_MethodResult] = []
    for segment in segments[1:]:
        pairs = _pairs(_TOKEN.findall(segment))
        if not pairs:
            continue
        method, result = pairs[0]
        properties: dict[str, str] = {}
        for key, pair_value in pairs[1:]:
            properties.setdefault(key.lower(), pair_value)
        method = method.partition("/")[0].strip().lower()
        results.append(_MethodResult(method, result.lower(), properties))
    return authserv_id, results


def _pairs(tokens: list[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    index = 0
    while index + 2 < len(tokens):
        key, equals, value = tokens[index : index + 3]
        if key != "=" and equals == "=" and value != "=":
            pairs.append((key, _unquote(value)))
            index += 3
        else:
            index += 1
    return pairs


# --- rate limits -------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Challenge caps over a sliding hour, and how often one challenge may be re-sent."""

    challenges_per_domain_per_hour: int = 100
    challenges_per_hour: int = 1000
    max_resends: int = 2
    # --- abuse resistance (issue 7)
    challenged_later_per_pass: int = 100  # senders of mail held over a cap, per maintenance pass


_BUCKET_SECONDS = 60
TOTAL = "*"  # the server-wide count, beside the registered domains (never one of them)
# A challenge counts in its own minute and the 60 after it: never less than a full hour.
_WINDOW_BUCKETS = 60


class _DomainWindow:
    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [minute, count], oldest first
        self.total = 0


class ChallengeRateLimiter:
    """Counts challenges per sender domain and server-wide over a sliding hour.

    Per-minute buckets: a challenge counts for at least 60 and under 61 minutes, so no hour
    ever exceeds a cap. Memory is bounded by the buckets of the last hour; time never runs
    backwards here (an earlier `now` counts as the latest seen).
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._minute: int | None = None
        self._domains: dict[str, _DomainWindow] = {}
        # Every (minute, domain) bucket in creation order, so expiry is a popleft.
        self._expiry: deque[tuple[int, str]] = deque()
        self._total = 0
        self._seeded: list[tuple[int, str]] = []  # (minute, domain) not yet applied

    def check(
        self, sender_domain: str, now: float, *, pending_total: int = 0, pending_domain: int = 0
    ) -> str | None:
        """Return None if a challenge to sender_domain may be sent at now, else the reason.

        Domains count by registered domain (Public Suffix List): random subdomains of one
        domain share its cap. pending_* are challenges decided but not yet recorded."""
        self._advance(now)
        limits = self._limits
        if self._total + pending_total >= limits.challenges_per_hour:
            return f"challenges_per_hour limit {limits.challenges_per_hour} reached"
        domain = _domain_key(sender_domain)
        window = self._domains.get(domain)
        if (
            window.total if window else 0
        ) + pending_domain >= limits.challenges_per_domain_per_hour:
            return (
                f"challenges_per_domain_per_hour limit {limits.challenges_per_domain_per_hour}"
                f" reached for {_shown(domain)}"
            )
        return None

    def record(self, sender_domain: str, now: float) -> None:
        """Count a challenge to sender_domain sent (or queued) at now."""
        self._add(_domain_key(sender_domain), self._advance(now))

    def seed(self, events: Iterable[tuple[str, float]]) -> None:
        """Restore counts after a restart from (sender domain, time) of recent challenges.

        Applied at the next check or record: older than the window is dropped, later than
        that call's now counts as now.
        """
        self._seeded.extend((_minute_of(when), _domain_key(domain)) for domain, when in events)
        if self._minute is not None:
            self._apply_seeded(self._minute)

    def at_least(self, counts: dict[str, int], now: float) -> None:
        """Raise the counts to what the store holds (`counts`: registered domain -> challenges
        in the window, TOTAL for all domains), after another node's challenges were found
        there. A shortfall counts from `now`'s minute: later than its real minute, so it
        expires late, never early (a cap is never exceeded, at worst reached early)."""
        minute = self._advance(now)
        for domain, count in counts.items():
            if domain == TOTAL:
                continue
            key = _domain_key(domain)
            window = self._domains.get(key)
            for _ in range(count - (window.total if window else 0)):
                self._add(key, minute)
        for _ in range(counts.get(TOTAL, 0) - self._total):
            self._add(TOTAL, minute)  # other domains' challenges: count in the total only

    @property
    def domain_count(self) -> int:
        """Sender domains with challenges in the window."""
        return len(self._domains)

    @property
    def bucket_count(self) -> int:
        """Per-domain minute buckets held: the limiter's memory, in entries."""
        return len(self._expiry)

    def _advance(self, now: float) -> int:
        minute = _minute_of(now)
        if self._minute is None or minute > self._minute:
            self._minute = minute
        if self._seeded:
            self._apply_seeded(self._minute)
        cutoff = self._minute - _WINDOW_BUCKETS
        expiry = self._expiry
        while expiry and expiry[0][0] < cutoff:
            _, domain = expiry.popleft()
            window = self._domains[domain]
            _, count = window.buckets.popleft()
            window.total -= count
            self._total -= count
            if not window.buckets:
                del self._domains[domain]
        return self._minute

    def _apply_seeded(self, current: int) -> None:
        cutoff = current - _WINDOW_BUCKETS
        events = sorted((min(minute, current), domain) for minute, domain in self._seeded)
        self._seeded.clear()
        for minute, domain in events:
            if minute >= cutoff:
                self._add(domain, minute)

    def _add(self, domain: str, minute: int) -> None:
        # Buckets stay in creation order; a late event joins the newest bucket (counts longer).
        if self._expiry and minute < self._expiry[-1][0]:
            minute = self._expiry[-1][0]
        window = self._domains.get(domain)
        if window is None:
            window = self._domains[domain] = _DomainWindow()
        if window.buckets and window.buckets[-1][0] == minute:
            window.buckets[-1][1] += 1
        else:
            window.buckets.append([minute, 1])
            self._expiry.append((minute, domain))
        window.total += 1
        self._total += 1


def _minute_of(now: float) -> int:
    if not math.isfinite(now):
        raise ValueError(f"time must be a finite number of seconds, not {now!r}")
    return int(now // _BUCKET_SECONDS)


def _domain_key(domain: str) -> str:
    return registered_domain(domain)


# --- header text -------------------------------------------------------------------------


def _index(headers: Headers, wanted: frozenset[str]) -> _Fields:
    """Values of the wanted headers (lower-cased names) in message order."""
    fields: _Fields = {}
    for name, value in headers:
        key = name.strip().lower()
        if key in wanted:
            fields.setdefault(key, []).append(value)
    return fields


def _header_name(lower_name: str) -> str:
    return "-".join(part.capitalize() for part in lower_name.split("-"))


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments (nested, with quoted-pairs); quoted strings are kept."""
    if "(" not in value:
        return value
    kept: list[str] = []
    depth = 0
    in_quotes = False
    escaped = False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                kept.append(char)
            continue
        if char == "\\" and (depth or in_quotes):
            escaped = True
            if depth == 0:
                kept.append(char)
        elif in_quotes:
            kept.append(char)
            in_quotes = char != '"'
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
            if depth == 0:
                kept.append(" ")
        elif depth == 0:
            kept.append(char)
            in_quotes = char == '"'
    return "".join(kept)


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    parts: list[str] = []
    start = 0
    in_quotes = False
    escaped = False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == separator and not in_quotes:
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return parts


def _first_token(value: str) -> str:
    """The lower-cased value before any ';' parameters, without comments or quotes."""
    text = value[:_PARSED_CHARS]
    if '"' in text or "(" in text:
        text = _split_outside_quotes(_strip_comments(text), ";")[0]
    head = text.partition(";")[0]
    return _unquote(head.strip()).strip().lower()


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _shown(value: str) -> str:
    """Hostile header text made safe to put in a reason: printable and short."""
    text = "".join(char if char.isprintable() else "?" for char in value[: _SHOWN_CHARS + 1])
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def _domain(value: str) -> str | None:
    """The normalized domain of an address or bare domain, or None if it is not one."""
    text = _unquote(value.strip()).rpartition("@")[2].strip().rstrip(".")
    if not text or text.startswith("."):
        return None
    try:
        return normalize_pattern(text)
    except AddressError:
        return None


def _envelope_local_part(mail_from: str) -> str:
    """The lower-cased local part, without extension, of an envelope sender (even invalid)."""
    try:
        base, _ = split_extension(normalize_address(mail_from))
        return base.rpartition("@")[0]
    except AddressError:
        return _bare_local_part(mail_from.strip().strip("<>"))


_ANGLE_ADDR = re.compile(r"<([^<>]*)>")
_ADDRESS_SEPARATORS = re.compile(r"[\s,]+")


def _header_local_parts(value: str) -> list[str]:
    """Lower-cased local parts of the addresses in an address header, found leniently."""
    text = _strip_comments(value[:_PARSED_CHARS])
    candidates = _ANGLE_ADDR.findall(text) or [
        word for word in _ADDRESS_SEPARATORS.split(text) if "@" in word
    ]
    return [_bare_local_part(candidate) for candidate in candidates]


def _bare_local_part(address: str) -> str:
    local, at, _ = address.strip().rpartition("@")
    return (local if at else address).strip().strip('"').lower()
