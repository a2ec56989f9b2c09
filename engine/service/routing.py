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
    ExemptAction,
    check_authorized_sender,
    classify,
    is_protected,
    spam_flag,
)
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


@functools.lru_cache(maxsize=8)
def _answer_bases(confirm_address: str, bounce_address: str) -> tuple[str, str]:
    return normalize_address(confirm_address), normalize_address(bounce_address)


def scope_for(recipient: str, settings: EngineSettings) -> str:
    if settings.scope == "global":
        return "global"
    base, _ = split_extension(recipient, settings.recipient_delimiter)
    return base


def plan(incoming: Incoming, settings: EngineSettings) -> Plan:
    """Normalize the envelope. `answers` are the replies and reports to challenges: settled
    before anything else, so that a "reply all" confirms first and its other recipients see
    the sender authorized."""
    return plan_envelope(incoming.mail_from, incoming.recipients, settings)


def plan_envelope(
    mail_from: str, envelope_recipients: Sequence[str], settings: EngineSettings
) -> Plan:
    """`plan` from the envelope alone. Raises AddressError for an invalid address."""
    s = settings
    sender = "" if is_null_sender(mail_from) else normalize_address(mail_from)
    # A recipient named twice (in any case) gets one copy.
    recipients = tuple(dict.fromkeys(normalize_address(r) for r in envelope_recipients))
    confirm_base, bounce_base = _answer_bases(s.confirm_address, s.bounce_address)
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
        protected = answer is None and is_protected(rcpt, s.protected, s.recipient_delimiter)
        scope = None
        if protected and sender:
            scope = "global" if s.scope == "global" else scope_for(rcpt, s)
            scopes[scope] = None
        targets.append(Target(rcpt, answer, scope, protected))
    return Plan(sender, recipients, tuple(targets), tuple(scopes), tuple(answers))


def route(
    plan: Plan,
    incoming: Incoming,
    settings: EngineSettings,
    sender_states: Mapping[str, str],
) -> list[tuple[str, Route]]:
    """One route per recipient that is not an answer (see `plan`), in envelope order.
    `sender_states` maps each scope of `plan.scopes` to its sender's state (the initial
    state for a stranger), read after the answers were settled."""
    s = settings
    routes: list[tuple[str, Route]] = []
    exempt: Route | None = None
    exemption_checked = False
    authorized: Route | None = None
    for t in plan.targets:
        if t.answer is not None:
            continue
        if not t.protected:
            routes.append((t.recipient, UNPROTECTED))
            continue
        if t.scope is not None:
            state = sender_states[t.scope]
            if state == BLOCKED:
                routes.append((t.recipient, SENDER_BLOCKED))
                continue
            if state == AUTHORIZED:
                if authorized is None:
                    authorized = _authorized(plan.sender, incoming.headers, s)
                routes.append((t.recipient, authorized))
                continue
        if not exemption_checked:  # only for mail that would otherwise be challenged
            exempt = _exemption(incoming, s)
            exemption_checked = True
        if isinstance(exempt, HoldSilently) and t.scope is not None:
            routes.append((t.recipient, HoldSilently(exempt.reason, t.scope)))
            continue
        if exempt is not None:
            routes.append((t.recipient, exempt))
            continue
        assert t.scope is not None  # only the null sender has no scope, and it is exempt
        routes.append((t.recipient, AwaitSender(t.scope)))
    return routes


def _authorized(sender: str, headers: Headers, s: EngineSettings) -> Route:
    """An authorized sender's mail, re-checked: the whitelist is keyed on the envelope sender,
    which anyone can forge. Held copies are not linked to the sender (its authorization
    would release them at once); an operator releases them."""
    gate = s.auth_gate
    if gate.enabled:
        forged = check_authorized_sender(gate, domain_of(sender), headers)
        if forged is not None:
            return _act(gate.authorized_fail_action, f"authorized_sender_auth_failed: {forged}")
    if s.authorized_spam != ExemptAction.DELIVER:
        flagged = spam_flag(headers, s.spam_headers)
        if flagged is not None:
            return _act(s.authorized_spam, f"authorized_sender_spam: {flagged.detail}")
    return SENDER_AUTHORIZED


def _act(action: ExemptAction, reason: str) -> Route:
    if action == ExemptAction.DELIVER:
        return DeliverNow(f"sender_authorized; {reason}")
    if action == ExemptAction.DISCARD:
        return Discard(reason)
    return HoldSilently(reason)


def _exemption(incoming: Incoming, s: EngineSettings) -> Route | None:
    found = classify(
        incoming.mail_from,
        incoming.headers,
        spam_headers=s.spam_headers,
        bounce_like=incoming.bounce_like,
    )
    if found is None:
        return None
    action = s.exemptions.get(found.exemption, ExemptAction.HOLD)
    reason = f"never_challenge:{found.exemption.value}: {found.detail}"
    if action == ExemptAction.DELIVER:
        return DeliverNow(reason)
    if action == ExemptAction.DISCARD:
        return Discard(reason)
    return HoldSilently(reason)
