"""collector_paused: the cyclic collector off inside, back as it was after, whoever nests."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from sourceauth.engine.collector import collector_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_and_on_again_after() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()


def test_an_application_that_turned_it_off_keeps_it_off() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_on_again_after_an_exception() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a unit of work failed")
    assert gc.isenabled()


def test_two_threads_one_leaving_first_leave_it_off_for_the_other() -> None:
    gc.enable()
    inside, leave_first = threading.Barrier(2), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with collector_paused():
            inside.wait()
        leave_first.set()

    def second() -> None:
        with collector_paused():
            inside.wait()
            leave_first.wait(10)
            seen.append(gc.isenabled())  # the first has left: still paused for this one

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [False] and gc.isenabled()


def test_garbage_in_cycles_made_inside_is_collected_after() -> None:
    import weakref

    class Node:
        other: object = None

    gc.enable()
    with collector_paused():
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None  # a cycle: reference counting alone cannot free it
    gc.collect()
    assert gone() is None
