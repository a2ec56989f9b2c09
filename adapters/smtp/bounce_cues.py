"""What flufl.bounce's detectors start from, tested cheaply: mail that shows none of their cues
draws nothing from any of them, so plain_bounce (dsn.py) need not run them (~1.7 ms a message).

Every detector of flufl.bounce 6 first needs a cue before it reads an address: a header (a
delivery-status part, X-Failed-Recipients, a daemon From at Sina, Yahoo or Yale, an AOL From, a
GroupWise or SMTP32 X-Mailer, a Postfix "notification" part) or a phrase on a body line (the
start patterns of SimpleMatch and SimpleWarning, Qmail's intro lines, Exchange's, Caiwireless',
Microsoft's and Netscape's tags, LLNL's ", address," line). The header cues are the detectors'
own tests; each phrase is reduced to its longest run of literal characters (read from the
detector's compiled pattern), looked for in the lower-cased body text the detectors read. A
necessary test, never a sufficient one: when it passes, the detectors decide as before.
"""

from __future__ import annotations

import importlib
import re
from email.message import Message
from email.utils import getaddresses, parseaddr
from typing import Any

from flufl.bounce._detectors import (
    caiwireless,
    exchange,
    microsoft,
    netscape,
    postfix,
    qmail,
    simplematch,
    simplewarning,
)
from flufl.bounce._scan import _DETECTORS

# The regular-expression parser behind re.compile (re._parser since Python 3.11).
_sre_parse: Any = importlib.import_module("re._parser")

__all__ = ["KNOWN_DETECTORS", "PHRASE_KEYS", "literal_key", "may_be_bounce"]

# The detectors whose cues are tested here, by class name; a flufl.bounce that adds one makes
# may_be_bounce pass every message (and tests/unit/test_bounce_cues.py fail) until it is added.
KNOWN_DETECTORS = frozenset(
    {
        "DSN", "Exim", "Sina", "Yahoo", "Yale", "SMTP32", "Postfix", "Qmail", "GroupWise",
        "Microsoft", "Caiwireless", "Exchange", "Netscape", "AOL", "SimpleMatch",
        "SimpleWarning", "LLNL",
    }
)  # fmt: skip
_ALL_KNOWN = {d.__name__ for d in _DETECTORS} <= KNOWN_DETECTORS

# Characters Python's case-insensitive matching takes for an ASCII letter whose str.lower() is
# not that letter (re's own equivalence table); folded before the body text is lower-cased.
_ASCII_TWINS = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
# LLNL's `,\s*(?P<addr>\S+@[^,]+),` on one line, loosened: a comma, later an @, later a comma.
_LLNL_LINE = re.compile(r",[^,\n]*@[^,\n]*,")
_GROUPWISE_MAILERS = ("nov", "ntm", "int")


def literal_key(pattern: re.Pattern[Any]) -> str:
    """The longest run of literal characters every match of `pattern` contains, lower-cased
    ("" when it has none of 4 or more: then the pattern is taken to match anything)."""
    source = pattern.pattern
    if isinstance(source, bytes):
        source = source.decode("latin-1")
    best = ""
    run: list[str] = []
    for op, value in _sre_parse.parse(source, pattern.flags & ~re.UNICODE):
        if op is _sre_parse.LITERAL:  # a repeated or optional character is a REPEAT item
            run.append(chr(value))
            continue
        if len(run) > len(best):
            best = "".join(run)
        run = []
    if len(run) > len(best):
        best = "".join(run)
    return best.lower() if len(best) >= 4 else ""


def _start_patterns() -> list[re.Pattern[str]]:
    """The patterns a line must match before a line-reading detector (SimpleMatch,
    SimpleWarning, Qmail, Caiwireless, Exchange) takes the lines after it for addresses,
    each compiled to search the whole text (^ and $ at every line)."""
    starts: list[re.Pattern[str]] = [p[0] for p in simplematch.PATTERNS]
    starts += [p[0] for p in simplewarning.PATTERNS]
    starts += [caiwireless.tcre, exchange.scre]
    found = [re.compile(p.pattern, p.flags | re.MULTILINE) for p in starts]
    # Qmail: line.strip().startswith(tag)
    found += [re.compile(r"^\s*" + re.escape(tag), re.MULTILINE) for tag in qmail.introtags]
    return found


# (lower-cased literal key, pattern): the cheap `key in text` first, the pattern only then.
_PHRASES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (literal_key(p), p) for p in _start_patterns()
)
PHRASE_KEYS: tuple[str, ...] = tuple(sorted({key for key, _ in _PHRASES}))
_MATCHES_ANYTHING = "" in PHRASE_KEYS


def _anchors(keys: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """A few words that between them occur in every key, each with the phrases whose key holds
    it (greedy cover, longest word first among equals): a text holding none of the words
    holds no key, found with a handful of `in` tests instead of one per key."""
    words = {w for key in keys for w in re.findall(r"[a-z]{4,}", key)}
    left = set(range(len(_PHRASES)))
    chosen: dict[str, tuple[int, ...]] = {}
    while left:
        if not words:
            return {"": tuple(sorted(left))}  # a key with no word: always looked for
        best = max(sorted(words), key=lambda w: (sum(w in _PHRASES[i][0] for i in left), len(w)))
        covered = tuple(i for i in sorted(left) if best in _PHRASES[i][0])
        if not covered:
            return {**chosen, "": tuple(sorted(left))}
        chosen[best] = covered
        left -= set(covered)
        words.discard(best)
    return chosen


_ANCHORS = _anchors(PHRASE_KEYS)
_MICROSOFT_KEY = literal_key(microsoft.scre).encode("latin-1")
_NETSCAPE_KEY = literal_key(netscape.pcre).encode("latin-1")


def may_be_bounce(msg: Message) -> bool:
    """False only when no flufl.bounce detector can report a failure for `msg` (as parsed and
    prepared for them by dsn.plain_bounce). Never raises: on anything odd it says True."""
    if not _ALL_KNOWN or _MATCHES_ANYTHING:
        return True
    try:
        return _header_cue(msg) or _body_cue(msg)
    except Exception:
        return True  # the detectors meet the same oddity and decide (or raise) as before


def _header_cue(msg: Message) -> bool:
    """The detectors' own first tests on the headers and the MIME structure."""
    ctype = msg.get_content_type()
    if "x-failed-recipients" in msg:  # Exim
        return True
    sender = msg.get("from", "")
    low = sender.lower()
    # The address parsers drop only comments from the text they read: without "(" an address
    # "mailer-daemon@…" or "…@aol.com" has those words in the header itself.
    if "(" in low or "daemon" in low or "aol" in low:
        if low == "mailer-daemon@sina.com":  # Sina
            return True
        address = parseaddr(sender)[1].lower()  # as parseaddr(sender.lower())[1]
        if address.startswith("mailer-daemon@"):  # Yahoo
            return True
        if ctype == "text/plain" and address.endswith("@aol.com"):  # AOL
            return True
        if not msg.is_multipart():  # Yale reads single-part mail only, with its own parse
            found = getaddresses([sender])
            if found and found[0][1].lower().startswith("mailer-daemon@"):
                return True
    mailer = msg.get("x-mailer", "")
    if mailer.startswith("<SMTP32 v"):  # SMTP32
        return True
    if ctype == "multipart/mixed" and mailer and mailer[:3].lower() in _GROUPWISE_MAILERS:
        return True  # GroupWise
    parts = list(msg.walk())
    for part in parts:
        part_type = part.get_content_type()
        if part_type == "message/delivery-status":  # DSN
            return True
        if (
            ctype in postfix.REPORT_TYPES
            and part_type == "text/plain"
            and part.get("content-description", "").lower() == "notification"
        ):  # Postfix
            return True
    if msg.is_multipart():
        payload: list[Message] = msg.get_payload()  # type: ignore[assignment]
        if ctype == "multipart/mixed" and payload and not payload[0].is_multipart():
            data = payload[0].get_payload(decode=True)  # Microsoft's first part
            if isinstance(data, bytes) and _MICROSOFT_KEY in data.lower():
                return True
        leaves = [p for p in parts if not p.is_multipart()]
        for leaf in leaves[:-1]:  # Netscape's first text/plain leaf but the last
            if leaf.get_content_type() == "text/plain":
                data = leaf.get_payload(decode=True)
                if isinstance(data, bytes) and _NETSCAPE_KEY in data.lower():
                    return True
                break
    return False


def _body_cue(msg: Message) -> bool:
    """A phrase the line-reading detectors start from, in the text they read
    (email.iterators.body_line_iterator: every part's payload, undecoded)."""
    texts = [p.get_payload() for p in msg.walk()]
    text = "\n".join(t for t in texts if isinstance(t, str))
    if _LLNL_LINE.search(text):  # LLNL
        return True
    folded = (text if text.isascii() else text.translate(_ASCII_TWINS)).lower()
    for anchor, phrases in _ANCHORS.items():
        if anchor in folded:
            for index in phrases:
                key, pattern = _PHRASES[index]
                if key in folded and pattern.search(text):
                    return True
    return False
