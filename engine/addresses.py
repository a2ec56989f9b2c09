"""Envelope and header addresses: normalization, extensions and whitelist patterns.

Every address the engine stores or compares passes through normalize_address first.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable
from encodings import idna

MAX_ADDRESS_OCTETS = 254
MAX_LOCAL_OCTETS = 64
MAX_LABEL_OCTETS = 63
# Cheap bound checked before any Unicode work, so hostile input cannot cost much.
_MAX_RAW_CHARS = 1024
# Characters that need quoting in a local part (RFC 5322 specials); quoting is not supported.
_LOCAL_SPECIALS = frozenset('"(),:;<>@[\\]')
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


class AddressError(ValueError):
    """An envelope or header address that cannot be used."""


def is_null_sender(raw: str) -> bool:
    """Tell whether raw is the SMTP null reverse-path: "", "<>" or "< >"."""
    stripped = raw.strip()
    if stripped == "":
        return True
    return stripped.startswith("<") and stripped.endswith(">") and stripped[1:-1].strip() == ""


def _normalize_address(raw: str) -> str:
    """Return raw as "local@domain", lower-cased, with an IDNA (punycode) ASCII domain.

    Accepts "<a@b>" or "a@b" with surrounding whitespace. A non-ASCII (SMTPUTF8) local part
    is kept but lower-cased and normalised to NFC. Quoted local parts ('"a b"@x'), address
    literals ("a@[1.2.3.4]") and source routes are rejected. Lengths are counted in UTF-8
    octets. Raises AddressError, whose message says why, for anything that is not a usable
    address, the null sender included.
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
    if "<" in text or ">" in text:
        raise AddressError("unbalanced angle brackets")
    _check_characters(text)
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError("no '@' in address")
    if not local:
        raise AddressError("empty local part")
    if not domain:
        raise AddressError("empty domain")
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


def _check_characters(text: str) -> None:
    for char in text:
        if char.isspace():
            raise AddressError("address contains whitespace")
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise AddressError("address contains a control character")


def _normalize_local(local: str) -> str:
    if any(char in _LOCAL_SPECIALS for char in local):
        raise AddressError("local part contains quotes or special characters")
    if not local.isascii():
        # One spelling per address (RFC 6532 §3.1: NFC), before and after case folding:
        # NFC and NFD forms are one sender. The Kelvin sign is canonically K (a singleton).
        local = unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).lower())
    else:
        local = local.lower()
    if _octets(local) > MAX_LOCAL_OCTETS:
        raise AddressError(f"local part is longer than {MAX_LOCAL_OCTETS} octets")
    return local


def _normalize_domain(domain: str) -> str:
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        raise AddressError("address literals are not accepted")
    return ".".join(_normalize_label(label) for label in domain.split("."))


def _normalize_label(label: str) -> str:
    if not label:
        raise AddressError("domain has an empty label")
    if len(label) > _MAX_RAW_CHARS:
        raise AddressError("domain label is too long")
    if not label.isascii():
        try:
            label = idna.ToASCII(label).decode("ascii")
        except UnicodeError as error:
            raise AddressError("domain label is not a valid internationalized name") from error
    label = label.lower()
    if len(label) > MAX_LABEL_OCTETS:
        raise AddressError(f"domain label is longer than {MAX_LABEL_OCTETS} characters")
    if not set(label) <= _LDH:
        raise AddressError("domain label has characters other than letters, digits, hyphen")
    if label.startswith("-") or label.endswith("-"):
        raise AddressError("domain label starts or ends with a hyphen")
    return label


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))
