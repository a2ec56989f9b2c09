"""Issue 7: one internationalized domain, many spellings. Sender domains go through UTS 46
(the `idna` package, nontransitional): upper case, NFD, full-width letters, an ideographic
full stop and the Kelvin sign all name the one whitelisted sender. Over real SMTP (SMTPUTF8)
against the running filter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.smtp_harness import filter_with_sinks, message
from tests.support.waiting import wait_outbound_idle

PROTECTED = "bob@example.test"
FRIEND = "friend@k\u00f6ln-m\u00fcller.example"  # authorized in this spelling
SPELLINGS = [
    pytest.param("friend@K\u00d6LN-M\u00dcLLER.Example", id="upper-case"),
    pytest.param("friend@ko\u0308ln-mu\u0308ller.example", id="nfd"),
    pytest.param(
        "friend@\uff4b\u00f6\uff4c\uff4e-\uff4d\u00fc\uff4c\uff4c\uff45\uff52.example",
        id="full-width",
    ),
    pytest.param("friend@k\u00f6ln-m\u00fcller\u3002example", id="ideographic-full-stop"),
    pytest.param("friend@\u212a\u00f6ln-m\u00fcller.example", id="kelvin-sign"),
    pytest.param("friend@XN--KLN-MLLER-07A4E.example", id="a-label"),
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_uts46_spelling_of_a_whitelisted_domain_is_the_same_sender(
    tmp_path: Path, spelling: str
) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.app.authorize(FRIEND)
        flt.send_smtputf8(
            spelling, PROTECTED, message("x@remote.test", PROTECTED, subject="spelling")
        )
        delivered = next_hop.wait_for(1, timeout=20)
        wait_outbound_idle(flt.app)
        assert b"Subject: spelling" in delivered[0].data
        assert relay.messages == []  # not challenged: the authorized sender
