"""The hot path's random ids: drawn from one buffer of os.urandom bytes, never handed out twice,
not even by a forked child."""

from __future__ import annotations

import os
import uuid

from sourceauth.engine.ids import RandomPool, new_uuid4, random_bytes


def test_new_uuid4_is_a_version_4_random_uuid_like_uuid4() -> None:
    ids = [new_uuid4() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(i.version == 4 and i.variant == uuid.RFC_4122 for i in ids)


def test_pool_hands_out_each_byte_once_and_refills_when_empty() -> None:
    pool = RandomPool(size=64)
    chunks = [pool.take(10) for _ in range(20)]  # crosses three refills
    assert all(len(c) == 10 for c in chunks)
    assert len(set(chunks)) == len(chunks)


def test_a_request_larger_than_the_pool_is_served_whole() -> None:
    assert len(RandomPool(size=16).take(100)) == 100


def test_random_bytes_gives_the_count_asked() -> None:
    assert len(random_bytes(10)) == 10
    assert random_bytes(10) != random_bytes(10)


def test_forked_child_does_not_reuse_the_parents_buffered_bytes() -> None:
    random_bytes(1)  # the parent's pool now holds unread bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, then leave without running pytest's teardown
        os.close(read)
        os.write(write, new_uuid4().bytes)
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16
    assert new_uuid4().bytes != child
