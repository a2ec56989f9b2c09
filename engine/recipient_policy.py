"""The policy that applies to one protected recipient: the global one, overridden per
protected domain, then per mailbox. Resolved by dictionary look-ups, cached per recipient.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sourceauth.engine.addresses import split_extension
from sourceauth.engine.policy import AuthGate, ExemptAction, Exemption

__all__ = ["GLOBAL", "PolicyOverride", "PolicyResolver", "RecipientPolicy"]

GLOBAL = "global"
_CACHE_SIZE = 1 << 16


@dataclass(frozen=True)
class PolicyOverride:
    """What one domain or mailbox changes; None (or an absent key) inherits the next level."""

    challenge_lifetime: float | None = None
    hold_lifetime: float | None = None
    failed_action: Literal["purge", "keep"] | None = None
    scope: Literal["global", "recipient"] | None = None
    exemptions: Mapping[Exemption, ExemptAction] = field(default_factory=dict)
    auth_gate: Mapping[str, Any] = field(default_factory=dict)  # AuthGate fields


@dataclass(frozen=True, eq=False)  # one object per policy: compared and hashed by identity
class RecipientPolicy:
    """The resolved policy of one recipient; `source` names where it came from, as recorded
    on each held copy: "global", "domain:example.org" or "mailbox:ceo@example.org"."""

    source: str
    scope: Literal["global", "recipient"]
    challenge_lifetime: float
    hold_lifetime: float
    failed_action: Literal["purge", "keep"]
    exemptions: Mapping[Exemption, ExemptAction]
    auth_gate: AuthGate

    def overridden(self, source: str, override: PolicyOverride) -> RecipientPolicy:
        return RecipientPolicy(
            source=source,
            scope=override.scope or self.scope,
            challenge_lifetime=override.challenge_lifetime or self.challenge_lifetime,
            hold_lifetime=override.hold_lifetime or self.hold_lifetime,
            failed_action=override.failed_action or self.failed_action,
            exemptions={**self.exemptions, **override.exemptions},
            auth_gate=dataclasses.replace(self.auth_gate, **override.auth_gate),
        )


class PolicyResolver:
    """Mailbox override, then domain override, then the global policy (docs/configuration.md).

    A mailbox's unset keys come from its domain's override, then from the global policy.
    """

    def __init__(
        self,
        default: RecipientPolicy,
        domains: Mapping[str, PolicyOverride],
        mailboxes: Mapping[str, PolicyOverride],
        delimiter: str,
    ) -> None:
        self.default = default
        self._delimiter = delimiter
        self._domains = {
            domain: default.overridden(f"domain:{domain}", o) for domain, o in domains.items()
        }
        self._mailboxes = {
            mailbox: self._domains.get(mailbox.rpartition("@")[2], default).overridden(
                f"mailbox:{mailbox}", o
            )
            for mailbox, o in mailboxes.items()
        }
        self._cache: dict[str, RecipientPolicy] = {}

    @property
    def overrides(self) -> bool:
        return bool(self._domains or self._mailboxes)

    @functools.cached_property
    def any_recipient_scope(self) -> bool:
        """Some recipient has a whitelist of its own (scope "recipient")."""
        return any(p.scope != GLOBAL for p in self.all())

    def all(self) -> list[RecipientPolicy]:
        """Every distinct policy: the global one and each override."""
        return [self.default, *self._domains.values(), *self._mailboxes.values()]

    def for_recipient(self, recipient: str) -> RecipientPolicy:
        """The policy of a normalized recipient address (an extension is ignored)."""
        if not (self._domains or self._mailboxes):
            return self.default
        found = self._cache.get(recipient)
        if found is None:
            mailbox, _ = split_extension(recipient, self._delimiter)
            found = self._mailboxes.get(mailbox) or self._domains.get(
                mailbox.rpartition("@")[2], self.default
            )
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[recipient] = found
        return found
