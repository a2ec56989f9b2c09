"""XFORWARD (Postfix's SMTP extension): the MTA in front of the filter tells it the original
client's address and HELO name, which the filter records on the message's creation event.

Advertised in EHLO, and accepted, only from trusted peers: loopback, or [xforward] networks.
https://www.postfix.org/XFORWARD_README.html
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from aiosmtpd.smtp import SMTP, Session

ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
EHLO_LINE = "250-XFORWARD " + " ".join(ATTRIBUTES)
UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
MAX_VALUE = 255
_XTEXT = re.compile(r"\+([0-9A-F]{2})")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """The trusted networks: loopback always, and those given ("192.0.2.0/24", "2001:db8::/32")."""
    given = [ipaddress.ip_network(t, strict=False) for t in texts]
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"), *given)


def peer_trusted(session: Session, trusted: tuple[Network, ...]) -> bool:
    peer = session.peer
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in trusted)


def parse(arg: str | None) -> dict[str, str]:
    """`NAME=value ...` into attributes; ValueError on anything else. Values are xtext
    (RFC 3461); "[UNAVAILABLE]" and "[TEMPUNAVAIL]" become ""; "IPV6:" is dropped from ADDR."""
    found: dict[str, str] = {}
    words = (arg or "").split()
    if not words:
        raise ValueError("no attribute")
    for word in words:
        name, eq, value = word.partition("=")
        name = name.upper()
        if not eq or name not in ATTRIBUTES:
            raise ValueError(f"bad attribute {word[:40]!r}")
        value = _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)
        if len(value) > MAX_VALUE or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"bad value for {name}")
        if value.upper() in UNAVAILABLE:
            value = ""
        if name == "ADDR" and value.upper().startswith("IPV6:"):
            value = value[5:]
        found[name] = value
    return found


def client_of(session: Session) -> tuple[str, str]:
    """The original client's (address, HELO name): XFORWARD's when the MTA sent them, else
    this connection's peer and its own EHLO name (the filter reached directly)."""
    forwarded: dict[str, str] = getattr(session, "xforward", {})
    peer = session.peer
    address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
    return (
        forwarded.get("ADDR", address) if "ADDR" in forwarded else address,
        forwarded["HELO"] if "HELO" in forwarded else str(session.host_name or ""),
    )


def forget(session: Session) -> None:
    """The attributes last for one mail transaction (Postfix sends them before each MAIL)."""
    if hasattr(session, "xforward"):
        session.xforward = {}


def enable(server: SMTP, trusted: tuple[Network, ...]) -> SMTP:
    """Give one aiosmtpd SMTP instance the XFORWARD command (aiosmtpd has no hook for new
    commands; its dispatch table is built per instance)."""

    async def smtp_XFORWARD(arg: str) -> None:
        session: Any = server.session
        envelope = server.envelope
        if session is None or not peer_trusted(session, trusted):
            await server.push("550 5.7.0 Error: insufficient authorization")
            return
        if envelope is not None and envelope.mail_from is not None:
            await server.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        try:
            attributes = parse(arg)
        except ValueError as exc:
            await server.push(f"501 5.5.4 Syntax: XFORWARD attribute=value... ({exc})")
            return
        current = getattr(session, "xforward", None) or {}
        current.update(attributes)
        session.xforward = current
        await server.push("250 2.0.0 Ok")

    server._smtp_methods["XFORWARD"] = smtp_XFORWARD
    return server


def ehlo(
    session: Session, hostname: str, responses: list[str], trusted: tuple[Network, ...]
) -> list[str]:
    """The EHLO reply, with XFORWARD advertised to a trusted peer (before the final line)."""
    session.host_name = hostname
    forget(session)
    if peer_trusted(session, trusted) and responses:
        return [*responses[:-1], EHLO_LINE, responses[-1]]
    return responses
