"""Executable scenarios: specs/scenarios/*.toml, each "given these inputs, when this one,
then exactly these new events", run against an engine on a real SQLite file.

Scenario format (also in specs/scenarios/README.md)::

    name = "second message from a pending sender is held, no second challenge"

    [settings]                      # optional: EngineSettings overrides (TOML scalars/arrays)
    failed_action = "keep"

    [[given]]                       # inputs already processed, in order (zero or more)
    receive = { from = "alice@remote.test", to = ["bob@example.test"] }

    [when]                          # exactly one input
    receive = { from = "alice@remote.test", to = ["carol@example.test"] }

    [then]
    events = [                      # every event recorded by `when`, in log order
      { aggregate = "message", event = "Message.Challenged",
        reason = "challenge_pending" },
    ]
    senders = { "alice@remote.test" = "challenged" }   # optional: the whole whitelist
    quarantine = { "alice@remote.test" = ["challenged", "challenged"] }  # optional

Inputs (one key per step):
  receive  = { from, to = [...], subject?, headers? = { Name = "value" } }   ("<>" is the null sender)
  reply    = { from, token_of?, headers? }  a reply to confirm+TOKEN@example.test carrying the
             token of `token_of`'s current challenge (default: the replier's own)
  dsn      = { sender, diagnostic? }        a DSN from <> to bounces+TOKEN@example.test
  confirm  = { sender, from? }              SourceAuth.confirm with `sender`'s token, claimed by `from`
  fail     = { sender, diagnostic? }        SourceAuth.challenge_failed with `sender`'s token
  authorize | block | forget = "address"    the operator verbs
  advance  = "8d"                           move the clock (s, m, h or d)
  maintain = true                           one maintenance pass (sends challenges, delivers)

An expected event names its aggregate ("sender" or "message") and its event class; any other
key is a field that must be equal, or, ending in "_prefix", a field that must start with it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sourceauth.engine.api import BounceInfo
from sourceauth.engine.application import SourceAuth
from tests.conftest import (
    BOUNCES,
    FakeChallenges,
    FakeClock,
    FakeDeliveries,
    event_name,
    events_since,
    incoming,
    log_position,
    reply_to_challenge,
    token_of,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "specs" / "scenarios"
FILES = sorted(SCENARIOS.glob("*.toml"))
INPUTS = frozenset(
    {
        "receive",
        "reply",
        "dsn",
        "confirm",
        "fail",
        "authorize",
        "block",
        "forget",
        "advance",
        "maintain",
    }
)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ScenarioError(Exception):
    """The scenario file itself is wrong (a typo, a missing key): fix the file."""


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        scenario = tomllib.load(fh)
    unknown = set(scenario) - {"name", "description", "settings", "given", "when", "then"}
    if unknown or "name" not in scenario or "when" not in scenario or "then" not in scenario:
        raise ScenarioError(f"{path.name}: needs name, when, then; unknown keys {sorted(unknown)}")
    for step in [*scenario.get("given", []), scenario["when"]]:
        if len(step) != 1 or not set(step) <= INPUTS:
            raise ScenarioError(f"{path.name}: a step is one of {sorted(INPUTS)}, got {step}")
    unknown = set(scenario["then"]) - {"events", "senders", "quarantine"}
    if unknown:
        raise ScenarioError(f"{path.name}: unknown keys in [then]: {sorted(unknown)}")
    return scenario


def duration(text: str | int | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if found is None:
        raise ScenarioError(f"bad duration {text!r} (use e.g. 90s, 61m, 2h, 8d)")
    return float(found[1]) * UNITS[found[2]]


def run_step(app: SourceAuth, clock: FakeClock, step: dict[str, Any]) -> None:
    [(verb, arg)] = step.items()
    if verb == "receive":
        headers = list(arg.get("headers", {}).items())
        app.receive(
            incoming(
                app, arg["from"], arg["to"], subject=arg.get("subject", "hello"), headers=headers
            )
        )
    elif verb == "reply":
        target = arg.get("token_of", arg["from"])
        headers = list(arg.get("headers", {}).items())
        app.receive(
            reply_to_challenge(app, arg["from"], token=token_of(app, target), headers=headers)
        )
    elif verb == "dsn":
        local, domain = BOUNCES.split("@")
        diagnostic = arg.get("diagnostic", "5.1.1 user unknown")
        report = incoming(
            app,
            "<>",
            f"{local}+{token_of(app, arg['sender'])}@{domain}",
            subject="Undelivered Mail Returned to Sender",
            headers=[("Content-Type", "multipart/report; report-type=delivery-status; boundary=b")],
            bounce=BounceInfo(failed=True, diagnostic=diagnostic),
        )
        app.receive(report)
    elif verb == "confirm":
        app.confirm(token_of(app, arg["sender"]), [arg.get("from", arg["sender"])])
    elif verb == "fail":
        app.challenge_failed(
            token_of(app, arg["sender"]), arg.get("diagnostic", "550 5.1.1 unknown")
        )
    elif verb in ("authorize", "block", "forget"):
        getattr(app, verb)(arg)
    elif verb == "advance":
        clock.advance(duration(arg))
    elif verb == "maintain":
        app.maintain()


def matches(event: Any, expected: dict[str, Any]) -> list[str]:
    """What differs between a recorded event and its expectation (empty if it matches)."""
    problems = []
    want = dict(expected)
    aggregate = want.pop("aggregate", None)
    name = want.pop("event", None)
    if name is not None and event_name(event) != name:
        problems.append(f"event {event_name(event)} != {name}")
    if aggregate is not None and not event_name(event).lower().startswith(f"{aggregate}."):
        problems.append(f"aggregate of {event_name(event)} is not {aggregate}")
    for key, value in want.items():
        field, prefix = (key[: -len("_prefix")], True) if key.endswith("_prefix") else (key, False)
        if not hasattr(event, field):
            problems.append(f"{event_name(event)} has no field {field!r}")
            continue
        actual = getattr(event, field)
        if (prefix and not str(actual).startswith(value)) or (not prefix and actual != value):
            problems.append(
                f"{field} = {actual!r}, expected {'prefix ' if prefix else ''}{value!r}"
            )
    return problems


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario(path: Path, make_engine: Any, clock: FakeClock) -> None:
    scenario = load(path)
    app = make_engine(
        challenges=FakeChallenges(), deliveries=FakeDeliveries(), **scenario.get("settings", {})
    )
    for step in scenario.get("given", []):
        run_step(app, clock, step)
    before = log_position(app)
    run_step(app, clock, scenario["when"])
    recorded = events_since(app, before)

    then = scenario["then"]
    expected = then.get("events", [])
    shown = [
        f"{event_name(e)}({getattr(e, 'trigger', '')}: {getattr(e, 'reason', '')})"
        for e in recorded
    ]
    assert len(recorded) == len(expected), f"{scenario['name']}: recorded {shown}"
    for index, (event, want) in enumerate(zip(recorded, expected, strict=True)):
        problems = matches(event, want)
        assert not problems, f"{scenario['name']}: event {index}: {problems}; recorded {shown}"
    if "senders" in then:
        assert {s.address: s.state for s in app.whitelist()} == then["senders"], scenario["name"]
    for sender, states in then.get("quarantine", {}).items():
        held = [
            m.state
            for m in app.quarantine(sender=sender)
            if not any(r.startswith("confirm+") for r in m.recipients)
        ]
        assert sorted(held) == sorted(states), f"{scenario['name']}: quarantine of {sender}"


def test_every_scenario_file_is_well_formed() -> None:
    assert len(FILES) >= 10
    names = [load(path)["name"] for path in FILES]
    assert len(set(names)) == len(names), "two scenarios share a name"


def test_a_malformed_scenario_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[when]\nrecieve = {}\n[then]\nevents = []\n')
    with pytest.raises(ScenarioError):
        load(bad)


def test_the_runner_notices_a_wrong_expectation() -> None:
    class Fake:
        trigger = "challenge"
        reason = "challenge_pending"

    Fake.__qualname__ = "Message.Challenged"
    event = Fake()
    assert (
        matches(
            event, {"aggregate": "message", "event": "Message.Challenged", "trigger": "challenge"}
        )
        == []
    )
    assert matches(event, {"reason_prefix": "challenge_"}) == []
    assert matches(event, {"aggregate": "sender"}) != []
    assert matches(event, {"event": "Message.Released"}) != []
    assert matches(event, {"reason": "challenge_queued"}) != []
    assert matches(event, {"reason_prefix": "never"}) != []
    assert matches(event, {"actor": "engine"}) != []  # no such field
