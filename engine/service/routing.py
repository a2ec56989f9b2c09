"""Routing, pure: an accepted message and the state of its senders -> one typed route per
recipient. No I/O and no events: receive.py loads the state and records what routes say.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sourceauth.engine.addresses import (
    domain_of,
    is_null_sender,
    normalize_address,
    split_extension,
)
from sourceauth.engine.api import Headers, Incoming
from sourceauth.engine.policy import (
    Classification,
    ExemptAction,
    check_authorized_sender,
    classify,
    is_protected,
    spam_flag,
)
from sourceauth.engine.recipient_policy import RecipientPolicy
from sourceauth.engine.rules import EMPTY_BOOK, RuleBook, RuleView
from sourceauth.engine.settings import EngineSettings
from sourceauth.engine.statemachine import SENDER

AUTHORIZED = SENDER.dest("authorize")
BLOCKED = SENDER.dest("block")


@dataclass(frozen=True, slots=True)
class DeliverNow:
    """Queued for the next hop at once."""

    reason: str


@dataclass(frozen=True, slots=True)
class Discard:
    """Recorded and dropped."""

    reason: str


@dataclass(frozen=True, slots=True)
class HoldSilently:
    """Held without a challenge (a never-challenge class whose action is hold). With a scope,
    the copy is linked to that scope's sender, so authorizing the sender releases it."""

    reason: str
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class AwaitSender:
    """Held until the sender of this scope is authorized: challenge it, or it already is."""

    scope: str


@dataclass(frozen=True, slots=True)
class ChallengeReply:
    """Addressed to the confirm address: a reply to a challenge (token from the extension)."""

    token: str | None


@dataclass(frozen=True, slots=True)
class ChallengeReport:
    """Addressed to the bounce address: a delivery report about a challenge."""

    token: str | None


Route = DeliverNow | Discard | HoldSilently | AwaitSender


Answer = ChallengeReply | ChallengeReport


class Target(NamedTuple):
    recipient: str
    answer: Answer | None  # set when addressed to the confirm or the bounce address
    scope: str | None  # the whitelist scope when the recipient is protected and has a sender
    protected: bool
    policy: RecipientPolicy  # the recipient's policy (the global one when unprotected)
    rule: RuleView | None = None  # the protect or exempt rule that decided `protected`


class Plan(NamedTuple):
    """The normalized envelope: what routing needs and which senders to load for it."""

    sender: str  # "" for the null sender
    recipients: tuple[str, ...]  # deduplicated, in envelope order
    targets: tuple[Target, ...]
    scopes: tuple[str, ...]  # the whitelist scopes whose sender routing needs
    answers: tuple[tuple[str, Answer], ...]  # see `answers` below


# Routes most mail takes, made once (the hot path builds no route object for them).
UNPROTECTED = DeliverNow("recipient_unprotected")
SENDER_AUTHORIZED = DeliverNow("sender_authorized")
SENDER_BLOCKED = Discard("sender_blocked")
_AUTHORIZED_PREFIX = "sender_authorized; "  # an authorized sender's re-check that delivers


@functools.lru_cache(maxsize=8)
def _answer_bases(confirm_address: str, bounce_address: str) -> tuple[str, str]:
    return normalize_address(confirm_address), normalize_address(bounce_address)


def scope_for(recipient: str, settings: EngineSettings) -> str:
    if settings.policies.for_recipient(recipient).scope == "global":
        return "global"
    base, _ = split_extension(recipient, settings.recipient_delimiter)
    return base


def plan(incoming: Incoming, settings: EngineSettings, rules: RuleBook = EMPTY_BOOK) -> Plan:
    """Normalize the envelope. `answers` are the replies and reports to challenges: settled
    before anything else, so that a "reply all" confirms first and its other recipients see
    the sender authorized. A recipient rule (protect, exempt) overrides `protected`."""
    return plan_envelope(incoming.mail_from, incoming.recipients, settings, rules)


def protected_by(rule: RuleView | None, rcpt: str, settings: EngineSettings) -> bool:
    """Whether mail to `rcpt` (normalized) is held for unknown senders: its protect or exempt
    rule decides (`rule`, what the RuleBook has for it), else `[policy] protected`."""
    if rule is not None:
        return rule.action == "protect"
    return is_protected(rcpt, settings.protected, settings.recipient_delimiter)


def plan_envelope(
    mail_from: str,
    envelope_recipients: Sequence[str],
    settings: EngineSettings,
    rules: RuleBook = EMPTY_BOOK,
) -> Plan:
    """`plan` from the envelope alone. Raises AddressError for an invalid address."""
    s = settings
    sender = "" if is_null_sender(mail_from) else normalize_address(mail_from)
    # A recipient named twice (in any case) gets one copy.
    recipients = tuple(dict.fromkeys(normalize_address(r) for r in envelope_recipients))
    confirm_base, bounce_base = _answer_bases(s.confirm_address, s.bounce_address)
    policies = s.policies
    targets = []
    scopes: dict[str, None] = {}
    answers: list[tuple[str, Answer]] = []
    for rcpt in recipients:
        base, token = split_extension(rcpt, s.recipient_delimiter)
        answer: Answer | None = None
        if base == confirm_base:
            answer = ChallengeReply(token)
            answers.append((rcpt, answer))
        elif base == bounce_base:
            answer = ChallengeReport(token)
            answers.append((rcpt, answer))
        rule = rules.recipient_rule(rcpt, s.recipient_delimiter) if answer is None else None
        protected = answer is None and protected_by(rule, rcpt, s)
        scope = None
        policy = policies.default
        if protected:
            policy = policies.for_recipient(rcpt)
            if sender:
                scope = "global" if policy.scope == "global" else base
                scopes[scope] = None
        targets.append(Target(rcpt, answer, scope, protected, policy, rule))
    return Plan(sender, recipients, tuple(targets), tuple(scopes), tuple(answers))


def route(
    plan: Plan,
    incoming: Incoming,
    settings: EngineSettings,
    sender_states: Mapping[str, str],
    rules: RuleBook = EMPTY_BOOK,
) -> list[tuple[str, Route]]:
    """One route per recipient that is not an answer (see `plan`), in envelope order.
    `sender_states` maps each scope of `plan.scopes` to its sender's state (the initial
    state for a stranger), read after the answers were settled. Precedence: the sender's
    own state (authorized, blocked), then the sender rules (docs/rules.md), then the
    never-challenge classes, then a challenge."""
    s = settings
    routes: list[tuple[str, Route]] = []
    exemption: Classification | None = None
    exemption_checked = False
    authorized: dict[RecipientPolicy, Route] = {}  # one check per distinct policy
    for t in plan.targets:
        if t.answer is not None:
            continue
        if not t.protected:
            exempt_rule = t.rule
            if exempt_rule is None:
                routes.append((t.recipient, UNPROTECTED))
            else:
                routes.append((t.recipient, DeliverNow(f"rule_exempt:{exempt_rule.rule_id}")))
            continue
        if t.scope is not None:
            state = sender_states[t.scope]
            if state == BLOCKED:
                routes.append((t.recipient, SENDER_BLOCKED))
                continue
            if state == AUTHORIZED:
                found = authorized.get(t.policy)
                if found is None:
                    found = authorized[t.policy] = _authorized(
                        plan.sender, incoming.headers, s, t.policy
                    )
                routes.append((t.recipient, found))
                continue
        if rules.has_sender_rules and plan.sender:
            ruled = _ruled(plan.sender, t, incoming.headers, s, rules)
            if ruled is not None:
                routes.append((t.recipient, ruled))
                continue
        if not exemption_checked:  # only for mail that would otherwise be challenged
            exemption = classify(
                incoming.mail_from,
                incoming.headers,
                spam_headers=s.spam_headers,
                bounce_like=incoming.bounce_like,
            )
            exemption_checked = True
        exempt = None
        if exemption is not None:
            exempt = _act(
                t.policy.exemptions.get(exemption.exemption, ExemptAction.HOLD),
                f"never_challenge:{exemption.exemption.value}: {exemption.detail}",
            )
        if isinstance(exempt, HoldSilently) and t.scope is not None:
            routes.append((t.recipient, HoldSilently(exempt.reason, t.scope)))
            continue
        if exempt is not None:
            routes.append((t.recipient, exempt))
            continue
        assert t.scope is not None  # only the null sender has no scope, and it is exempt
        routes.append((t.recipient, AwaitSender(t.scope)))
    return routes


def _ruled(
    sender: str, t: Target, headers: Headers, s: EngineSettings, rules: RuleBook
) -> Route | None:
    """The route a sender rule gives (the mailbox's own rules before the global ones). Never
    a refusal: a block holds without a challenge (linked to the sender, so authorizing it
    releases the copy), a discard drops the copy; both recorded with the rule's id."""
    mailbox, _ = split_extension(t.recipient, s.recipient_delimiter)
    rule = rules.sender_rule(sender, mailbox, s.recipient_delimiter)
    if rule is None:
        return None
    if rule.action == "allow":
        return _authorized(sender, headers, s, t.policy, DeliverNow(f"rule_allow:{rule.rule_id}"))
    if rule.action == "block":
        return HoldSilently(f"rule_block:{rule.rule_id}", t.scope)
    return Discard(f"rule_discard:{rule.rule_id}")


def _authorized(
    sender: str,
    headers: Headers,
    s: EngineSettings,
    p: RecipientPolicy,
    allowed: Route = SENDER_AUTHORIZED,
) -> Route:
    """An authorized sender's mail, re-checked: the whitelist is keyed on the envelope sender,
    which anyone can forge. Held copies are not linked to the sender (its authorization
    would release them at once); an operator releases them."""
    gate = p.auth_gate
    if gate.enabled:
        forged = check_authorized_sender(gate, domain_of(sender), headers)
        if forged is not None:
            return _act(
                gate.authorized_fail_action,
                f"authorized_sender_auth_failed: {forged}",
                _AUTHORIZED_PREFIX,
            )
    if s.authorized_spam != ExemptAction.DELIVER:
        flagged = spam_flag(headers, s.spam_headers)
        if flagged is not None:
            return _act(
                s.authorized_spam, f"authorized_sender_spam: {flagged.detail}", _AUTHORIZED_PREFIX
            )
    return allowed


def _act(action: ExemptAction, reason: str, deliver_prefix: str = "") -> Route:
    """The route an exemption action gives; a delivery's reason gets `deliver_prefix`."""
    if action == ExemptAction.DELIVER:
        return DeliverNow(deliver_prefix + reason)
    if action == ExemptAction.DISCARD:
        return Discard(reason)
    return HoldSilently(reason)
