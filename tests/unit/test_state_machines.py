"""The state machines of specs/ are the transition table of every aggregate.

Every declared edge is taken through the Sender and Message aggregates' own events, every
undeclared (state, trigger) pair of the full cross product is refused with IllegalTransition,
the challenge lifecycle follows specs/challenge.toml through the Sender's events, one
transitions.Machine exists per kind (none per aggregate), and the diagram shows all three.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import transitions

from sourceauth.engine.errors import IllegalTransition
from sourceauth.engine.message import Message
from sourceauth.engine.sender import Sender
from sourceauth.engine.statemachine import (
    CHALLENGE,
    MACHINES,
    MESSAGE,
    RULE,
    SENDER,
    StateMachineSpec,
)

AGGREGATES: dict[str, type[Any]] = {"sender": Sender, "message": Message}
CREATION_BASE: dict[str, type[Any]] = {"sender": Sender.FirstSeen, "message": Message.Arrived}
AGGREGATE_MACHINES = {"sender": SENDER, "message": MESSAGE}
# Fields every eventsourcing event has; the rest are the event's own.
_COMMON_FIELDS = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


def _event_classes(aggregate: type[Any]) -> dict[str, type[Any]]:
    """trigger -> the aggregate's (non-creation) event class that takes it."""
    found: dict[str, type[Any]] = {}
    for value in vars(aggregate).values():
        if (
            isinstance(value, type)
            and issubclass(value, aggregate.Event)
            and not issubclass(value, CREATION_BASE[aggregate.__name__.lower()])
            and value.trigger
        ):
            assert value.trigger not in found, f"two events take trigger {value.trigger!r}"
            found[value.trigger] = value
    return found


def _creation_classes(kind: str) -> dict[str, type[Any]]:
    """trigger -> the aggregate's creation event class that takes it from the initial state."""
    aggregate, base = AGGREGATES[kind], CREATION_BASE[kind]
    found: dict[str, type[Any]] = {}
    for value in vars(aggregate).values():
        if isinstance(value, type) and issubclass(value, base) and value.trigger:
            assert value.trigger not in found, f"two creation events take {value.trigger!r}"
            found[value.trigger] = value
    return found


def _fields(event_class: type[Any]) -> dict[str, str]:
    names: dict[str, str] = {}
    for klass in reversed(event_class.__mro__):
        names.update(getattr(klass, "__annotations__", {}))
    return {
        k: v
        for k, v in names.items()
        if k not in _COMMON_FIELDS and k != "trigger" and not v.startswith("ClassVar")
    }


def _sample(annotation: str) -> Any:
    """A plausible value for an event field of this (string) annotation."""
    samples: dict[str, Any] = {
        "str": "x",
        "int": 1,
        "float": 1_800_000_000.0,
        "bool": False,
        "list[str]": ["bob@example.test"],
    }
    return samples[annotation.replace(" ", "")]


def _kwargs(event_class: type[Any], **overrides: Any) -> dict[str, Any]:
    values = {name: _sample(ann) for name, ann in _fields(event_class).items()}
    if "challenge_id" in values:
        values["challenge_id"] = "ab" * 10
    values.update(overrides)
    return values


def _create(kind: str, trigger: str) -> Any:
    created = _creation_classes(kind)[trigger]
    return AGGREGATES[kind]._create(created, id=uuid.uuid4(), **_kwargs(created))


def _paths(spec: StateMachineSpec) -> dict[str, tuple[str, ...]]:
    """The shortest non-empty trigger path from the initial state to every reachable state
    (for an aggregate, one that starts with a creation event)."""
    kind = {SENDER.name: "sender", MESSAGE.name: "message"}.get(spec.name)
    first = set(_creation_classes(kind)) if kind else set(spec.triggers())
    paths: dict[str, tuple[str, ...]] = {}
    queue: deque[tuple[str, tuple[str, ...]]] = deque([(spec.initial, ())])
    seen_paths: set[str] = set()
    while queue:
        state, path = queue.popleft()
        for t in spec.transitions:
            if not path and t.trigger not in first:
                continue
            if t.source == state and t.dest not in seen_paths:
                seen_paths.add(t.dest)
                paths[t.dest] = (*path, t.trigger)
                queue.append((t.dest, paths[t.dest]))
    return paths


def _build(kind: str, path: tuple[str, ...]) -> Any:
    """An aggregate brought to a state by its own events along `path`."""
    events = _event_classes(AGGREGATES[kind])
    aggregate = _create(kind, path[0])
    for trigger in path[1:]:
        aggregate.trigger_event(events[trigger], **_kwargs(events[trigger]))
    return aggregate


def _pairs(spec: StateMachineSpec) -> Iterator[tuple[str, str]]:
    return itertools.product(spec.states, spec.triggers())


SENDER_PAIRS = [("sender", s, t) for s, t in _pairs(SENDER)]
MESSAGE_PAIRS = [("message", s, t) for s, t in _pairs(MESSAGE)]
ALL_PAIRS = SENDER_PAIRS + MESSAGE_PAIRS


# ------------------------------------------------------------------------------ the specs


@pytest.mark.parametrize("spec", [SENDER, MESSAGE, CHALLENGE, RULE], ids=lambda s: s.name)
def test_every_state_is_reachable_from_the_initial_state(spec: StateMachineSpec) -> None:
    reachable = set(_paths(spec)) | {spec.initial}
    assert reachable == set(spec.states)


@pytest.mark.parametrize("kind", ["sender", "message"])
def test_every_event_class_names_a_trigger_of_its_spec(kind: str) -> None:
    assert set(_event_classes(AGGREGATES[kind])) <= set(MACHINES[kind].triggers())


def test_card_states_are_the_spine_of_the_sender_machine() -> None:
    # DESIGN.md: sender states include exactly unknown, challenged, authorized, expired.
    assert {"unknown", "challenged", "authorized", "expired"} <= set(SENDER.states)
    assert SENDER.initial == "unknown"
    assert SENDER.next_state("unknown", "challenge") == "challenged"
    assert SENDER.next_state("challenged", "confirm") == "authorized"
    assert SENDER.next_state("challenged", "fail") == "expired"
    assert SENDER.next_state("expired", "challenge") == "challenged"


def test_message_terminal_states_accept_no_trigger() -> None:
    for state in ("delivered", "purged", "discarded"):
        assert not [t for t in MESSAGE.triggers() if MESSAGE.allows(state, t)], state


# ------------------------------------------------------------------------ the cross product


@pytest.mark.parametrize(("kind", "state", "trigger"), ALL_PAIRS, ids=lambda x: str(x))
def test_trigger_from_state_follows_the_spec(kind: str, state: str, trigger: str) -> None:
    spec = MACHINES[kind]
    allowed = spec.allows(state, trigger)
    if state == spec.initial:
        # The initial state is "before the first event": a creation event names the trigger
        # it takes, and only a declared one. (Forgetting a sender never seen creates nothing.)
        created = _creation_classes(kind)
        if trigger in created:
            assert allowed, f"{created[trigger].__qualname__} takes an undeclared trigger"
            aggregate = _create(kind, trigger)
            assert aggregate.state == spec.next_state(state, trigger)
            assert aggregate.version == 1
        if kind == "message":
            return  # a message never returns to its initial state; nothing more to try
    path = _paths(spec)[state]
    aggregate = _build(kind, path)
    assert aggregate.state == state
    events = _event_classes(AGGREGATES[kind])
    version, pending = aggregate.version, len(aggregate.pending_events)
    event = events.get(trigger)
    challenge_trigger = getattr(event, "challenge_trigger", "")
    if allowed and challenge_trigger not in ("", "supersede"):
        # Sender events about its challenge also follow specs/challenge.toml.
        allowed = CHALLENGE.allows(aggregate.outcome, challenge_trigger)
    if allowed:
        aggregate.check(trigger)
        if event is not None:
            aggregate.trigger_event(event, **_kwargs(event))
            assert aggregate.state == spec.next_state(state, trigger)
            assert aggregate.version == version + 1
        return
    if spec.allows(state, trigger):  # the sender machine allows it, its challenge does not
        assert event is not None
        with pytest.raises(IllegalTransition) as refused:
            aggregate.trigger_event(event, **_kwargs(event))
        assert refused.value.machine == "challenge"
        assert (aggregate.state, aggregate.version) == (state, version)
        return
    with pytest.raises(IllegalTransition):
        aggregate.check(trigger)
    if trigger in events:
        with pytest.raises(IllegalTransition) as refused:
            aggregate.trigger_event(events[trigger], **_kwargs(events[trigger]))
        assert refused.value.source == state and refused.value.trigger == trigger
        # A refused trigger leaves no trace: same state, same version, no new pending event.
        assert aggregate.state == state
        assert aggregate.version == version
        assert len(aggregate.pending_events) == pending


def test_every_declared_transition_is_exercised_by_an_event() -> None:
    """Each edge of specs/ has an event that takes it (creation events for the first edge)."""
    for kind, spec in AGGREGATE_MACHINES.items():
        events = _event_classes(AGGREGATES[kind])
        created = _creation_classes(kind)
        for t in spec.transitions:
            if t.source == spec.initial and kind == "message":
                assert t.trigger in created, f"{kind}: {t} has no creation event"
            else:
                assert t.trigger in events, f"{kind}: {t} has no event"


@pytest.mark.parametrize("kind", ["sender", "message"])
def test_replay_of_recorded_events_reaches_the_same_state(kind: str) -> None:
    spec = AGGREGATE_MACHINES[kind]
    for state, path in _paths(spec).items():
        live = _build(kind, path)
        events = live.collect_events()
        replayed = None
        for event in events:
            replayed = event.mutate(replayed)
        assert replayed is not None
        assert replayed.state == live.state == state
        assert replayed.version == live.version


# ------------------------------------------------------------------------- one machine per kind


def test_one_machine_per_kind_and_none_per_aggregate(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(MACHINES) == {"sender", "message", "challenge", "rule"}
    machines = [spec.machine for spec in MACHINES.values()]
    assert all(isinstance(m, transitions.Machine) for m in machines)
    assert len({id(m) for m in machines}) == 4
    assert all(m.models == [] for m in machines)

    built: list[object] = []
    original = transitions.Machine.__init__

    def counting(self: object, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transitions.Machine, "__init__", counting)
    aggregates = [
        _build(kind, path)
        for kind, spec in AGGREGATE_MACHINES.items()
        for path in _paths(spec).values()
    ]
    assert built == [], "an aggregate built a transitions.Machine of its own"

    triggers = set(SENDER.triggers()) | set(MESSAGE.triggers())
    trigger_names = triggers | {f"may_{t}" for t in triggers} | {"trigger", "machine"}
    trigger_names |= {f"to_{s}" for s in (*SENDER.states, *MESSAGE.states)}
    trigger_names |= {f"is_{s}" for s in (*SENDER.states, *MESSAGE.states)}
    for aggregate in aggregates:
        attributes = vars(aggregate)
        assert not trigger_names & set(attributes), sorted(trigger_names & set(attributes))
        assert not any(isinstance(v, transitions.Machine) for v in attributes.values())
        assert not any(callable(v) for v in attributes.values())


def test_the_table_is_derived_from_the_machine() -> None:
    for spec in MACHINES.values():
        from_machine = {
            (source, trigger): transition.dest
            for trigger, event in spec.machine.events.items()
            for source, found in event.transitions.items()
            for transition in found
        }
        assert dict(spec.table) == from_machine
        assert {(t.source, t.trigger): t.dest for t in spec.transitions} == from_machine


# ------------------------------------------------------------------------------ the diagram


@pytest.mark.parametrize("spec", [SENDER, MESSAGE, CHALLENGE, RULE], ids=lambda s: s.name)
def test_diagram_mentions_every_state_and_every_trigger(spec: StateMachineSpec) -> None:
    diagram = spec.mermaid()
    assert "stateDiagram" in diagram
    for state in spec.states:
        assert state in diagram
    for trigger in spec.triggers():
        assert trigger in diagram
    for t in spec.transitions:
        edge = f"{t.source} --> {t.dest}:"
        assert edge in diagram, edge


# ------------------------------------------------------------------ the challenge lifecycle


def _challenge_events() -> dict[str, type[Any]]:
    """challenge trigger -> the Sender event that takes it (supersede: several)."""
    found: dict[str, type[Any]] = {}
    for value in vars(Sender).values():
        if isinstance(value, type) and issubclass(value, Sender.Event) and value.challenge_trigger:
            found.setdefault(value.challenge_trigger, value)
    return found


def test_every_challenge_trigger_is_taken_by_a_sender_event() -> None:
    assert set(_challenge_events()) == set(CHALLENGE.triggers())


def _challenged_sender() -> Any:
    sender = _create("sender", "challenge")
    assert sender.outcome == CHALLENGE.initial
    return sender


@pytest.mark.parametrize(
    ("state", "trigger"), list(itertools.product(CHALLENGE.states, CHALLENGE.triggers()))
)
def test_challenge_outcome_follows_its_spec(state: str, trigger: str) -> None:
    """Bring a sender's challenge to `state` through the Sender's own events, then take
    `trigger`: the outcome is the spec's destination, or the event is refused."""
    path = (CHALLENGE.initial,) if state == CHALLENGE.initial else None
    paths = _paths(CHALLENGE)
    sender = _challenged_sender()
    events = _challenge_events()
    for step in () if path else paths[state]:
        sender.trigger_event(events[step], **_kwargs(events[step]))
    assert sender.outcome == state
    event = events[trigger]
    if trigger == "supersede":
        # An operator's verdict always applies to the sender; it ends only a pending challenge.
        if SENDER.allows(sender.state, event.trigger):
            sender.trigger_event(event, **_kwargs(event))
            expected = (
                CHALLENGE.next_state(state, trigger) if CHALLENGE.allows(state, trigger) else state
            )
            assert sender.outcome == expected
        return
    if CHALLENGE.allows(state, trigger) and SENDER.allows(sender.state, event.trigger):
        sender.trigger_event(event, **_kwargs(event))
        assert sender.outcome == CHALLENGE.next_state(state, trigger)
    else:
        version = sender.version
        with pytest.raises(IllegalTransition):
            sender.trigger_event(event, **_kwargs(event))
        assert sender.outcome == state and sender.version == version


def test_the_pending_guard_is_named_once_and_refuses_a_stale_challenge() -> None:
    from sourceauth.engine.errors import ChallengeNotPending

    sender = _challenged_sender()
    sender.check_challenge_is_pending(sender.challenge_id)
    with pytest.raises(ChallengeNotPending):
        sender.check_challenge_is_pending("cd" * 10)
    with pytest.raises(ChallengeNotPending):
        sender.confirm("cd" * 10, timestamp=sender.since, actor="x@remote.test")
    sender.confirm(sender.challenge_id, timestamp=sender.since, actor="x@remote.test")
    assert sender.state == "authorized" and sender.outcome == "confirmed"
    with pytest.raises(ChallengeNotPending):
        sender.record_sent(sender.challenge_id, timestamp=sender.since, relay="250", attempt=1)


def test_an_old_challenge_sent_event_is_upcast_when_read() -> None:
    """Version 1 of Sender.ChallengeSent had no challenge_id: eventsourcing's mapper reads
    it through `upcast_v1_v2` (the stored state carries no class_version: version 1)."""
    from eventsourcing.persistence import (
        DatetimeAsISO,
        JSONTranscoder,
        Mapper,
        StoredEvent,
        UUIDAsHex,
    )
    from eventsourcing.utils import get_topic

    transcoder = JSONTranscoder()
    transcoder.register(UUIDAsHex())
    transcoder.register(DatetimeAsISO())
    mapper: Mapper[uuid.UUID] = Mapper(transcoder=transcoder)
    sender = _challenged_sender()
    old_state = {"timestamp": sender.since, "relay": "250 2.0.0 ok", "attempt": 1}
    stored = StoredEvent(
        originator_id=sender.id,
        originator_version=2,
        topic=get_topic(Sender.ChallengeSent),
        state=transcoder.encode(old_state),
    )
    event = mapper.to_domain_event(stored)
    assert isinstance(event, Sender.ChallengeSent)
    assert event.challenge_id == "" and event.relay == "250 2.0.0 ok" and event.attempt == 1
    event.mutate(sender)
    assert sender.outcome == "sent" and sender.attempts == 1
    # A new event is written as version 2, and reads back unchanged.
    sender = _challenged_sender()
    sender.record_sent(sender.challenge_id, timestamp=sender.since, relay="250", attempt=2)
    [new] = [e for e in sender.collect_events() if isinstance(e, Sender.ChallengeSent)][-1:]
    stored_new = mapper.to_stored_event(new)
    assert transcoder.decode(stored_new.state)["class_version"] == 2
    again = mapper.to_domain_event(stored_new)
    assert isinstance(again, Sender.ChallengeSent) and again.challenge_id == sender.challenge_id


def test_the_audit_refuses_a_challenge_transition_its_spec_does_not_declare() -> None:
    from sourceauth.engine.audit import check_events

    sender = _challenged_sender()
    sender.record_sent(sender.challenge_id, timestamp=sender.since, relay="250", attempt=1)
    events = sender.collect_events()
    assert check_events(enumerate(events, start=1)) is None
    # A second "sent" for the same challenge: legal for the sender machine, not the challenge's.
    forged = Sender.ChallengeSent(
        originator_id=sender.id,
        originator_version=sender.version + 1,
        timestamp=sender.since,
        challenge_id=sender.challenge_id,
        relay="250",
        attempt=2,
    )
    fault = check_events(enumerate([*events, forged], start=1))
    assert fault is not None and fault.position == 3
    assert "'sent' is not allowed from challenge state 'sent'" in fault.problem


def _accepted_message(now: datetime) -> Message:
    return Message._create(
        Message.Accepted,
        id=uuid.uuid4(),
        timestamp=now,
        receipt_id="r1",
        size=10,
        sha256="0" * 64,
        sender="a@x.test",
        sender_id="",
        recipients=["bob@example.test"],
        subject="hello",
        message_id_header="<1@x.test>",
        actor="engine",
        reason="sender_authorized",
        expires_at=0.0,
    )


def test_the_audit_refuses_an_event_after_a_final_state() -> None:
    from sourceauth.engine.audit import check_events

    now = datetime.now(UTC)
    msg = _accepted_message(now)
    delivered: dict[str, Any] = {
        "delivered": ["bob@example.test"],
        "rejected": [],
        "next_hop": "hop",
        "diagnostic": "",
    }
    msg.record_delivered(timestamp=now, **delivered)
    events = msg.collect_events()
    assert check_events(enumerate(events, start=1)) is None
    again = Message.Delivered(
        originator_id=msg.id, originator_version=3, timestamp=now, **delivered
    )
    fault = check_events(enumerate([*events, again], start=1))
    assert fault is not None and fault.position == 3
    assert "after its final state" in fault.problem


def test_the_audit_names_a_version_gap_a_wrong_machine_and_a_second_creation() -> None:
    """The walk keeps each live aggregate as one packed int (engine/audit.py): each field of
    it (version, machine, state, challenge state) is still checked."""
    import copy

    from sourceauth.engine.audit import check_events

    sender = _challenged_sender()
    sender.record_sent(sender.challenge_id, timestamp=sender.since, relay="250", attempt=1)
    events = sender.collect_events()
    assert check_events(enumerate(events, start=1)) is None

    skipped = copy.copy(events[-1])
    object.__setattr__(skipped, "originator_version", events[-1].originator_version + 1)
    fault = check_events(enumerate([*events[:-1], skipped], start=1))
    assert fault is not None and "version 3 does not follow 1" in fault.problem

    msg = _accepted_message(sender.since)
    created = msg.collect_events()[0]
    on_sender = copy.copy(events[-1])
    object.__setattr__(on_sender, "originator_id", created.originator_id)
    object.__setattr__(on_sender, "originator_version", 2)
    fault = check_events(enumerate([created, on_sender], start=1))
    assert fault is not None and fault.problem == "a sender event on a message"

    fault = check_events(enumerate([created, created], start=1))
    assert fault is not None and "already exists" in fault.problem
