"""Issue 7: plain-text bounces from ordinary senders (GroupWise, "Delivery failure
notification", "non remis") were challenged: no report format, no daemon sender, no
Auto-Submitted. The SMTP adapter now runs flufl.bounce's detectors on mail that could draw a
challenge, off the commit path, and the engine applies `[exemptions] plain_bounce`.

Over real SMTP on loopback against the running filter (real aiosmtpd, SQLite file, sinks).
The three notices in tests/fixtures/plain_bounces/ are written for these tests in the shapes
flufl.bounce knows; their senders are ordinary addresses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.smtp_harness import filter_with_sinks, message
from tests.support.waiting import wait_outbound_idle, wait_until

PROTECTED = "bob@example.test"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "plain_bounces"
NOTICES = {  # file: (envelope sender, the failed address the detectors find)
    "groupwise.eml": ("jane.roe@county.test", "archive.desk@county.test"),
    "delivery-failure-notification.eml": (
        "servicedesk@harbourbank.test",
        "m.keller@harbourbank.test",
    ),
    "non-remis.eml": ("courrier.agence@societe.test", "c.durand@societe.test"),
}
PERSON = "carol@elsewhere.test"
# An ordinary message that talks about failed deliveries and returned mail.
ORDINARY = (
    "Hi Bob,\r\n\r\nthe courier says the delivery failed twice and the parcel was returned\r\n"
    "to the sender. Could you check the address? Mail to my old address\r\n"
    "carol@oldjob.test bounces now, use this one.\r\n\r\nThanks,\r\nCarol\r\n"
)


@pytest.mark.parametrize("notice", sorted(NOTICES))
def test_a_plain_text_bounce_from_an_ordinary_sender_is_held_not_challenged(
    tmp_path: Path, notice: str
) -> None:
    sender, failed = NOTICES[notice]
    with filter_with_sinks(tmp_path) as (flt, relay, _next_hop):
        flt.send(sender, [PROTECTED], (FIXTURES / notice).read_bytes())
        flt.send(PERSON, [PROTECTED], message(PERSON, PROTECTED, body=ORDINARY))
        relay.wait_for(1, timeout=20)  # the person is challenged
        wait_outbound_idle(flt.app)
        assert [c.rcpt_tos for c in relay.messages] == [[PERSON]]
        [held] = flt.app.quarantine(sender=sender)
        assert held.state == "held"
        assert held.reason == (
            f"never_challenge:plain_bounce: flufl.bounce: permanent failure for {failed}"
        )


def test_the_plain_bounce_action_is_configurable(tmp_path: Path) -> None:
    extra = '\n[exemptions]\nplain_bounce = "discard"\n'
    sender, _ = NOTICES["non-remis.eml"]
    with filter_with_sinks(tmp_path, extra=extra) as (flt, relay, next_hop):
        flt.send(sender, [PROTECTED], (FIXTURES / "non-remis.eml").read_bytes())
        wait_until(lambda: flt.app.quarantine(sender=sender), message="the decision recorded")
        wait_outbound_idle(flt.app)
        [copy] = flt.app.quarantine(sender=sender)
        assert copy.state == "discarded"
        assert copy.reason.startswith("never_challenge:plain_bounce: flufl.bounce:")
        assert relay.messages == [] and next_hop.messages == []


def test_a_notice_from_an_authorized_sender_is_delivered_and_not_scanned(
    tmp_path: Path,
) -> None:
    sender, _ = NOTICES["groupwise.eml"]
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.app.authorize(sender)
        flt.app.sender(sender)  # cached: the adapter knows, in memory, it cannot be challenged
        assert not flt.app.may_be_challenged(sender, [PROTECTED])
        assert flt.app.may_be_challenged(PERSON, [PROTECTED])
        flt.send(sender, [PROTECTED], (FIXTURES / "groupwise.eml").read_bytes())
        next_hop.wait_for(1, timeout=20)
        wait_outbound_idle(flt.app)
        assert relay.messages == []
