"""Issue 7, the engine's side, attacked as an attacker would: over real SMTP on loopback against
the running filter (real aiosmtpd, real SQLite file, real sinks for the relay and next hop).
Each test names the attack; docs/security.md ("Policy and caps") names the mechanism.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.smtp_harness import filter_with_sinks, message, token_of
from tests.support.waiting import wait_outbound_idle, wait_until

PROTECTED = "bob@example.test"
FRIEND = "friend@partner.test"
GATE = """
[auth_gate]
enabled = true
trusted_authserv_ids = ["mx.example.test"]
"""
FORGED_RESULTS = (
    "mx.example.test; spf=fail smtp.mailfrom=partner.test; dkim=fail header.d=partner.test"
)
GENUINE_RESULTS = "mx.example.test; spf=pass smtp.mailfrom=partner.test"


def _held_reasons(app: object, sender: str) -> list[str]:
    return [m.reason for m in app.quarantine(sender=sender) if m.state == "held"]  # type: ignore[attr-defined]


# ----------------------------------------------------------------- 1. forged whitelisted sender


def test_forged_whitelisted_sender_failing_spf_and_dkim_is_held_not_delivered(
    tmp_path: Path,
) -> None:
    with filter_with_sinks(tmp_path, extra=GATE) as (flt, relay, next_hop):
        flt.app.authorize(FRIEND)
        forged = message(
            FRIEND,
            PROTECTED,
            subject="wire the money",
            headers={"Authentication-Results": FORGED_RESULTS, "X-Spam-Flag": "YES"},
        )
        flt.send(FRIEND, [PROTECTED], forged)
        genuine = message(
            FRIEND, PROTECTED, subject="lunch", headers={"Authentication-Results": GENUINE_RESULTS}
        )
        flt.send(FRIEND, [PROTECTED], genuine)
        delivered = next_hop.wait_for(1, timeout=20)
        wait_outbound_idle(flt.app)
        assert [m.data.count(b"Subject: lunch") for m in next_hop.messages] == [1]
        assert b"wire the money" not in delivered[0].data
        reasons = _held_reasons(flt.app, FRIEND)
        assert len(reasons) == 1
        assert reasons[0].startswith("authorized_sender_auth_failed: no spf=pass or aligned")
        assert relay.messages == []  # held without a challenge: the real friend is authorized
        # Its authorization does not release it either: only an operator does.
        flt.app.maintain()
        assert len(_held_reasons(flt.app, FRIEND)) == 1


def test_forged_whitelisted_sender_action_is_configurable(tmp_path: Path) -> None:
    extra = GATE + 'authorized_fail_action = "discard"\n'
    with filter_with_sinks(tmp_path, extra=extra) as (flt, _relay, next_hop):
        flt.app.authorize(FRIEND)
        raw = message(FRIEND, PROTECTED, headers={"Authentication-Results": FORGED_RESULTS})
        flt.send(FRIEND, [PROTECTED], raw)
        wait_until(lambda: flt.app.quarantine(sender=FRIEND), message="the decision recorded")
        wait_outbound_idle(flt.app)
        [copy] = flt.app.quarantine(sender=FRIEND)
        assert copy.state == "discarded"
        assert copy.reason.startswith("authorized_sender_auth_failed:")
        assert next_hop.messages == []


def test_whitelisted_sender_without_failing_results_is_still_delivered(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path, extra=GATE) as (flt, _relay, next_hop):
        flt.app.authorize(FRIEND)
        # No trusted results, or only "none": no evidence of forgery.
        flt.send(FRIEND, [PROTECTED], message(FRIEND, PROTECTED, subject="a"))
        none = "mx.example.test; spf=none smtp.mailfrom=partner.test; dkim=none"
        raw = message(FRIEND, PROTECTED, subject="b", headers={"Authentication-Results": none})
        flt.send(FRIEND, [PROTECTED], raw)
        next_hop.wait_for(2, timeout=20)


def test_spam_flag_action_for_authorized_senders_is_configurable(tmp_path: Path) -> None:
    extra = '[exemptions]\nauthorized_spam = "hold"\n'
    with filter_with_sinks(tmp_path, extra=extra) as (flt, relay, next_hop):
        flt.app.authorize(FRIEND)
        flagged = message(FRIEND, PROTECTED, subject="spammy", headers={"X-Spam-Flag": "YES"})
        flt.send(FRIEND, [PROTECTED], flagged)
        flt.send(FRIEND, [PROTECTED], message(FRIEND, PROTECTED, subject="clean"))
        next_hop.wait_for(1, timeout=20)
        wait_outbound_idle(flt.app)
        assert len(next_hop.messages) == 1
        assert b"spammy" not in next_hop.messages[0].data
        assert [r.split(":")[0] for r in _held_reasons(flt.app, FRIEND)] == [
            "authorized_sender_spam"
        ]
        assert relay.messages == []


# ----------------------------------------------------------------- 3. caps against real senders


def _flood(flt: object, senders: list[str]) -> None:
    """One message from each sender to the protected mailbox, one SMTP session each."""
    for sender in senders:
        flt.send(sender, [PROTECTED], message(sender, PROTECTED))  # type: ignore[attr-defined]


def _challenged(relay: object) -> list[str]:
    return sorted(r for m in relay.messages for r in m.rcpt_tos)  # type: ignore[attr-defined]


def test_random_subdomains_share_the_cap_of_their_registered_domain(tmp_path: Path) -> None:
    extra = "[limits]\nchallenges_per_domain_per_hour = 3\n"
    with filter_with_sinks(tmp_path, extra=extra) as (flt, relay, _next_hop):
        _flood(flt, [f"u{index}@s{index}.evil.co.uk" for index in range(8)])
        wait_until(lambda: len(flt.app.quarantine()) == 8, message="eight held copies")
        wait_outbound_idle(flt.app)
        assert len(relay.messages) == 3
        reasons = sorted(m.reason for m in flt.app.quarantine())
        assert (
            reasons[-5:]
            == ["rate_limited: challenges_per_domain_per_hour limit 3 reached for evil.co.uk"] * 5
        )


def test_extensions_of_one_mailbox_draw_one_pending_challenge(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, _next_hop):
        _flood(flt, [f"victim+{index}@remote.test" for index in range(6)])
        wait_until(lambda: len(flt.app.quarantine()) == 6, message="six held copies")
        wait_outbound_idle(flt.app)
        assert _challenged(relay) == ["victim+0@remote.test"]
        waiting = [m.reason for m in flt.app.quarantine() if m.state == "held"]
        assert waiting == ["challenge_deferred: a challenge to this mailbox is pending"] * 5
        # Once that challenge is answered, maintenance challenges the next one, oldest first.
        token = token_of(relay.messages[0])
        confirm = f"confirm+{token}@example.test"
        flt.send("victim+0@remote.test", [confirm], message("victim+0@remote.test", confirm))
        wait_until(
            lambda: flt.app.sender("victim+0@remote.test").state == "authorized",
            message="the first sender confirmed",
        )
        report = flt.app.maintain()
        assert report.challenged_later == 1
        relay.wait_for(2, timeout=20)
        assert _challenged(relay) == ["victim+0@remote.test", "victim+1@remote.test"]


def test_one_message_to_many_mailboxes_draws_one_challenge_that_releases_them_all(
    tmp_path: Path,
) -> None:
    mailboxes = [f"user{index}@example.test" for index in range(8)]
    stranger = "forged@remote.test"
    with filter_with_sinks(tmp_path, extra='scope = "recipient"\n') as (flt, relay, next_hop):
        flt.send(stranger, mailboxes, message(stranger, ", ".join(mailboxes)))
        wait_until(lambda: len(flt.app.quarantine()) == 8, message="one copy per mailbox")
        wait_outbound_idle(flt.app)
        assert _challenged(relay) == [stranger]
        flt.app.maintain()  # nothing more to challenge while that one is pending
        wait_outbound_idle(flt.app)
        assert len(relay.messages) == 1
        token = token_of(relay.messages[0])
        confirm = f"confirm+{token}@example.test"
        flt.send(stranger, [confirm], message(stranger, confirm))
        delivered = wait_until(
            lambda: sorted(r for m in next_hop.messages for r in m.rcpt_tos) == mailboxes,
            timeout=30,
            message="every mailbox's copy delivered",
        )
        assert delivered
        scopes = {s.scope: s.state for s in flt.app.whitelist()}
        assert scopes == dict.fromkeys(mailboxes, "authorized")
        assert len(relay.messages) == 1


# ----------------------------------------------------------------- 4. quarantine limit


def test_a_flood_cannot_lock_a_mailbox_beyond_one_maintenance_pass(tmp_path: Path) -> None:
    extra = "[limits]\nheld_per_recipient = 10\n"
    with filter_with_sinks(tmp_path, extra=extra) as (flt, _relay, next_hop):
        _flood(flt, [f"forged{index}@flood.test" for index in range(10)])
        wait_outbound_idle(flt.app)  # the views caught up, as the filter's workers keep them
        flt.app.refresh_full_mailboxes()
        real = "real.person@remote.test"
        code, _ = flt.sendmail_reply(real, [PROTECTED], message(real, PROTECTED))
        assert code == 452  # full: the sending MTA keeps the mail and retries
        report = flt.app.maintain()
        assert report.evicted == 1  # down to the quota less a tenth, oldest first
        flt.app.catch_up()
        flt.app.refresh_full_mailboxes()
        code, _ = flt.sendmail_reply(real, [PROTECTED], message(real, PROTECTED))
        assert code == 250
        held = {m.sender: m.state for m in flt.app.quarantine()}
        assert held["forged0@flood.test"] == "expired"
        assert held[real] == "challenged"
        assert next_hop.messages == []


# ----------------------------------------------------------------- 6. what a challenge echoes


def test_challenge_echoes_no_link_or_address_from_the_original(tmp_path: Path) -> None:
    stranger = "victim@remote.test"
    subject = "Your account https://evil.test/x is locked, write to help@evil.test or www.evil.test"
    with filter_with_sinks(tmp_path) as (flt, relay, _next_hop):
        flt.send(stranger, [PROTECTED], message(stranger, PROTECTED, subject=subject))
        challenge = relay.wait_for(1, timeout=20)[0]
        text = challenge.data.decode("utf-8", "replace")
        assert "evil" not in text
        assert "[link removed]" in text


# ----------------------------------------------------------------- 7. verdicts and held mail


def test_mail_right_after_another_process_authorizes_the_sender_is_delivered(
    tmp_path: Path,
) -> None:
    from sourceauth.adapters.cli import engine_for

    stranger = "alice@remote.test"
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.send(stranger, [PROTECTED], message(stranger, PROTECTED, subject="first"))
        relay.wait_for(1, timeout=20)
        with engine_for(flt.cfg) as operator:  # what `sourceauth senders allow` does
            operator.authorize(stranger)
        flt.send(stranger, [PROTECTED], message(stranger, PROTECTED, subject="second"))
        # The 250 came after the decision was committed: it is in the log now.
        second = [m for m in flt.app.quarantine(sender=stranger) if m.subject == "second"]
        assert second == []  # decided deliver: never in the quarantine
        next_hop.wait_for(2, timeout=20)


def test_exempt_mail_held_from_a_sender_is_released_when_it_is_authorized(tmp_path: Path) -> None:
    stranger = "news@remote.test"
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        bulk = message(stranger, PROTECTED, subject="digest", headers={"Precedence": "bulk"})
        flt.send(stranger, [PROTECTED], bulk)
        wait_until(lambda: flt.app.quarantine(sender=stranger), message="the bulk copy held")
        assert relay.messages == []
        flt.app.authorize(stranger)
        delivered = next_hop.wait_for(1, timeout=20)
        assert b"Subject: digest" in delivered[0].data


# ----------------------------------------------------------------- 12. automated replies, NFC


def test_auto_reply_to_a_challenge_never_confirms(tmp_path: Path) -> None:
    stranger = "away@remote.test"
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.send(stranger, [PROTECTED], message(stranger, PROTECTED))
        confirm = f"confirm+{token_of(relay.wait_for(1, timeout=20)[0])}@example.test"
        for header in ({"Precedence": "auto_reply"}, {"X-Autoresponder": "vacation"}):
            raw = message(stranger, confirm, subject="Out of office", headers=header)
            flt.send(stranger, [confirm], raw)
        wait_until(
            lambda: len(flt.app.quarantine(sender=stranger)) == 3, message="both replies recorded"
        )
        reasons = sorted(m.reason for m in flt.app.quarantine(sender=stranger))
        assert [r.split(" (")[0] for r in reasons[1:]] == [
            "confirm_refused: automated reply never confirms"
        ] * 2
        assert flt.app.sender(stranger).state == "challenged"
        assert next_hop.messages == []


def test_nfd_and_nfc_spellings_of_a_sender_are_one_sender(tmp_path: Path) -> None:
    nfc, nfd = "j\u00f6rg@remote.test", "jo\u0308rg@remote.test"
    with filter_with_sinks(tmp_path) as (flt, _relay, next_hop):
        flt.app.authorize(nfc)
        flt.send_smtputf8(nfd, PROTECTED, message("x@remote.test", PROTECTED, subject="nfd"))
        delivered = next_hop.wait_for(1, timeout=20)
        assert b"Subject: nfd" in delivered[0].data
