"""The auditor's checks: every event in the log decodes, follows its aggregate's previous
event, and is a transition specs/ declares (the challenge lifecycle included). Pure: it
reads events, it writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sourceauth.engine.message import QUEUED, Message
from sourceauth.engine.rules import Rule
from sourceauth.engine.sender import SUPERSEDE, Sender
from sourceauth.engine.statemachine import CHALLENGE, MESSAGE, RULE, SENDER, StateMachineSpec

DELIVERED = MESSAGE.dest("deliver")


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
    rules: int = 0


def actor_of(event: Any) -> str:
    """Who took the decision an event records (its field, else its class's implied actor)."""
    return str(getattr(event, "actor", "") or getattr(type(event), "implied_actor", ""))


def reason_of(event: Any) -> str:
    """Why (its field, else its class's implied reason)."""
    return str(getattr(event, "reason", "") or getattr(type(event), "implied_reason", ""))


def kind_of(event: Any) -> str:
    """ "sender" or "message": the machine an event belongs to ("" for a foreign event)."""
    found = _machine_of(event)
    return found[0].name if found else ""


@dataclass(frozen=True)
class Step:
    """One event of an aggregate with the transition of specs/ it took."""

    event: Any
    source: str
    dest: str


def steps(events: Iterable[Any]) -> Iterator[Step]:
    """One aggregate's events, oldest first, each with its `source → dest` from the specs
    ("?" where the log holds a transition the spec does not: `audit verify` names it)."""
    state = ""
    for event in events:
        found = _machine_of(event)
        if found is None:
            yield Step(event, "?", "?")
            continue
        spec, created = found
        source = spec.initial if created else state
        state = spec.table.get((source, str(getattr(event, "trigger", ""))), "?")
        yield Step(event, source, state)


def _machine_of(event: Any) -> tuple[StateMachineSpec, bool] | None:
    if isinstance(event, Sender.FirstSeen):
        return SENDER, True
    if isinstance(event, Sender.Event):
        return SENDER, False
    if isinstance(event, Message.Arrived):
        return MESSAGE, True
    if isinstance(event, Message.Event):
        return MESSAGE, False
    if isinstance(event, Rule.Added):
        return RULE, True
    if isinstance(event, Rule.Event):
        return RULE, False
    return None


_FINAL = {spec.name: spec.final_states() for spec in (SENDER, MESSAGE, RULE)}

# The walk keeps one small int per live aggregate, keyed by its id's 128-bit int: the version,
# the state and the machine, and for a sender its current challenge's state, packed as
#   version << 16 | challenge << 10 | state << 2 | machine
# (one dict entry, a 128-bit int and an int: 128 bytes a live sender, where a UUID key, a
# tuple and a second dict for the challenges took 269; measured with tracemalloc).
_MACHINES: tuple[StateMachineSpec, ...] = (SENDER, MESSAGE, RULE)
_MACHINE_INDEX = {spec.name: i for i, spec in enumerate(_MACHINES)}
_STATES: tuple[tuple[str, ...], ...] = tuple(spec.states for spec in _MACHINES)
_STATE_INDEX = tuple({name: i for i, name in enumerate(states)} for states in _STATES)
_OUTCOMES: tuple[str, ...] = ("", *CHALLENGE.states)  # 0: no challenge yet
_OUTCOME_INDEX = {name: i for i, name in enumerate(_OUTCOMES)}
assert len(_STATES) <= 4 and max(map(len, _STATES)) <= 256 and len(_OUTCOMES) <= 64


def check_events(
    events: Iterable[tuple[int, Any]], summary: LogSummary | None = None
) -> Fault | None:
    """Replay (position, event) pairs in log order against the specs; None if all are legal."""
    summary = summary if summary is not None else LogSummary()
    live: dict[int, int] = {}  # id.int -> packed (version, challenge, state, machine), above
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
        machine = _MACHINE_INDEX[spec.name]
        key = aid.int
        current = live.get(key)
        outcome = ""
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
            elif spec is RULE:
                summary.rules += 1
            else:
                summary.messages += 1
        else:
            if current is None:
                return Fault(
                    position,
                    aid.hex,
                    version,
                    "an event for an aggregate never created, or after its final state",
                )
            if current & 3 != machine:
                kind = _MACHINES[current & 3].name
                return Fault(position, aid.hex, version, f"a {spec.name} event on a {kind}")
            if version != (current >> 16) + 1:
                return Fault(
                    position, aid.hex, version, f"version {version} does not follow {current >> 16}"
                )
            source = _STATES[machine][(current >> 2) & 0xFF]
            outcome = _OUTCOMES[(current >> 10) & 0x3F]
        trigger = str(getattr(event, "trigger", ""))
        if not spec.allows(source, trigger):
            return Fault(
                position,
                aid.hex,
                version,
                f"{type(event).__qualname__}: '{trigger}' is not allowed from '{source}' "
                f"in specs/{spec.name}.toml",
            )
        dest = spec.next_state(source, trigger)
        if spec is SENDER:
            outcome, problem = _follow_challenge(outcome, event)
            if problem:
                return Fault(position, aid.hex, version, problem)
        if dest in _FINAL[spec.name]:
            # Nothing may follow a final state: forget the aggregate, so that memory follows
            # the aggregates still live (as the views do), not every one the log ever held.
            live.pop(key, None)
        else:
            live[key] = (
                version << 16
                | _OUTCOME_INDEX[outcome] << 10
                | _STATE_INDEX[machine][dest] << 2
                | machine
            )
    return None


def _follow_challenge(outcome: str, event: Any) -> tuple[str, str]:
    """Track a sender's current challenge through specs/challenge.toml: its new state, and
    a problem or ""."""
    if isinstance(event, (Sender.FirstChallenged, Sender.Challenged)):
        return CHALLENGE.initial, ""
    trigger = str(getattr(event, "challenge_trigger", ""))
    if not trigger or isinstance(event, Sender.FirstSeen):
        return outcome, ""
    if CHALLENGE.allows(outcome, trigger):
        return CHALLENGE.next_state(outcome, trigger), ""
    if trigger != SUPERSEDE:  # an operator's verdict ends only a challenge still out
        return outcome, (
            f"{type(event).__qualname__}: '{trigger}' is not allowed from challenge state "
            f"'{outcome or 'none'}' in specs/{CHALLENGE.name}.toml"
        )
    return outcome, ""


class Replay:
    """Senders and message copies as the log had them: events folded in log order, nothing
    else read. `audit state --at` feeds it every event recorded up to a moment."""

    def __init__(self, *, keep_delivered_at_once: bool = True) -> None:
        self.senders: dict[UUID, dict[str, Any]] = {}
        self.messages: dict[UUID, dict[str, Any]] = {}
        # False over the whole log: copies delivered at once are most of it and no auditor's
        # question; one is kept only while in flight, and listed if its delivery fails (as
        # the quarantine lists it).
        self.keep_delivered_at_once = keep_delivered_at_once
        self._in_flight: dict[UUID, dict[str, Any]] = {}

    def apply(self, event: Any) -> None:
        found = _machine_of(event)
        if found is None:
            return
        spec, created = found
        if spec is RULE:
            return  # rules are no sender's or message's state (`rules list --all` shows them)
        aid: UUID = event.originator_id
        rows = self.senders if spec is SENDER else self.messages
        if created:
            row = _first_row(spec, event)
            held = row.get("held") is not False or self.keep_delivered_at_once
            (rows if held else self._in_flight)[aid] = row
        else:
            known = rows.get(aid) or self._in_flight.get(aid)
            if known is None:
                return  # an event for an aggregate never created: `audit verify` names it
            row = known
        row["state"] = spec.table.get((row["state"], str(event.trigger)), "?")
        row["since"] = event.timestamp.isoformat()
        row["actor"] = actor_of(event)
        row["reason"] = reason_of(event)
        if aid in self._in_flight and row["state"] != QUEUED:
            del self._in_flight[aid]
            if row["state"] != DELIVERED:
                self.messages[aid] = row


def _first_row(spec: StateMachineSpec, event: Any) -> dict[str, Any]:
    if spec is SENDER:
        return {
            "address": event.address,
            "scope": event.scope,
            "id": event.originator_id.hex,
            "state": spec.initial,
        }
    return {
        "id": event.originator_id.hex,
        "sender": event.sender,
        "recipients": list(event.recipients),
        "subject": event.subject,
        "received": event.timestamp.isoformat(),
        "held": MESSAGE.dest(event.trigger) != QUEUED,  # False: a copy delivered at once
        "state": spec.initial,
    }


def _when(event: Any) -> str:
    return str(event.timestamp.strftime("%Y-%m-%d %H:%M:%S UTC"))


_SENDER_STORY: dict[type[Any], str] = {
    Sender.ChallengeSent: "the relay {relay} took it at {at}",
    Sender.ChallengeDeferred: "the relay deferred it at {at} ({diagnostic})",
    Sender.ChallengeResent: "it was sent again at {at} ({reason})",
    Sender.Confirmed: "a valid reply from {actor} confirmed it at {at}",
    Sender.ChallengeFailed: "it proved undeliverable at {at} ({actor}: {diagnostic})",
    Sender.ChallengeExpired: "it lapsed unanswered at {at}",
    Sender.Authorized: "{actor} authorized the sender at {at} ({reason})",
    Sender.Blocked: "{actor} blocked the sender at {at} ({reason})",
    Sender.Forgotten: "{actor} forgot the sender at {at} ({reason})",
}
_MESSAGE_STORY: dict[type[Any], str] = {
    Message.Released: "It was released at {at} by {actor} ({reason}).",
    Message.DeliveryDeferred: "The next hop deferred it at {at} ({diagnostic}).",
    Message.Delivered: "It was delivered at {at} to {delivered}{hop}{refused}.",
    Message.DeliveryFailed: "Delivery failed at {at} ({reason}: {diagnostic}).",
    Message.Expired: "It expired at {at} ({reason}).",
    Message.Purged: "Maintenance purged it at {at} ({reason}).",
    Message.DiscardedWhileHeld: "It was discarded at {at} by {actor} ({reason}).",
}
_ON_ARRIVAL = {
    "accept": "It was queued for delivery at once",
    "challenge": "It was held while its sender was challenged",
    "hold": "It was held without a challenge",
    "discard": "It was discarded on arrival",
}


def _told(template: str, event: Any) -> str:
    fields = {k: ", ".join(v) if isinstance(v, list) else v for k, v in vars(event).items()}
    hop, rejected = fields.get("next_hop"), fields.get("rejected")
    fields["hop"] = f" through {hop}" if hop else ""
    fields["refused"] = f"; refused for {rejected}" if rejected else ""
    return template.format(at=_when(event), **fields)


def _challenge_story(sender_events: Iterable[Any], arrived: Any) -> list[str]:
    """What became of the challenge out when a copy was held: queued, sent, answered."""
    story: list[str] = []
    for event in sender_events:
        if isinstance(event, (Sender.FirstChallenged, Sender.Challenged)):
            if event.timestamp > arrived.timestamp and story:
                break  # a later challenge: not the one this copy waited on
            story = [f"Challenge {event.challenge_id} was queued at {_when(event)}"]
        elif story and event.timestamp >= arrived.timestamp and type(event) in _SENDER_STORY:
            story.append(_told(_SENDER_STORY[type(event)], event))
    return story


def explain(message_events: Iterable[Any], sender_events: Iterable[Any]) -> str:
    """One readable paragraph on a message copy: received when, from whom, for whom, why
    held, which challenge and when, what came back, and how it ended. Events only."""
    sentences: list[str] = []
    state = ""
    arrived: Any = None
    for step in steps(message_events):
        e = step.event
        state = step.dest
        if isinstance(e, Message.Arrived):
            arrived = e
            sentences.append(
                f"Message {e.originator_id.hex} was received at {_when(e)} from <{e.sender}> "
                f"for {', '.join(e.recipients)} (subject {e.subject!r}, {e.size} bytes)."
            )
            sentences.append(f"{_ON_ARRIVAL.get(e.trigger, 'It was recorded')} ({e.reason}).")
            if e.policy:
                deadline = datetime.fromtimestamp(e.expires_at, tz=UTC)
                sentences.append(
                    f"Policy {e.policy} applied: held until "
                    f"{deadline.strftime('%Y-%m-%d %H:%M:%S UTC')}, and if the challenge "
                    f"fails, failed_action {e.failed_action}."
                )
            story = _challenge_story(sender_events, e) if e.trigger == "challenge" else []
            if story:
                sentences.append("; ".join(story) + ".")
        elif type(e) in _MESSAGE_STORY:
            sentences.append(_told(_MESSAGE_STORY[type(e)], e))
    if arrived is None:
        return ""
    sentences.append(f"It is now {state}.")
    return " ".join(sentences)
