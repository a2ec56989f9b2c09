"""XFORWARD over a real SMTP session on loopback: advertised to the trusted MTA, the original
client's address and HELO recorded on the message's creation event."""

from __future__ import annotations

import smtplib
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
