"""The EHLO extensions over a real SMTP session on loopback. XFORWARD: advertised to the
trusted MTA, the original client's address and HELO recorded on the message's creation event.
PIPELINING (RFC 2920): advertised, and a client that sends MAIL, RCPT and DATA in one write
gets one reply per command, in order, with the message recorded once (Postfix's smtp client,
the content_filter transport, then saves two round trips per message)."""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.adapters.smtp import xforward
from tests.integration.smtp_harness import RunningFilter, message, write_config

BOB = "bob@example.test"
ALICE = "alice@remote.test"


@pytest.fixture
def flt(tmp_path: Path) -> Any:
    running = RunningFilter(
        load_config(
            write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
        )
    )
    yield running
    running.stop()


def _recorded_client(flt: Any, ehlo: str, *xforward_args: str) -> tuple[str, str]:
    """Send one held message after EHLO and these XFORWARD commands; the client its creation
    event recorded."""
    with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
        client.ehlo(ehlo)
        assert client.has_extn("xforward")
        for arg in xforward_args:
            assert client.docmd("XFORWARD", arg)[0] == 250
        client.sendmail(ALICE, [BOB], message(ALICE, BOB))
    held = flt.app.quarantine()
    assert len(held) == 1
    fields = flt.app.history(held[0].id)[0].fields
    return fields["client_address"], fields["client_helo"]


def test_the_original_client_from_xforward_is_recorded_on_the_message(flt: Any) -> None:
    assert _recorded_client(
        flt,
        "postfix.example.test",
        "NAME=mail.client.test ADDR=IPV6:2001:db8::7 PROTO=ESMTP",
        "HELO=client+2Etest SOURCE=REMOTE IDENT=[UNAVAILABLE]",
    ) == ("2001:db8::7", "client.test")


def test_without_xforward_the_peer_and_its_ehlo_name_are_recorded(flt: Any) -> None:
    assert _recorded_client(flt, "direct.client.test") == ("127.0.0.1", "direct.client.test")


def test_xforward_is_refused_inside_a_transaction_and_when_malformed(flt: Any) -> None:
    with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
        client.ehlo("postfix.example.test")
        assert client.docmd("XFORWARD", "")[0] == 501
        assert client.docmd("XFORWARD", "COLOUR=blue")[0] == 501
        assert client.docmd("XFORWARD", "ADDR=192.0.2.1\x7f")[0] == 501
        assert client.mail(ALICE)[0] == 250
        assert client.docmd("XFORWARD", "ADDR=192.0.2.1")[0] == 503


def _session(peer: tuple[str, int]) -> Any:
    return SimpleNamespace(peer=peer, host_name=None)


def test_xforward_is_advertised_only_to_loopback_and_the_configured_networks() -> None:
    trusted = xforward.networks(["192.0.2.0/24"])
    responses = ["250-mx.example.test", "250-8BITMIME", "250 HELP"]
    for peer, advertised in (
        (("127.0.0.1", 1025), True),
        (("::1", 1025, 0, 0), True),
        (("::ffff:192.0.2.9", 1025, 0, 0), True),
        (("192.0.2.200", 1025), True),
        (("198.51.100.1", 1025), False),
    ):
        lines = xforward.ehlo(_session(peer), "client.test", list(responses), trusted)  # type: ignore[arg-type]
        assert (xforward.EHLO_LINE in lines) is advertised, peer
        assert lines[-1] == "250 HELP"
    assert not xforward.peer_trusted(_session(("198.51.100.1", 25)), xforward.networks([]))  # type: ignore[arg-type]


def test_a_bad_xforward_network_in_the_configuration_names_the_key(tmp_path: Path) -> None:
    from sourceauth.adapters.config import ConfigError

    path = write_config(
        tmp_path,
        relay="smtp://127.0.0.1:9",
        next_hop="smtp://127.0.0.1:9",
        extra='[xforward]\nnetworks = ["192.0.2.0/99"]\n',
    )
    with pytest.raises(ConfigError, match="xforward"):
        load_config(path)


class Client:
    """A raw SMTP client that writes commands in one packet and reads whole replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""

    def reply(self) -> tuple[int, list[str]]:
        """One (possibly multi-line) reply: its code and its lines' texts."""
        lines: list[str] = []
        for _ in range(100):
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            text = line.decode()
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines
        raise AssertionError("reply of more than 100 lines")

    def write(self, *commands: str) -> None:
        self.sock.sendall("".join(f"{c}\r\n" for c in commands).encode())

    def close(self) -> None:
        self.sock.close()


def _greeted(flt: Any) -> Client:
    client = Client(flt.port)
    assert client.reply()[0] == 220
    client.write("EHLO postfix.example.test")
    code, lines = client.reply()
    assert code == 250
    assert "PIPELINING" in lines
    return client


def test_pipelined_mail_rcpt_data_get_their_replies_in_order_and_one_copy_is_held(
    flt: Any,
) -> None:
    client = _greeted(flt)
    try:
        client.write(f"MAIL FROM:<{ALICE}>", f"RCPT TO:<{BOB}>", "RCPT TO:<no at all>", "DATA")
        assert [client.reply()[0] for _ in range(4)] == [250, 250, 501, 354]
        body = message(ALICE, BOB)
        client.sock.sendall(body + b"\r\n.\r\n")
        code, lines = client.reply()
        assert code == 250 and "queued as" in lines[0]
        # a second transaction on the same connection, pipelined after RSET
        client.write("RSET", f"MAIL FROM:<{ALICE}>", f"RCPT TO:<{BOB}>", "DATA")
        assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        client.sock.sendall(body + b"\r\n.\r\n")
        assert client.reply()[0] == 250
        client.write("QUIT")
        assert client.reply()[0] == 221
    finally:
        client.close()
    held = flt.app.quarantine()
    assert len(held) == 2
    assert all(list(h.recipients) == [BOB] for h in held)


def test_a_refused_sender_fails_the_rest_of_its_pipelined_group(flt: Any) -> None:
    client = _greeted(flt)
    try:
        client.write("MAIL FROM:<bad address>", f"RCPT TO:<{BOB}>", "DATA", "NOOP")
        codes = [client.reply()[0] for _ in range(4)]
        assert codes[0] == 501
        assert codes[1] == 503 and codes[2] == 503  # no transaction: nothing to take
        assert codes[3] == 250  # the session goes on
    finally:
        client.close()
    assert flt.app.quarantine() == []
