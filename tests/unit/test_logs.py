"""engine/logs.py in process: the stdlib route while structlog is unconfigured, structlog's own
configuration once there is one, decided at each call (loggers are made at import time)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import LogCapture

from sourceauth.engine.logs import LogThrottle, get_logger

NAME = "sourceauth.tests.logs"


@pytest.fixture
def unconfigured() -> Iterator[None]:
    """structlog as a fresh process has it; the previous configuration is restored after."""
    was_configured, saved = structlog.is_configured(), structlog.get_config()
    structlog.reset_defaults()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


def test_unconfigured_events_go_to_the_stdlib_logger_with_fields_as_attributes(
    unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = get_logger(NAME)
    with caplog.at_level(logging.INFO, logger=NAME):
        log.debug("below_the_level", n=0)
        log.info("message_held", sender="a@remote.test", n=1)
        log.bind(challenge_id="c1").warning("challenge_deferred", attempt=2)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("step_failed")
    records = [r for r in caplog.records if r.name == NAME]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "message_held"),
        ("WARNING", "challenge_deferred"),
        ("ERROR", "step_failed"),
    ]
    held, deferred, failed = records
    assert (held.sender, held.n) == ("a@remote.test", 1)  # type: ignore[attr-defined]
    assert (deferred.challenge_id, deferred.attempt) == ("c1", 2)  # type: ignore[attr-defined]
    assert failed.exc_info is not None and failed.exc_info[0] is RuntimeError


def test_without_a_handler_nothing_is_emitted(unconfigured: None) -> None:
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("sourceauth").handlers)


def test_a_logger_made_before_structlog_is_configured_follows_the_configuration(
    unconfigured: None,
) -> None:
    log = get_logger(NAME)  # as at import time
    capture = LogCapture()
    structlog.configure(processors=[capture])
    log.info("message_held", sender="a@remote.test")
    log.bind(challenge_id="c1").error("challenge_failed", attempt=3)
    assert capture.entries == [
        {"event": "message_held", "sender": "a@remote.test", "log_level": "info"},
        {"event": "challenge_failed", "challenge_id": "c1", "attempt": 3, "log_level": "error"},
    ]


def test_resolved_is_where_a_call_goes_now_or_none_when_it_would_log_nothing(
    unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = get_logger(NAME)
    logging.getLogger(NAME).setLevel(logging.WARNING)
    try:
        assert log.resolved(logging.INFO) is None  # silent: a loop of lines can be skipped
        with caplog.at_level(logging.INFO, logger=NAME):
            logger = log.resolved(logging.INFO)
            assert logger is not None
            logger.info("message_decided", recipient="bob@example.test")
    finally:
        logging.getLogger(NAME).setLevel(logging.NOTSET)
    assert [(r.getMessage(), r.recipient) for r in caplog.records if r.name == NAME] == [  # type: ignore[attr-defined]
        ("message_decided", "bob@example.test")
    ]
    capture = LogCapture()
    structlog.configure(processors=[capture])
    logger = log.resolved(logging.INFO)
    for n in range(2):
        logger.info("message_decided", n=n)
    assert capture.entries == [
        {"event": "message_decided", "n": 0, "log_level": "info"},
        {"event": "message_decided", "n": 1, "log_level": "info"},
    ]


def test_log_throttle_lets_one_line_per_kind_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = LogThrottle(10.0, clock=lambda: now[0])
    assert throttle.passes("accept") == 0
    assert [throttle.passes("accept") for _ in range(3)] == [None, None, None]
    assert throttle.passes("refused") == 0  # another kind has its own budget
    now[0] = 10.0
    assert throttle.passes("accept") == 3  # the next line says how many were dropped
    assert throttle.passes("accept") is None


def test_console_logs_keep_plain_tracebacks_with_rich_installed() -> None:
    """structlog formats exceptions with rich's boxes whenever rich is importable (a
    dependency since the progress bars); log lines stay plain text."""
    import io

    from sourceauth.adapters.runtime import configure_logging

    saved = structlog.get_config()
    out = io.StringIO()
    try:
        configure_logging("console", "info", stream=out)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            get_logger("test").exception("it_failed")
    finally:
        structlog.configure(**saved)
    text = out.getvalue()
    assert "it_failed" in text and "Traceback (most recent call last):" in text
    assert "ZeroDivisionError: division by zero" in text
    assert not set(text) & set("╭╮╰╯│─"), text


@pytest.mark.parametrize(
    "ns",
    [
        1_764_615_600_000_000_000,  # a whole second: no fraction, as isoformat writes it
        1_764_615_600_000_001_999,  # 1 us (floored, as datetime.now)
        1_764_615_659_999_999_999,
        1_764_615_600_123_456_789,
        951_782_400_500_000_000,  # 2000-02-29
    ],
)
def test_stamp_iso_utc_writes_what_structlogs_iso_utc_timestamper_writes(
    ns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from sourceauth.engine import logs

    seconds, micros = divmod(ns // 1000, 1_000_000)
    at = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    # structlog's stamper_iso_utc: datetime.now(tz=utc).isoformat().replace("+00:00", "Z")
    expected = at.isoformat().replace("+00:00", "Z")
    monkeypatch.setattr(logs.time, "time_ns", lambda: ns)
    assert logs.stamp_iso_utc(None, "info", {})["timestamp"] == expected
    assert logs.stamp_iso_utc(None, "info", {})["timestamp"] == expected  # the cached second


def test_stamp_iso_utc_reads_the_clock_structlogs_timestamper_reads() -> None:
    from datetime import datetime

    from sourceauth.engine.logs import stamp_iso_utc

    before = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})["timestamp"]
    ours = stamp_iso_utc(None, "info", {})["timestamp"]
    after = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})["timestamp"]

    def parse(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    assert ours.endswith("Z") and parse(before) <= parse(ours) <= parse(after)


def _json_lines(data: bytes) -> list[dict[str, object]]:
    import json

    lines = [json.loads(line) for line in data.decode().splitlines()]
    for line in lines:
        assert str(line.pop("timestamp")).endswith("Z")
    return lines


ROWS = [
    {"receipt_id": "r1", "recipient": "bob@example.test", "decision": "deliver", "n": 1},
    {"receipt_id": "r2", "recipient": "confirm+" + "a" * 40 + "@example.test", "n": None},
]


def test_info_many_writes_what_info_writes_line_by_line_in_one_write(
    unconfigured: None,
) -> None:
    """serve's JSON logging: a group commit's decisions rendered by the same processors (token
    redaction included) and written with one call, the same lines as one `info` each."""
    import io

    from sourceauth.adapters.runtime import configure_logging

    class Counting(io.BytesIO):
        writes = 0

        def write(self, data: object) -> int:
            self.writes += 1
            return super().write(data)  # type: ignore[arg-type]

    one, many = Counting(), Counting()
    log = get_logger(NAME)
    configure_logging("json", "info", stream=one)
    for row in ROWS:
        log.info("message_decided", **row)
    configure_logging("json", "info", stream=many)
    assert log.enabled(logging.INFO) and not log.enabled(logging.DEBUG)
    log.info_many("message_decided", ROWS)
    assert many.writes == 1 and one.writes == len(ROWS)
    assert many.getvalue().count(b"\n") == len(ROWS)
    assert _json_lines(many.getvalue()) == _json_lines(one.getvalue())
    assert list(_json_lines(many.getvalue())[1]) == list(_json_lines(one.getvalue())[1])
    assert _json_lines(many.getvalue())[1]["recipient"] == "confirm+[token]@example.test"


def test_info_many_follows_the_level_and_any_other_configuration(unconfigured: None) -> None:
    import io

    from sourceauth.adapters.runtime import configure_logging

    log = get_logger(NAME)
    quiet = io.BytesIO()
    configure_logging("json", "warning", stream=quiet)
    assert not log.enabled(logging.INFO) and log.enabled(logging.WARNING)
    log.info_many("message_decided", ROWS)
    assert quiet.getvalue() == b""
    configure_logging("json", "info", stream=io.BytesIO())
    capture = LogCapture()  # an integrator's own configuration replaces serve's
    structlog.configure(processors=[capture])
    log.info_many("message_decided", ROWS[:1])
    assert capture.entries == [{**ROWS[0], "event": "message_decided", "log_level": "info"}]
    structlog.reset_defaults()  # the silent library default: nothing, and no error
    assert not log.enabled(logging.INFO)
    log.info_many("message_decided", ROWS)
