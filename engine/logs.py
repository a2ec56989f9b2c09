"""Loggers for library code: silent unless the integrator configures logging.

Once structlog is configured (`structlog.configure`, as `sourceauth serve` does), events follow
that configuration; until then they go to the stdlib logger of the same name, under `sourceauth`,
which has only a NullHandler: nothing reaches stdout or stderr unless a handler is added.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from sourceauth.engine.tokens import TOKEN_LENGTH

__all__ = [
    "BatchWriter",
    "LibraryLogger",
    "LogThrottle",
    "get_logger",
    "install_batch_writer",
    "redact_tokens",
    "stamp_iso_utc",
]

# The library's convention (logging HOWTO, "Configuring Logging for a Library"): without it,
# Python's last-resort handler would print warnings to stderr.
logging.getLogger("sourceauth").addHandler(logging.NullHandler())

# A challenge token (40 base32 characters) standing alone or as an address extension.
_TOKEN = re.compile(rf"(?<![A-Za-z0-9])[A-Za-z2-7]{{{TOKEN_LENGTH}}}(?![A-Za-z0-9])")


def redact_tokens(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: a token in any text field (confirm+TOKEN@ as a recipient, a relay's
    reply quoting MAIL FROM:<bounces+TOKEN@>) becomes "[token]": logs never hold a live one."""
    for key, value in event_dict.items():
        if isinstance(value, str) and len(value) >= TOKEN_LENGTH:
            event_dict[key] = _TOKEN.sub("[token]", value)
    return event_dict


_SECOND: tuple[int, str] = (-1, "")  # (Unix second, its "YYYY-MM-DDTHH:MM:SS" in UTC)


def stamp_iso_utc(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: `timestamp` as structlog's TimeStamper(fmt="iso", utc=True) writes
    it ("2026-12-01T19:30:00.123456Z", no fraction at .000000), the date and time formatted
    once per second rather than once per line."""
    global _SECOND
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)  # floored, as datetime.now
    second, text = _SECOND
    if second != seconds:
        text = datetime.fromtimestamp(seconds, UTC).isoformat()[:-6]  # "+00:00" cut
        _SECOND = (seconds, text)
    event_dict["timestamp"] = f"{text}.{micros:06d}Z" if micros else f"{text}Z"
    return event_dict


_STDLIB_PROCESSORS: list[Any] = [
    redact_tokens,
    structlog.stdlib.render_to_log_kwargs,  # event name as the message, fields as `extra`
]


class LogThrottle:
    """At most one line per key every `interval` seconds, for errors that can repeat in a flood
    (a refused session, an accept() failing for want of descriptors): `passes(key)` is None for
    a line to drop, else how many were dropped since the last one (log it as `suppressed`)."""

    MAX_KEYS = 1024  # keys are kinds of error, not values; this only bounds a surprise

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def passes(self, key: str) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return None
        if len(self._last) >= self.MAX_KEYS:
            self._last.clear()
        self._last[key] = now
        return self._dropped.pop(key, 0)


# writer(method, event, rows): the lines `getattr(logger, method)(event, **row)` would write,
# one per row, in order, rendered by the configured processors and written at once.
BatchWriter = Callable[[str, str, Sequence[Mapping[str, Any]]], None]
# (the structlog processors list it renders with, the least level it writes, the writer)
_batch: tuple[object, int, BatchWriter] | None = None


def install_batch_writer(processors: object, level: int, writer: BatchWriter | None) -> None:
    """For whoever configured structlog with `processors` (the very list object) and a
    filtering level: a writer that renders many lines as those processors would, one by one,
    and writes them at once (`LibraryLogger.info_many`). It is used only while structlog's
    configuration still holds that list; None uninstalls it."""
    global _batch
    _batch = None if writer is None else (processors, level, writer)


def _installed_batch() -> tuple[object, int, BatchWriter] | None:
    installed = _batch
    if (
        installed is not None
        and structlog.is_configured()
        and structlog.get_config()["processors"] is installed[0]
    ):
        return installed
    return None


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
            # bind() first: the proxy's __getattr__ is reached only after a failed lookup.
            return getattr(self._structlog.bind(), method)(event, **fields)
        if self._logging.isEnabledFor(level):  # the silent default costs one cached lookup
            return getattr(self._stdlib, method)(event, **fields)
        return None

    def resolved(self, level: int = logging.INFO) -> Any:
        """What a call at `level` goes to now (call its method of that level), or None when
        such a call would log nothing: a loop logging many lines resolves it once."""
        if structlog.is_configured():
            return self._structlog.bind()
        if self._logging.isEnabledFor(level):
            return self._stdlib
        return None

    def enabled(self, level: int = logging.INFO) -> bool:
        """Whether a call at `level` would log anything now (check before building many rows)."""
        installed = _installed_batch()
        if installed is not None:
            return level >= installed[1]
        return self.resolved(level) is not None

    def info_many(self, event: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """`info(event, **row)` for each row, in order: with an installed batch writer
        (`sourceauth serve`'s JSON logging), the lines rendered by the same processors and
        written at once, one write for a whole group commit's decisions."""
        installed = _installed_batch()
        if installed is not None:
            if logging.INFO >= installed[1] and rows:
                installed[2]("info", event, rows)
            return
        logger = self.resolved(logging.INFO)
        if logger is not None:
            for row in rows:
                logger.info(event, **row)

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
