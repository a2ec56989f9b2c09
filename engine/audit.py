"""The auditor's checks: every event in the log decodes, follows its aggregate's previous
event, and is a transition specs/ declares (the challenge lifecycle included). Pure: it
reads events, it writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sourceauth.engine.message import Message
from sourceauth.engine.sender import SUPERSEDE, Sender
from sourceauth.engine.statemachine import CHALLENGE, MESSAGE, SENDER, StateMachineSpec


@dataclass(frozen=True)
class Fault:
    """The first thing wrong with the log, located precisely."""

    position: int
    aggregate_id: str
    version: int
    problem: str

    def __str__(self) -> str:
        where = f"event #{self.position} (aggregate {self.aggregate_id} v{self.version})"
        return f"{where}: {self.problem}"


@dataclass
class LogSummary:
    events: int = 0
    senders: int = 0
    messages: int = 0


def _machine_of(event: Any) -> tuple[StateMachineSpec, bool] | None:
    if isinstance(event, Sender.FirstSeen):
        return SENDER, True
    if isinstance(event, Sender.Event):
        return SENDER, False
    if isinstance(event, Message.Arrived):
        return MESSAGE, True
    if isinstance(event, Message.Event):
        return MESSAGE, False
    return None


def check_events(
    events: Iterable[tuple[int, Any]], summary: LogSummary | None = None
) -> Fault | None:
    """Replay (position, event) pairs in log order against the specs; None if all are legal."""
    summary = summary if summary is not None else LogSummary()
    states: dict[UUID, tuple[int, str, str]] = {}  # id -> (version, state, machine name)
    outcomes: dict[UUID, str] = {}  # sender id -> state of its current challenge
    for position, event in events:
        summary.events += 1
        aid: UUID = event.originator_id
        version: int = event.originator_version
        found = _machine_of(event)
        if found is None:
            return Fault(
                position, aid.hex, version, f"unknown event type {type(event).__qualname__}"
            )
        spec, created = found
        current = states.get(aid)
        if created:
            if current is not None or version != 1:
                return Fault(
                    position,
                    aid.hex,
                    version,
                    "a creation event for an aggregate that already exists",
                )
            source = spec.initial
            if spec is SENDER:
                summary.senders += 1
            else:
                summary.messages += 1
        else:
            if current is None:
                return Fault(position, aid.hex, version, "an event for an aggregate never created")
            if current[2] != spec.name:
                return Fault(position, aid.hex, version, f"a {spec.name} event on a {current[2]}")
            if version != current[0] + 1:
                return Fault(
                    position, aid.hex, version, f"version {version} does not follow {current[0]}"
                )
            source = current[1]
        trigger = str(getattr(event, "trigger", ""))
        if not spec.allows(source, trigger):
            return Fault(
                position,
                aid.hex,
                version,
                f"{type(event).__qualname__}: '{trigger}' is not allowed from '{source}' "
                f"in specs/{spec.name}.toml",
            )
        states[aid] = (version, spec.next_state(source, trigger), spec.name)
        if spec is SENDER:
            problem = _follow_challenge(outcomes, aid, event)
            if problem:
                return Fault(position, aid.hex, version, problem)
    return None


def _follow_challenge(outcomes: dict[UUID, str], aid: UUID, event: Any) -> str:
    """Track a sender's current challenge through specs/challenge.toml; a problem or ""."""
    if isinstance(event, (Sender.FirstChallenged, Sender.Challenged)):
        outcomes[aid] = CHALLENGE.initial
        return ""
    trigger = str(getattr(event, "challenge_trigger", ""))
    if not trigger or isinstance(event, Sender.FirstSeen):
        return ""
    outcome = outcomes.get(aid, "")
    if CHALLENGE.allows(outcome, trigger):
        outcomes[aid] = CHALLENGE.next_state(outcome, trigger)
    elif trigger != SUPERSEDE:  # an operator's verdict ends only a challenge still out
        return (
            f"{type(event).__qualname__}: '{trigger}' is not allowed from challenge state "
            f"'{outcome or 'none'}' in specs/{CHALLENGE.name}.toml"
        )
    return ""
