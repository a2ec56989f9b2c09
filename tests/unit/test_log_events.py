"""docs/logging.md cannot drift from the code: every `log.<level>("name", field=...)` call in
engine/ and adapters/ has a row there with its level and fields, and every event name is a literal."""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "logging.md"
LEVELS = frozenset({"debug", "info", "warning", "error", "critical", "exception"})
LOGGER_NAMES = frozenset({"log", "logger"})
DIRECTIVES = frozenset({"exc_info", "stack_info", "stacklevel"})  # structlog options, not fields


# The engine rewrite (issue 6) makes these modules' event names literal; until it lands their
# run-time names are listed in docs/logging.md by hand. Remove each entry when its module is done.
@dataclass(frozen=True)
class LogCall:
    where: str
    level: str
    event: str | None  # None when the name is not a string literal
    fields: frozenset[str]


def _flush_sites() -> frozenset[str]:
    """The places that log lines named elsewhere: what units noted (engine/service/context.py:
    `log.info(event, …)`) and the rows of `info_many` (engine/logs.py), whose names and fields
    are checked where they are noted or passed."""
    sites = set()
    for name, text in (
        ("engine/service/context.py", "log.info(event, **fields)"),
        ("engine/logs.py", "logger.info(event, **row)"),
    ):
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        sites |= {f"{name}:{n}" for n, line in enumerate(lines, 1) if line.strip() == text}
    return frozenset(sites)


def _row_fields(rows: ast.expr | None) -> frozenset[str]:
    """The keys of the dict literal that builds info_many's rows (a list or a comprehension)."""
    found: set[str] = set()
    for node in ast.walk(rows) if rows is not None else ():
        if isinstance(node, ast.Dict):
            found |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return frozenset(found)


DEFERRED_FLUSH = _flush_sites()


def log_calls(path: Path) -> list[LogCall]:
    calls: list[LogCall] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = node.func.value
        if node.func.attr == "note" and isinstance(receiver, ast.Name) and receiver.id == "unit":
            level = "info"  # engine units note their log lines, logged at info after the commit
        elif node.func.attr == "info_many" and isinstance(receiver, ast.Name):
            level = "info"  # one line per row: `info(event, **row)`
        elif (
            node.func.attr in LEVELS
            and isinstance(receiver, ast.Name)
            and receiver.id in LOGGER_NAMES
        ):
            level = node.func.attr
        else:
            continue
        if f"{path.relative_to(ROOT)}:{node.lineno}" in DEFERRED_FLUSH:
            continue  # replays the lines units noted: their names are checked where noted
        first = node.args[0] if node.args else None
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        calls.append(
            LogCall(
                where=f"{path.relative_to(ROOT)}:{node.lineno}",
                level=level,
                event=first.value if literal else None,  # type: ignore[union-attr]
                fields=(
                    frozenset(k.arg for k in node.keywords if k.arg is not None)
                    | (_row_fields(node.args[1]) if node.func.attr == "info_many" else frozenset())
                )
                - DIRECTIVES,
            )
        )
    return calls


def all_calls() -> list[LogCall]:
    files = sorted((ROOT / "engine").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py"))
    return [call for path in files for call in log_calls(path)]


def documented() -> dict[str, tuple[set[str], set[str]]]:
    """event -> (levels, fields), from every table row of docs/logging.md."""
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        levels = {lvl.strip() for lvl in cells[1].split(",")}
        fields = set(re.findall(r"`([a-z_0-9]+)`", cells[2]))
        for event in re.findall(r"`([a-z_0-9]+)`", cells[0]):
            known_levels, known_fields = rows.setdefault(event, (set(), set()))
            known_levels.update(levels)
            known_fields.update(fields)
    return rows


def test_every_log_event_is_documented_with_its_level_and_fields() -> None:
    docs = documented()
    problems = []
    for call in all_calls():
        if call.event is None:
            continue
        if call.event not in docs:
            problems.append(f"{call.where}: event {call.event!r} is not in docs/logging.md")
            continue
        levels, fields = docs[call.event]
        if call.level not in levels:
            problems.append(f"{call.where}: {call.event!r} logs at {call.level}, docs say {levels}")
        if call.fields - fields:
            missing = sorted(call.fields - fields)
            problems.append(f"{call.where}: {call.event!r} fields {missing} are not documented")
    assert problems == []


def test_event_names_are_literals() -> None:
    built = [call.where for call in all_calls() if call.event is None]
    assert built == [], "log event names must be string literals (put variable parts in fields)"


def test_no_field_shadows_a_log_record_attribute() -> None:
    # Without structlog configured, fields travel as LogRecord attributes (engine/logs.py).
    reserved = set(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None)))
    reserved |= {"message", "asctime"}
    clashes = [
        f"{c.where}: {sorted(c.fields & reserved)}" for c in all_calls() if c.fields & reserved
    ]
    assert clashes == []


def test_the_scanner_finds_the_calls_it_checks() -> None:
    events = {call.event: call for call in all_calls()}
    refused = events["recipient_refused"]
    assert refused.level == "warning" and {"purpose", "recipient", "code"} <= refused.fields
    assert "exc_info" not in events["dsn_unparseable"].fields
    assert len(events) > 30
