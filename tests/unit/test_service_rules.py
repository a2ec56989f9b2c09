"""Operators' rules on the in-memory service: every pattern kind, every action, the
precedence (a sender's own state, then exact, domain, wildcard, regex; a mailbox's rules
before the global ones; at one level the most severe action), recipients protected or
exempted by rule, and rules as events (history, audit, idempotent declarations)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sourceauth.adapters.storage.fold import MemoryTables
from sourceauth.adapters.storage.views import log_pages
from sourceauth.engine import projections as p
from sourceauth.engine.api import Decision
from sourceauth.engine.audit import check_events
from sourceauth.engine.errors import InvalidInput, NotFound
from sourceauth.engine.rules import (
    MAX_MATCHED_CHARS,
    RuleBook,
    RuleView,
    check_regex,
    parse_pattern,
)
from tests.support.service import Service
from tests.unit.conftest import ServiceFactory

BOB = "bob@example.test"
ALICE = "alice@example.test"


def decision(service: Service, sender: str, rcpt: str = BOB) -> tuple[Decision, str]:
    found = service.receive(sender, rcpt).decision_for(rcpt)
    return found.decision, found.reason


@pytest.mark.parametrize(
    ("pattern", "kind", "matching", "other"),
    [
        ("friend@partner.test", "exact", "friend@partner.test", "foe@partner.test"),
        ("*@partner.test", "domain", "anyone@partner.test", "anyone@sub.partner.test"),
        ("@partner.test", "domain", "anyone@partner.test", "anyone@partner.test.evil"),
        ("*@*.partner.test", "wildcard", "x@eu.partner.test", "x@partner.test"),
        ("news-??@partner.test", "wildcard", "news-42@partner.test", "news-420@partner.test"),
        (r"re:[a-z]+\.[a-z]+@partner\.test", "regex", "jo.do@partner.test", "jodo@partner.test"),
    ],
)
def test_an_allow_rule_of_every_kind_delivers_what_it_matches_and_nothing_else(
    service: Service, pattern: str, kind: str, matching: str, other: str
) -> None:
    rule = service.app.add_rule("allow", pattern, reason="partner")
    assert rule.kind == kind and rule.action == "allow" and rule.scope == "global"
    assert decision(service, matching) == (Decision.DELIVER, f"rule_allow:{rule.rule_id}")
    assert decision(service, other)[0] is Decision.CHALLENGE


def test_a_block_rule_holds_without_a_challenge_and_never_refuses(service: Service) -> None:
    rule = service.app.add_rule("block", "*@spam.test", reason="spam source")
    got, reason = decision(service, "x@spam.test")
    assert got is Decision.HOLD and reason == f"rule_block:{rule.rule_id}"
    service.app.dispatch_challenges()
    assert service.relay.sent == []  # no challenge, so no backscatter
    held = service.app.quarantine(sender="x@spam.test")
    assert [m.state for m in held] == ["held"] and held[0].reason == reason


def test_a_held_copy_of_a_blocked_pattern_is_released_when_the_sender_is_authorized(
    service: Service,
) -> None:
    service.app.add_rule("block", "*@spam.test")
    decision(service, "real@spam.test")
    service.app.authorize("real@spam.test")
    service.dispatch()
    assert service.held_states("real@spam.test") == ["delivered"]


def test_a_discard_rule_drops_the_copy_with_its_reason_and_maintenance_removes_it(
    service: Service,
) -> None:
    rule = service.app.add_rule("discard", "re:.*@junk[0-9]+\\.test")
    got, reason = decision(service, "a@junk7.test")
    assert got is Decision.DISCARD and reason == f"rule_discard:{rule.rule_id}"
    service.app.maintain()
    assert service.blobs.data == {}
    assert service.relay.sent == []


def test_a_senders_own_state_comes_before_every_rule(service: Service) -> None:
    service.app.add_rule("block", "*@partner.test")
    service.app.add_rule("allow", "*@spam.test")
    service.app.authorize("friend@partner.test")
    service.app.block("bad@spam.test")
    assert decision(service, "friend@partner.test") == (Decision.DELIVER, "sender_authorized")
    assert decision(service, "bad@spam.test") == (Decision.DISCARD, "sender_blocked")


def test_exact_beats_domain_beats_wildcard_beats_regex(service: Service) -> None:
    regex = service.app.add_rule("discard", "re:.*@.*\\.test")
    wildcard = service.app.add_rule("allow", "*@*partner.test")
    domain = service.app.add_rule("block", "*@partner.test")
    exact = service.app.add_rule("allow", "ceo@partner.test")
    assert decision(service, "ceo@partner.test")[1] == f"rule_allow:{exact.rule_id}"
    assert decision(service, "x@partner.test")[1] == f"rule_block:{domain.rule_id}"
    assert decision(service, "x@mypartner.test")[1] == f"rule_allow:{wildcard.rule_id}"
    assert decision(service, "x@other.test")[1] == f"rule_discard:{regex.rule_id}"


def test_at_one_level_the_most_severe_action_wins(service: Service) -> None:
    service.app.add_rule("allow", "*partner*")
    block = service.app.add_rule("block", "*@partner*")
    discard = service.app.add_rule("discard", "re:spam.*")
    service.app.add_rule("allow", "re:.*@partner\\.test")
    assert decision(service, "x@partner.test")[1] == f"rule_block:{block.rule_id}"
    assert decision(service, "spam@partner.test")[1] == f"rule_block:{block.rule_id}"
    assert decision(service, "spam@other.test")[1] == f"rule_discard:{discard.rule_id}"


def test_a_mailbox_rule_comes_before_the_global_rules_for_that_mailbox_only(
    service: Service,
) -> None:
    blocked = service.app.add_rule("block", "*@partner.test")
    allowed = service.app.add_rule("allow", "re:.*@partner\\.test", scope="Bob+x@example.test")
    assert allowed.scope == BOB
    assert decision(service, "x@partner.test", BOB)[1] == f"rule_allow:{allowed.rule_id}"
    assert decision(service, "x@partner.test", "bob+tag@example.test")[1] == (
        f"rule_allow:{allowed.rule_id}"
    )
    assert decision(service, "x@partner.test", ALICE)[1] == f"rule_block:{blocked.rule_id}"


def test_one_message_to_two_mailboxes_follows_each_mailboxs_rules(service: Service) -> None:
    allowed = service.app.add_rule("allow", "*@partner.test", scope=BOB)
    receipt = service.receive("x@partner.test", [BOB, ALICE])
    assert receipt.decision_for(BOB).reason == f"rule_allow:{allowed.rule_id}"
    assert receipt.decision_for(ALICE).decision is Decision.CHALLENGE


def test_exempt_and_protect_rules_override_the_protected_list(service: Service) -> None:
    exempt = service.app.add_rule("exempt", "lists@example.test")
    service.app.add_rule("protect", "*@other.test")
    assert decision(service, "x@remote.test", "lists@example.test") == (
        Decision.DELIVER,
        f"rule_exempt:{exempt.rule_id}",
    )
    assert decision(service, "x@remote.test", "ann@other.test")[0] is Decision.CHALLENGE
    assert decision(service, "x@remote.test", "ann@unlisted.test") == (
        Decision.DELIVER,
        "recipient_unprotected",
    )


def test_the_most_specific_recipient_rule_decides(service: Service) -> None:
    service.app.add_rule("exempt", "*@example.test")
    service.app.add_rule("protect", BOB)
    assert decision(service, "x@remote.test", BOB)[0] is Decision.CHALLENGE
    assert decision(service, "x@remote.test", ALICE)[0] is Decision.DELIVER


def test_recipient_rules_are_global(service: Service) -> None:
    with pytest.raises(InvalidInput, match="global"):
        service.app.add_rule("exempt", "lists@example.test", scope=BOB)


def test_removing_a_rule_restores_the_challenge_and_both_are_in_the_history(
    service: Service,
) -> None:
    rule = service.app.add_rule("allow", "*@partner.test", actor="ann", reason="contract")
    removed = service.app.remove_rule(rule.rule_id, actor="ben", reason="contract ended")
    assert removed.state == "removed" and removed.actor == "ben"
    assert decision(service, "x@partner.test")[0] is Decision.CHALLENGE
    assert service.app.rules() == []
    assert [r.state for r in service.app.rules(include_removed=True)] == ["removed"]
    history = service.app.history(rule.rule_id)
    assert [(h.event, h.from_state, h.to_state, h.actor, h.reason) for h in history] == [
        ("Rule.Added", "absent", "active", "ann", "contract"),
        ("Rule.Removed", "active", "removed", "ben", "contract ended"),
    ]
    again = service.app.add_rule("allow", "*@partner.test", reason="renewed")
    assert again.rule_id == rule.rule_id and again.state == "active"
    assert decision(service, "x@partner.test")[0] is Decision.DELIVER


def test_declaring_an_active_rule_again_records_nothing(service: Service) -> None:
    first = service.app.add_rule("block", "*@SPAM.test")
    position = service.app.recorder.max_notification_id()
    second = service.app.add_rule("block", "@spam.test")
    assert second == first
    assert service.app.recorder.max_notification_id() == position


def test_removing_twice_or_an_unknown_rule_is_refused(service: Service) -> None:
    rule = service.app.add_rule("block", "*@spam.test")
    service.app.remove_rule(rule.rule_id)
    with pytest.raises(InvalidInput, match="removed already"):
        service.app.remove_rule(rule.rule_id)
    with pytest.raises(NotFound):
        service.app.remove_rule("0" * 32)
    with pytest.raises(InvalidInput):
        service.app.remove_rule("not-an-id")


def test_rule_events_are_legal_and_the_view_equals_a_rebuild(service: Service) -> None:
    rule = service.app.add_rule("allow", "*@partner.test")
    service.app.remove_rule(rule.rule_id)
    service.app.add_rule("allow", "*@partner.test")
    service.app.add_rule("exempt", "lists@example.test")
    decision(service, "x@partner.test")
    app = service.app
    events = [
        (n.id, app.mapper.to_domain_event(n)) for page in log_pages(app.recorder, 100) for n in page
    ]
    assert check_events(events) is None
    memory = MemoryTables()
    projector = p.Projector(memory.current_challenge)
    for _, event in events:
        for op in projector.ops(event):
            memory.apply(op)
    live = app.views.dump()[p.RULES]  # type: ignore[attr-defined]
    rows = sorted(memory.rows(p.RULES))
    sealer = app.views.sealer  # type: ignore[attr-defined]
    if sealer is not None:  # SOURCEAUTH_TEST_SEALED_VIEWS: the view holds the rows sealed
        names = tuple(c for c, _ in p.TABLES[p.RULES])
        rows = [sealer.seal_row(p.RULES, names, r) for r in rows]
    assert rows == live and len(live) == 2


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("re:(a+)+@x", "repeat inside a repeat"),
        ("re:(ab|a)*@x", "alternation inside a repeat"),
        ("re:([a-z]+\\.)+example\\.test", "repeat inside a repeat"),
        ("re:(a)\\1", "back references"),
        ("re:(?=a)a", "look-arounds"),
        ("re:(?P<n>a)", "named groups"),
        ("re:" + "a" * 300, "longer than"),
        ("re:(", "bad regex"),
        ("re:", "needs a regular expression"),
        ("*", "every address"),
        ("*@*", "every address"),
        ("not an address", "bad"),
        ("*@", "bad domain"),
        ("", "empty"),
    ],
)
def test_unsafe_or_malformed_patterns_are_refused(pattern: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        parse_pattern(pattern)


def test_a_regex_only_ever_reads_an_address_long_at_most(service: Service) -> None:
    check_regex("a.*b.*c.*d")  # polynomial backtracking: bounded by the address length
    book = RuleBook([service.app.add_rule("block", "re:a.*b.*c.*d")])
    assert book.sender_rule("a" * 200 + "b@c.d", BOB) is not None
    assert MAX_MATCHED_CHARS == 254


def test_unknown_actions_and_bad_scopes_are_refused(service: Service) -> None:
    with pytest.raises(InvalidInput, match="unknown action"):
        service.app.add_rule("deliver", "*@x.test")
    with pytest.raises(InvalidInput, match="bad scope"):
        service.app.add_rule("allow", "*@x.test", scope="nobody")


# ------------------------------------------------------------------ properties of the parser


_REGEX_ALPHABET = st.sampled_from([*"ab.*+?|()[]{}^$\\-@1,", "a{2,}", "(?:", "\\d"])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_a_pattern_or_a_clear_refusal(text: str) -> None:
    try:
        found = parse_pattern(text)
    except InvalidInput as exc:
        assert str(exc)
        return
    assert found.kind in ("exact", "domain", "wildcard", "regex")


@settings(max_examples=300, deadline=None)
@given(st.lists(_REGEX_ALPHABET, min_size=1, max_size=14).map("".join))
def test_every_accepted_regex_rejects_a_hostile_address_quickly(regex: str) -> None:
    import time

    try:
        parse_pattern("re:" + regex)
    except InvalidInput:
        return
    book = RuleBook(
        [RuleView("0" * 32, "block", "re:" + regex, "global", "regex", "active", "", "", 0.0, 0.0)]
    )
    hostile = "a" * 120 + "@" + "a" * 120 + ".b"  # the longest run a regex could chew on
    started = time.perf_counter()
    book.sender_rule(hostile, BOB)
    assert time.perf_counter() - started < 0.5, regex


def test_the_quarantine_limit_follows_protect_and_exempt_rules(
    make_service: ServiceFactory,
) -> None:
    """The 452 pre-check at RCPT (`quarantine_full`) asks what routing asks: a mailbox a
    protect rule adds is capped like any protected one (before, it was never capped: a flood
    could fill it without end), and a mailbox an exempt rule takes out is never refused (before,
    copies held before the rule made its mail wait for ever behind 452s)."""
    service = make_service(held_per_recipient=2)
    service.app.add_rule("protect", "ann@other.test")
    for i in range(2):
        service.receive(f"s{i}@remote.test", ["ann@other.test", BOB])
    service.dispatch()  # the workers keep the views current; the check reads them
    assert service.app.quarantine_full("s9@remote.test", "ann@other.test")
    assert service.app.quarantine_full("s9@remote.test", BOB)
    service.app.add_rule("exempt", BOB)
    assert not service.app.quarantine_full("s9@remote.test", BOB)
    assert decision(service, "s9@remote.test", BOB)[0] is Decision.DELIVER


_ADDRESS_PART = st.lists(
    st.sampled_from([*"abn.-+1", "é", "ß", "news", "partner.test", "Ü"]), min_size=1, max_size=6
).map("".join)
_PATTERNS = st.sampled_from(
    [
        "*@*.partner.test",
        "news-*@*",
        "?b*@partner.test",
        "*é*@*",
        r"re:[a-z]+\.[a-z]+@partner\.test",
        "re:.*ß.*",
        r"re:news\d*@.*",
        "re:[^@]+@ü.*",
        "re:a.b@.*",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["allow", "block", "discard"]), _PATTERNS), max_size=6),
    st.tuples(_ADDRESS_PART, _ADDRESS_PART).map("@".join),
)
def test_the_compiled_levels_answer_as_each_rule_tried_alone(
    rules: list[tuple[str, str]], address: str
) -> None:
    """The book tries a level's alternation without groups first (docs/rules.md, "On the hot
    path"): it must find what trying every rule on its own, most severe first, finds."""
    import re

    import re2  # type: ignore[import-untyped]

    from sourceauth.engine.rules import SENDER_ACTIONS, compile_pattern

    views = []
    for n, (action, raw) in enumerate(rules):
        parsed = parse_pattern(raw)
        views.append(
            RuleView(
                f"{n:032x}", action, parsed.text, "global", parsed.kind, "active", "", "", 0, 0
            )
        )
    address = address.lower()
    expected = None
    for kind in ("wildcard", "regex"):
        level = sorted(
            (v for v in views if v.kind == kind),
            key=lambda v: (SENDER_ACTIONS.index(v.action), v.rule_id),
        )
        for view in level:
            source = compile_pattern(parse_pattern(view.pattern))
            if kind == "regex":
                hit = re2.compile("(?is)" + source).fullmatch(address)
            else:
                hit = re.compile(source, re.IGNORECASE | re.DOTALL).fullmatch(address)
            if hit is not None:
                expected = view
                break
        if expected is not None:
            break
    assert RuleBook(views).sender_rule(address, BOB) == expected


def test_a_remembered_plan_follows_every_rule_change_for_the_same_envelope(
    service: Service,
) -> None:
    """Routing plans are remembered per envelope (Context.plan): one sender writing to one
    recipient again and again must still see each rule change at its next message."""
    sender = "x@partner.test"
    assert decision(service, sender, ALICE)[0] is Decision.CHALLENGE
    exempt = service.app.add_rule("exempt", ALICE)
    assert decision(service, sender, ALICE) == (Decision.DELIVER, f"rule_exempt:{exempt.rule_id}")
    service.app.remove_rule(exempt.rule_id)
    assert decision(service, sender, ALICE)[0] is Decision.CHALLENGE


def test_a_remembered_plan_is_the_plan_and_follows_the_settings(service: Service) -> None:
    from dataclasses import replace

    from sourceauth.engine.api import Blob, Incoming
    from sourceauth.engine.service import rules as rulebook
    from sourceauth.engine.service.routing import plan

    ctx = service.app._ctx
    incoming = Incoming("<X@Partner.test>", ("Alice@example.test", BOB), Blob("k", 1, "s"))
    book = rulebook.book(ctx)
    first = ctx.plan(incoming, book)
    assert first == plan(incoming, ctx.settings, book)
    again = Incoming("<X@Partner.test>", ["Alice@example.test", BOB], Blob("k2", 1, "s"))  # type: ignore[arg-type]
    assert ctx.plan(again, book) is first  # a list of recipients is the same envelope
    service.app.settings = replace(ctx.settings, protected=("other.test",))
    unprotected = ctx.plan(incoming, book)
    assert unprotected == plan(incoming, ctx.settings, book) != first
    assert not any(t.protected for t in unprotected.targets)


def test_a_plan_made_under_older_settings_never_serves_newer_ones(service: Service) -> None:
    """A thread still planning with the settings it read before a reload fills only the
    cache of those settings (the race: it inserts after another thread started a new cache)."""
    from dataclasses import replace

    from sourceauth.engine.api import Blob, Incoming
    from sourceauth.engine.service import rules as rulebook

    ctx = service.app._ctx
    book = rulebook.book(ctx)
    incoming = Incoming("x@partner.test", (ALICE,), Blob("k", 1, "s"))
    stale = ctx.plan(incoming, book)
    older = ctx._plans  # what the slow thread read, settings and all
    service.app.settings = replace(ctx.settings, protected=("other.test",))
    fresh = ctx.plan(incoming, book)
    older[2][("x@partner.test", (ALICE,))] = stale  # the slow thread's late insert
    assert ctx.plan(incoming, book) is fresh
    assert stale.targets[0].protected and not fresh.targets[0].protected
