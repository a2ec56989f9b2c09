"""Typed exceptions of the engine's library API.

Integrators catch these; adapters turn them into SMTP replies or CLI exit codes.
"""

from __future__ import annotations


class SourceAuthError(Exception):
    """Base class of every error the engine raises on purpose."""


class IllegalTransition(SourceAuthError):
    """A trigger that specs/ does not declare from the aggregate's current state."""

    def __init__(self, machine: str, source: str, trigger: str) -> None:
        super().__init__(f"{machine}: '{trigger}' is not allowed from state '{source}'")
        self.machine = machine
        self.source = source
        self.trigger = trigger


class InvalidInput(SourceAuthError, ValueError):
    """An input the engine refuses: a bad address, an empty recipient list, …"""


class NotFound(SourceAuthError, LookupError):
    """No sender or message with that address or id."""


class TemporaryFailure(SourceAuthError):
    """Storage trouble or contention that outlasted the retries: try again later (SMTP 4xx)."""


class ChallengeNotPending(SourceAuthError):
    """An answer (reply, report, send result, lapse) to a challenge that is no longer the
    sender's current, unanswered one: it is stale and records nothing."""

    def __init__(self, state: str) -> None:
        super().__init__(f"challenge no longer pending (sender {state})")
        self.state = state


class MessageNotHeld(SourceAuthError):
    """A verb for held mail (expire, sweep release) on a copy that is no longer held."""


class NotAwaitingDelivery(SourceAuthError):
    """A delivery outcome for a copy that is not (or no longer) queued for the next hop."""
