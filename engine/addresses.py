"""Envelope and header addresses: normalization, extensions and whitelist patterns.

Every address the engine stores or compares passes through normalize_address first.
"""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from collections.abc import Iterable

import idna

MAX_ADDRESS_OCTETS = 254
MAX_LABEL_OCTETS = 63
# Cheap bound checked before any Unicode work, so hostile input cannot cost much.
_MAX_RAW_CHARS = 1024
# Characters that need quoting in a local part (RFC 5322 specials).
_LOCAL_SPECIALS = frozenset('"(),:;<>@[\\]')
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_LABEL_CHARS = _LDH | {"_"}  # not RFC 5321's grammar, but in real host names; Postfix passes it


class AddressError(ValueError):
    """An envelope or header address that cannot be used."""


def is_null_sender(raw: str) -> bool:
    """Tell whether raw is the SMTP null reverse-path: "", "<>" or "< >"."""
    stripped = raw.strip()
    if stripped == "":
        return True
    return stripped.startswith("<") and stripped.endswith(">") and stripped[1:-1].strip() == ""


def _normalize_address(raw: str) -> str:
    """Return raw as "local@domain", lower-cased, with an ASCII domain (UTS 46 A-labels).

    Accepts every RFC 5321/6531 Path: "<a@b>" or "a@b" with surrounding whitespace, a quoted
    local part ('"a b"@x', kept quoted only when it needs to be), an address literal
    ("a@[192.0.2.1]", "a@[IPv6:2001:db8::1]"), a source route (dropped, as RFC 5321 asks), and
    an underscore in a domain label (Postfix passes them). A non-ASCII (SMTPUTF8) local part is
    kept but lower-cased and normalised to NFC (NFC and NFD spellings are one sender). The
    whole address is at most 254 UTF-8 octets (RFC 5321's 256-octet path less its
    brackets); the local part's own 64-octet limit is not enforced. Raises
    AddressError, whose message says why, for anything that is not a usable address, the null
    sender included.
    """
    if len(raw) > _MAX_RAW_CHARS:
        raise AddressError("address is too long")
    text = raw.strip()
    if is_null_sender(text):
        raise AddressError("the null sender is not an address")
    if text.startswith("<") or text.endswith(">"):
        if not (text.startswith("<") and text.endswith(">")):
            raise AddressError("unbalanced angle brackets")
        text = text[1:-1]
    local, domain = _split_mailbox(_without_source_route(text))
    local = _normalize_local(local)
    domain = _normalize_domain(domain)
    address = f"{local}@{domain}"
    if _octets(address) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"address is longer than {MAX_ADDRESS_OCTETS} octets")
    return address


# Addresses repeat (one sender, many messages): the hot path parses each distinct one once.
normalize_address = functools.lru_cache(maxsize=1 << 16)(_normalize_address)


def normalize_pattern(raw: str) -> str:
    """Normalize a whitelist pattern: a full address, a domain, or ".domain" for subdomains.

    Raises AddressError for a pattern that could never match; validate configuration with it.
    """
    text = raw.strip()
    if "@" in text:
        return normalize_address(text)
    if text.startswith("."):
        return "." + _normalize_domain(text[1:])
    return _normalize_domain(text)


def split_extension(address: str, delimiter: str = "+") -> tuple[str, str | None]:
    """Split a normalized address into (base address, extension or None).

    Only the first delimiter splits ("a+b+c@x" gives ("a@x", "b+c")), as Postfix does. A local
    part that starts with the delimiter has no extension, since its base would be empty.
    """
    if not delimiter:
        raise ValueError("the extension delimiter must not be empty")
    local, at, domain = address.rpartition("@")
    if not at:
        raise AddressError("no '@' in address")
    if local.startswith('"'):
        return address, None  # a quoted local part is one name: no extension to split
    base, found, extension = local.partition(delimiter)
    if not found or not base:
        return address, None
    return f"{base}@{domain}", extension


def domain_of(address: str) -> str:
    """Return the domain of an address: the part after the last "@"."""
    _, at, domain = address.rpartition("@")
    if not at:
        raise AddressError("no '@' in address")
    return domain


def matches(address: str, patterns: Iterable[str], delimiter: str = "+") -> bool:
    """Tell whether address matches any pattern (see normalize_pattern for the forms).

    A full-address pattern matches the address with or without its extension
    ("alice+x@example.test" matches "alice@example.test"). A domain pattern matches that
    domain only; ".example.test" matches every subdomain of example.test but not the apex.
    Raises AddressError if the address or a pattern is invalid.
    """
    normalized = normalize_address(address)
    base, _ = split_extension(normalized, delimiter)
    domain = domain_of(normalized)
    for raw_pattern in patterns:
        pattern = normalize_pattern(raw_pattern)
        if "@" in pattern:
            if pattern in (normalized, base):
                return True
        elif pattern.startswith("."):
            if domain.endswith(pattern):
                return True
        elif domain == pattern:
            return True
    return False


def _check_characters(text: str, *, space: bool = False) -> None:
    # Printable ASCII holds no control character and no whitespace but the space itself.
    if text.isascii() and text.isprintable() and (space or " " not in text):
        return
    for char in text:
        if char.isspace() and not (space and char == " "):
            raise AddressError("address contains whitespace")
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise AddressError("address contains a control character")


def _without_source_route(text: str) -> str:
    """Drop an RFC 5321 source route ("@relay1,@relay2:a@b"), checking its domains."""
    if not text.startswith("@"):
        return text
    route, colon, mailbox = text.partition(":")
    if not colon:
        raise AddressError("source route without ':'")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressError("source route hop without '@'")
        _check_characters(hop)
        _normalize_domain(hop[1:])
    return mailbox


def _split_mailbox(text: str) -> tuple[str, str]:
    """(local part, domain) of "local@domain"; a quoted local part may hold "@" and spaces."""
    if text.startswith('"'):
        end = _closing_quote(text)
        local, rest = text[: end + 1], text[end + 1 :]
        if not rest.startswith("@"):
            raise AddressError("a quoted local part must be followed by '@'")
        domain = rest[1:]
    else:
        _check_characters(text)
        if "<" in text or ">" in text:
            raise AddressError("unbalanced angle brackets")
        local, at, domain = text.rpartition("@")
        if not at:
            raise AddressError("no '@' in address")
        if not local:
            raise AddressError("empty local part")
    _check_characters(domain)
    if not domain:
        raise AddressError("empty domain")
    return local, domain


def _closing_quote(text: str) -> int:
    """Index of the quote that closes the quoted string text starts with (RFC 5321 4.1.2)."""
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return index
        index += 1
    raise AddressError("unterminated quoted local part")


def _unquote(local: str) -> str:
    """The content of a quoted local part: quoted-pairs resolved, qtextSMTP checked."""
    body = local[1:-1]
    _check_characters(body, space=True)
    out: list[str] = []
    escaped = False
    for char in body:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            raise AddressError("unescaped quote in a quoted local part")
        else:
            out.append(char)
    if escaped:
        raise AddressError("quoted local part ends with a backslash")
    return "".join(out)


def _normalize_local(local: str) -> str:
    if local.startswith('"'):
        content = _unquote(local).lower()
        if content and not any(
            char in _LOCAL_SPECIALS or char.isspace() or char == "\\" for char in content
        ):
            local = content  # '"ab"@x' is ab@x: one mailbox, one spelling
        else:
            local = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif not _LOCAL_SPECIALS.isdisjoint(local):
        raise AddressError("local part contains special characters; quote it")
    else:
        local = local.lower()
    if not local.isascii():
        # One spelling per address (RFC 6532 §3.1: NFC), before and after case folding:
        # NFC and NFD forms are one sender. The Kelvin sign is canonically K (a singleton).
        local = unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).lower())
    # No 64-octet cap on the local part: Postfix passes longer ones (VERP return paths do).
    return local


@functools.lru_cache(maxsize=1 << 14)  # many senders share few domains (bulk imports too)
def _normalize_domain(domain: str) -> str:
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        return _normalize_literal(domain)
    if not domain.isascii():
        domain = _uts46_to_ascii(domain)
    return ".".join(_normalize_label(label) for label in domain.split("."))


def _uts46_to_ascii(domain: str) -> str:
    """UTS 46 processing (nontransitional) through the `idna` package: case, width and
    compatibility forms mapped (full-width letters, the Kelvin sign to "k", ideographic full
    stops to "."), NFC, then each non-ASCII label as its A-label. A label UTS 46 maps but
    IDNA 2008 refuses (symbols such as U+2603) is still encoded, as UTS 46's ToASCII does:
    an address the MTA passed is never refused over IDNA 2008's stricter table."""
    if len(domain) > _MAX_RAW_CHARS:
        raise AddressError("domain is too long")
    try:
        mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError) as error:
        raise AddressError("domain is not a valid internationalized name") from error
    labels = []
    for label in mapped.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(idna.alabel(label).decode("ascii"))
        except (idna.IDNAError, UnicodeError):
            labels.append("xn--" + label.encode("punycode").decode("ascii"))
    return ".".join(labels)


def _normalize_literal(domain: str) -> str:
    """An RFC 5321 address literal: "[192.0.2.1]", "[IPv6:2001:db8::1]" or "[tag:content]"."""
    if not domain.endswith("]") or len(domain) < 3:
        raise AddressError("unterminated address literal")
    inner = domain[1:-1]
    tag, colon, value = inner.partition(":")
    try:
        if not colon:
            return f"[{ipaddress.IPv4Address(inner)}]"
        if tag.lower() == "ipv6":
            return f"[ipv6:{ipaddress.IPv6Address(value).compressed}]"
    except ValueError:
        raise AddressError("address literal is not a valid IP address") from None
    tag = tag.lower()
    if (
        not tag
        or not set(tag) <= _LDH
        or tag.startswith("-")
        or tag.endswith("-")
        or not value
        or any(not 33 <= ord(char) <= 126 or char in "[]\\" for char in value)
    ):
        raise AddressError("address literal is neither an IP address nor tag:content")
    return f"[{tag}:{value}]"


def _normalize_label(label: str) -> str:
    if not label:
        raise AddressError("domain has an empty label")
    if len(label) > _MAX_RAW_CHARS:
        raise AddressError("domain label is too long")
    label = label.lower()
    if len(label) > MAX_LABEL_OCTETS:
        raise AddressError(f"domain label is longer than {MAX_LABEL_OCTETS} characters")
    if not set(label) <= _LABEL_CHARS:
        raise AddressError(
            "domain label has characters other than letters, digits, hyphen, underscore"
        )
    if label.startswith("-") or label.endswith("-"):
        raise AddressError("domain label starts or ends with a hyphen")
    return label


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))
