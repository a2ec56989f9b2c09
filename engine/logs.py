"""Loggers for library code: silent unless the integrator configures logging.

Once structlog is configured (`structlog.configure`, as `sourceauth serve` does), events follow
that configuration; until then they go to the stdlib logger of the same name, under `sourceauth`,
which has only a NullHandler: nothing reaches stdout or stderr unless a handler is added.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["LibraryLogger", "get_logger"]

# The library's convention (logging HOWTO, "Configuring Logging for a Library"): without it,
# Python's last-resort handler would print warnings to stderr.
logging.getLogger("sourceauth").addHandler(logging.NullHandler())

_STDLIB_PROCESSORS: list[Any] = [
    structlog.stdlib.render_to_log_kwargs,  # event name as the message, fields as `extra`
]


def get_logger(name: str) -> LibraryLogger:
    """The logger for one module (`get_logger(__name__)`); call it at import time."""
    return LibraryLogger(name)


class LibraryLogger:
    """A structlog-style logger whose destination is decided at each call, not at import:
    modules create it before the integrator gets a chance to configure anything."""

    __slots__ = ("_logging", "_stdlib", "_structlog", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._structlog: Any = structlog.get_logger(name)
        self._logging = logging.getLogger(name)
        self._stdlib: Any = structlog.wrap_logger(
            self._logging,
            processors=_STDLIB_PROCESSORS,
            wrapper_class=structlog.stdlib.BoundLogger,
        )

    def _log(self, level: int, method: str, event: str, fields: dict[str, Any]) -> Any:
        if structlog.is_configured():
            return getattr(self._structlog, method)(event, **fields)
        if self._logging.isEnabledFor(level):  # the silent default costs one cached lookup
            return getattr(self._stdlib, method)(event, **fields)
        return None

    def bind(self, **context: Any) -> Any:
        """A bound logger for the current configuration (bind inside functions, not at import)."""
        return (self._structlog if structlog.is_configured() else self._stdlib).bind(**context)

    def debug(self, event: str, **fields: Any) -> Any:
        return self._log(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> Any:
        return self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> Any:
        return self._log(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> Any:
        return self._log(logging.ERROR, "error", event, fields)

    def critical(self, event: str, **fields: Any) -> Any:
        return self._log(logging.CRITICAL, "critical", event, fields)

    def exception(self, event: str, **fields: Any) -> Any:
        """An error with the current exception's traceback."""
        return self._log(logging.ERROR, "exception", event, fields)
