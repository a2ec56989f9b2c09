"""Sender lists of other challenge-response systems, read line by line into addresses and
rules for `sourceauth senders import` (formats: plain, tmda, ask, postconfirm), and the
plain format written by `senders export`. docs/rules.md describes each format.

Every line is validated; a bad one becomes a `BadLine` with its number and the reason, and
reading goes on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sourceauth.engine.addresses import AddressError, normalize_address
from sourceauth.engine.errors import InvalidInput
from sourceauth.engine.rules import parse_pattern

FORMATS = ("plain", "tmda", "ask", "postconfirm")
SENDER = "sender"  # a rule on the sender: allow (imported as authorized) or block
RECIPIENT = "recipient"  # a rule on the recipient: exempt (ASK's `to` lines of a whitelist)


@dataclass(frozen=True)
class Address:
    line: int
    address: str  # normalized


@dataclass(frozen=True)
class PatternLine:
    line: int
    side: str  # SENDER or RECIPIENT
    pattern: str  # as `rules add` takes it


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str
    text: str


Entry = Address | PatternLine | BadLine


def read_list(text: str, fmt: str) -> Iterator[Entry]:
    """Every entry of a list file in format `fmt`, in file order."""
    parse = _PARSERS[fmt]
    for number, raw in enumerate(text.splitlines(), start=1):
        yield from parse(number, raw)


def _entry(number: int, token: str, side: str = SENDER) -> Entry:
    """An address, else a rule pattern (validated as `rules add` validates it)."""
    try:
        pattern = parse_pattern(token)
    except InvalidInput as exc:
        return BadLine(number, str(exc), token)
    if pattern.kind == "exact" and side == SENDER:
        return Address(number, pattern.text)
    return PatternLine(number, side, pattern.text)


# --- plain: one address or pattern per line, `#` comments --------------------------------


def _plain(number: int, raw: str) -> Iterator[Entry]:
    text = _without_comment(raw)
    if not text:
        return
    if len(text.split()) > 1:
        yield BadLine(number, "one address or pattern per line", raw.strip())
        return
    yield _entry(number, text)


def _without_comment(raw: str) -> str:
    text = raw.strip()
    if text.startswith("#"):
        return ""
    return re.split(r"\s#", text, maxsplit=1)[0].strip()


# --- TMDA: lists read by `from-file` rules -----------------------------------------------
# Blank lines and lines starting with `#` are skipped, ` #` starts a trailing comment, the
# line is lower-cased and its first word is a shell-style pattern (`*`, `?`, `[…]`) matched
# against the whole address; a second word (an address's value in some lists) is ignored.
# `user@=domain` matches the domain and every subdomain.


def _tmda(number: int, raw: str) -> Iterator[Entry]:
    text = _without_comment(raw.expandtabs()).lower()
    if not text:
        return
    word = text.split()[0]
    local, at, domain = word.rpartition("@")
    if at and domain.startswith("="):
        domain = domain[1:]
        if not domain:
            yield BadLine(number, "@= needs a domain", raw.strip())
            return
        for pattern in (f"{local}@{domain}", f"{local}@*.{domain}"):
            yield _entry(number, pattern)
        return
    if not at:
        yield BadLine(number, "not an address or an address pattern (no @)", raw.strip())
        return
    yield _entry(number, word)


# --- ASK (Active Spam Killer): whitelist.txt and ignore.txt ------------------------------
# Lower-cased; blank lines and `#` lines skipped. `from RE` (or a bare RE) is a regular
# expression searched in the sender address; `to RE` in the recipients; `subject RE` and
# `header RE` in the message. A RE that looks like an address and carries ^ or $ is
# anchored at both ends.

_ASK_LINE = re.compile(r"(from|to|subject|header)(?:(?:\s*:\s*|\s+)(.*))?")
_REGEX_ONLY = re.compile(r"[\\^$*+?()\[\]{}|]")


def _ask(number: int, raw: str) -> Iterator[Entry]:
    text = raw.strip().lower()
    if not text or text.startswith("#"):
        return
    found = _ASK_LINE.fullmatch(text)
    keyword, regex = (found.group(1), (found.group(2) or "").strip()) if found else ("from", text)
    if keyword in ("subject", "header"):
        yield BadLine(
            number, f"ASK {keyword} lines match message text; rules match addresses", raw.strip()
        )
        return
    if not regex:
        yield BadLine(number, f"an empty {keyword} line", raw.strip())
        return
    yield _ask_regex(number, regex, SENDER if keyword == "from" else RECIPIENT)


def _ask_regex(number: int, regex: str, side: str) -> Entry:
    """ASK searches (unanchored) with its regex. A literal address or `@domain` becomes that
    address or domain (narrower than the search, never wider); anything else a regex rule
    with the same search semantics."""
    literal = regex.strip("^$").replace("\\.", ".").replace("\\-", "-").replace("\\+", "+")
    if not _REGEX_ONLY.search(literal):
        if literal.startswith("@"):
            return _entry(number, "*" + literal, side)
        try:
            return _entry(number, normalize_address(literal), side)
        except AddressError:
            pass
    try:
        re.compile(regex)
    except re.error as exc:
        return BadLine(number, f"bad regex: {exc}", regex)
    head = "" if regex.startswith("^") else ".*"
    tail = "" if regex.endswith("$") and not regex.endswith("\\$") else ".*"
    body = regex[1:] if head == "" else regex
    body = body[:-1] if tail == "" else body
    return _entry(number, f"re:{head}(?:{body}){tail}", side)


# --- postconfirm: whitelist, blacklist, confirmed (addresses) and whiteregex, blackregex -
# Whitespace-separated entries, lower-cased. Address files hold addresses; regex files hold
# regular expressions matched against the whole (lower-cased) address, as `re:` rules are.
# An entry that is a valid address is taken as one; anything else as such a regex.


def _postconfirm(number: int, raw: str) -> Iterator[Entry]:
    text = raw.strip().lower()
    if not text or text.startswith("#"):  # postconfirm has no comments; none are addresses
        return
    for token in text.split():
        try:
            yield Address(number, normalize_address(token))
            continue
        except AddressError:
            pass
        try:
            re.compile(token)
        except re.error as exc:
            yield BadLine(number, f"neither an address nor a regex: {exc}", token)
            continue
        yield _entry(number, f"re:{token}")


_PARSERS = {"plain": _plain, "tmda": _tmda, "ask": _ask, "postconfirm": _postconfirm}


def write_plain(addresses: Iterable[str], patterns: Iterable[str], header: str) -> Iterator[str]:
    """The plain format: `#` header lines, then one address, then one pattern, per line."""
    for line in header.splitlines():
        yield f"# {line}".rstrip()
    yield from addresses
    yield from patterns
