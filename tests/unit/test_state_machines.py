"""The state machines of specs/ are the transition table of every aggregate.

Every declared edge is taken through the Sender and Message aggregates' own events, every
undeclared (state, trigger) pair of the full cross product is refused with IllegalTransition,
one transitions.Machine exists per kind (none per aggregate), and the diagram shows it all.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
import transitions

from sourceauth.engine.errors import IllegalTransition
from sourceauth.engine.message import Message
from sourceauth.engine.sender import Sender
from sourceauth.engine.statemachine import MACHINES, MESSAGE, SENDER, StateMachineSpec

AGGREGATES: dict[str, type[Any]] = {"sender": Sender, "message": Message}
CREATED: dict[str, type[Any]] = {"sender": Sender.Registered, "message": Message.Received}
# Fields every eventsourcing event has; the rest are the event's own.
_COMMON_FIELDS = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


def _event_classes(aggregate: type[Any]) -> dict[str, type[Any]]:
    """trigger -> the aggregate's (non-creation) event class that takes it."""
    found: dict[str, type[Any]] = {}
    for value in vars(aggregate).values():
        if isinstance(value, type) and issubclass(value, aggregate.Event) and value.trigger:
            assert value.trigger not in found, f"two events take trigger {value.trigger!r}"
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
    created = CREATED[kind]
    return AGGREGATES[kind]._create(created, id=uuid.uuid4(), **_kwargs(created, trigger=trigger))


def _paths(spec: StateMachineSpec) -> dict[str, tuple[str, ...]]:
    """The shortest non-empty trigger path from the initial state to every reachable state."""
    paths: dict[str, tuple[str, ...]] = {}
    queue: deque[tuple[str, tuple[str, ...]]] = deque([(spec.initial, ())])
    seen_paths: set[str] = set()
    while queue:
        state, path = queue.popleft()
        for t in spec.transitions:
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


@pytest.mark.parametrize("spec", [SENDER, MESSAGE], ids=lambda s: s.name)
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
        # The initial state is "before the first event": the creation event carries the trigger.
        if allowed:
            aggregate = _create(kind, trigger)
            assert aggregate.state == spec.next_state(state, trigger)
            assert aggregate.version == 1
        else:
            with pytest.raises(IllegalTransition) as refused:
                _create(kind, trigger)
            assert (refused.value.machine, refused.value.source, refused.value.trigger) == (
                kind,
                state,
                trigger,
            )
        if kind == "message":
            return  # a message never returns to its initial state; nothing more to try
    path = _paths(spec)[state]
    aggregate = _build(kind, path)
    assert aggregate.state == state
    events = _event_classes(AGGREGATES[kind])
    version, pending = aggregate.version, len(aggregate.pending_events)
    if allowed:
        aggregate.check(trigger)
        if trigger in events:
            aggregate.trigger_event(events[trigger], **_kwargs(events[trigger]))
            assert aggregate.state == spec.next_state(state, trigger)
            assert aggregate.version == version + 1
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
    for kind, spec in MACHINES.items():
        events = _event_classes(AGGREGATES[kind])
        for t in spec.transitions:
            assert t.trigger in events or t.source == spec.initial, f"{kind}: {t} has no event"


@pytest.mark.parametrize("kind", ["sender", "message"])
def test_replay_of_recorded_events_reaches_the_same_state(kind: str) -> None:
    spec = MACHINES[kind]
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
    assert isinstance(SENDER.machine, transitions.Machine)
    assert isinstance(MESSAGE.machine, transitions.Machine)
    assert SENDER.machine is not MESSAGE.machine
    assert SENDER.machine.models == [] and MESSAGE.machine.models == []

    built: list[object] = []
    original = transitions.Machine.__init__

    def counting(self: object, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transitions.Machine, "__init__", counting)
    aggregates = [_build(kind, path) for kind in MACHINES for path in _paths(MACHINES[kind]).values()]
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


@pytest.mark.parametrize("spec", [SENDER, MESSAGE], ids=lambda s: s.name)
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
