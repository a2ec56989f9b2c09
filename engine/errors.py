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
