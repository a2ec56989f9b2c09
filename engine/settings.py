"""Policy as data: everything the engine decides by, handed in by whoever configures it.

adapters/config/ maps the operator's TOML file onto this; integrators build it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from sourceauth.engine.policy import DEFAULT_SPAM_HEADERS, AuthGate, ExemptAction, Exemption, Limits
from sourceauth.engine.recipient_policy import (
    GLOBAL,
    PolicyOverride,
    PolicyResolver,
    RecipientPolicy,
)

DAY = 86400.0
# Each settings object's resolver, built once (kept out of the instance, which stays plain data).
_RESOLVERS: dict[int, tuple[EngineSettings, PolicyResolver]] = {}


def _default_exemptions() -> Mapping[Exemption, ExemptAction]:
    return {e: ExemptAction.HOLD for e in Exemption}


@dataclass(frozen=True)
class EngineSettings:
    """The policy of one filter; defaults are conservative (hold, never bounce, never amplify)."""

    protected: tuple[str, ...] = ()
    scope: Literal["global", "recipient"] = "global"
    challenge_lifetime: float = 7 * DAY
    hold_lifetime: float = 7 * DAY
    failed_action: Literal["purge", "keep"] = "purge"
    recipient_delimiter: str = "+"
    confirm_address: str = "confirm@localhost"
    bounce_address: str = "bounces@localhost"
    exemptions: Mapping[Exemption, ExemptAction] = field(default_factory=_default_exemptions)
    spam_headers: tuple[tuple[str, str], ...] = DEFAULT_SPAM_HEADERS
    auth_gate: AuthGate = field(default_factory=AuthGate)
    limits: Limits = field(default_factory=Limits)
    resend_after: float = DAY
    challenge_retry_initial: float = 60.0
    challenge_retry_max: float = 3600.0
    challenge_give_up_after: float = 2 * DAY
    delivery_retry_initial: float = 60.0
    delivery_retry_max: float = 3600.0
    delivery_give_up_after: float = 5 * DAY
    max_recipients: int = 100
    # Seconds a claimed challenge send or delivery stays with its worker: after a crash,
    # another node takes the work over once this has passed (sends it again, at least once).
    work_lease: float = 300.0
    held_per_recipient: int = 100_000
    # --- abuse resistance (issue 7): see docs/security.md "Policy and caps"
    authorized_spam: ExemptAction = ExemptAction.DELIVER  # spam-flagged mail from the whitelist
    # --- policy per network (issue 10): overrides per protected domain and per mailbox
    domains: Mapping[str, PolicyOverride] = field(default_factory=dict)
    mailboxes: Mapping[str, PolicyOverride] = field(default_factory=dict)

    @property
    def policies(self) -> PolicyResolver:
        """Each recipient's policy: mailbox override, then domain override, then the above."""
        found = _RESOLVERS.get(id(self))
        if found is not None and found[0] is self:
            return found[1]
        if len(_RESOLVERS) >= 64:
            _RESOLVERS.clear()
        resolver = self._resolver()
        _RESOLVERS[id(self)] = (self, resolver)
        return resolver

    def _resolver(self) -> PolicyResolver:
        default = RecipientPolicy(
            source=GLOBAL,
            scope=self.scope,
            challenge_lifetime=self.challenge_lifetime,
            hold_lifetime=self.hold_lifetime,
            failed_action=self.failed_action,
            exemptions=self.exemptions,
            auth_gate=self.auth_gate,
        )
        return PolicyResolver(default, self.domains, self.mailboxes, self.recipient_delimiter)
