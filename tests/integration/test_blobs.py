"""The blob stores: FileBlobStore on a real temporary directory (durability layout, idempotence,
errors, GC listing) and both stores through the BlobStore port.

We run as root, so unwritable places are simulated with a regular file where a directory should be.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sourceauth.adapters.storage.blobs import BlobConflict, FileBlobStore
from sourceauth.adapters.storage.dbblobs import DatabaseBlobStore
from sourceauth.adapters.storage.postgres import PostgresBlobStore
from sourceauth.adapters.storage.wiring import open_engine
from sourceauth.engine.api import Blob
from sourceauth.engine.ports import (
    BlobCorrupt,
    BlobError,
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
)
from sourceauth.engine.tokens import generate_keyring
from tests.conftest import settings_for
from tests.integration.pg import fresh_schema


def key() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temp_files(store: FileBlobStore) -> list[str]:
    return sorted(os.listdir(store.root / "tmp"))


def test_root_is_created_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "blobs"
    FileBlobStore(root)
    assert root.is_dir() and mode(root) == 0o700
    assert (root / "tmp").is_dir() and mode(root / "tmp") == 0o700


def test_put_get_round_trip_with_layout_and_modes(store: FileBlobStore) -> None:
    k, data = key(), b"From: a@example.org\r\n\r\nhello\r\n"
    ref = store.put(k, data)
    assert ref == Blob(k, len(data), hashlib.sha256(data).hexdigest())
    assert store.path_of(k) == store.root / k[:2] / k
    assert store.path_of(k).read_bytes() == data
    assert mode(store.path_of(k)) == 0o600 and mode(store.path_of(k).parent) == 0o700
    assert store.get(k) == data
    assert store.get(k, verify_sha256=ref.sha256) == data
    assert store.get(k, verify_sha256=ref.sha256.upper()) == data
    assert store.exists(k)
    with store.open(k) as f:
        assert f.read() == data
    assert temp_files(store) == []


def test_empty_blob(store: FileBlobStore) -> None:
    k = key()
    assert store.put(k, b"").size == 0
    assert store.get(k, verify_sha256=hashlib.sha256(b"").hexdigest()) == b""


def test_repeat_put_with_same_content_is_a_no_op(store: FileBlobStore) -> None:
    k = key()
    first = store.put(k, b"same")
    inode = store.path_of(k).stat().st_ino
    assert store.put(k, b"same") == first
    assert store.path_of(k).stat().st_ino == inode, "not rewritten"
    assert list(store.keys()) == [k]


@pytest.mark.parametrize("other", [b"diff", b"longer content", b""], ids=repr)
def test_repeat_put_with_other_content_raises(store: FileBlobStore, other: bytes) -> None:
    k = key()
    store.put(k, b"same")
    with pytest.raises(BlobStoreUnavailable) as info:
        store.put(k, other)
    assert isinstance(info.value, BlobConflict) and info.value.errno == errno.EEXIST
    assert store.get(k) == b"same"
    assert temp_files(store) == []


def test_corruption_is_detected_when_verifying(store: FileBlobStore) -> None:
    k = key()
    ref = store.put(k, b"original bytes")
    store.path_of(k).write_bytes(b"original bytez")
    assert store.get(k) == b"original bytez", "no check unless asked"
    with pytest.raises(BlobCorrupt, match=k):
        store.get(k, verify_sha256=ref.sha256)


def test_missing_blob(store: FileBlobStore) -> None:
    k = key()
    with pytest.raises(BlobNotFound):
        store.get(k)
    with pytest.raises(KeyError):
        store.open(k)
    assert not store.exists(k)


def test_delete_is_idempotent(store: FileBlobStore) -> None:
    k = key()
    store.put(k, b"x")
    assert store.delete(k) is True
    assert not store.exists(k) and not store.path_of(k).exists()
    assert store.delete(k) is False
    assert store.delete(key()) is False
    store.put(k, b"y")  # the key can be reused after deletion
    assert store.get(k) == b"y"


def test_keys_lists_every_blob_and_nothing_else(store: FileBlobStore) -> None:
    stored = {key() for _ in range(50)}
    for k in stored:
        store.put(k, k.encode())
    # things that are not blobs: a temp file, stray names, a misplaced key, a directory
    (store.root / "tmp" / f"{key()}.1.abcd.tmp").write_bytes(b"partial")
    (store.root / "README").write_text("not a blob")
    (store.root / "zz").mkdir()
    (store.root / "zz" / ("0" * 32)).write_bytes(b"bad fan-out")
    misplaced = "ab" + "c" * 30
    (store.root / "cd").mkdir(exist_ok=True)
    (store.root / "cd" / misplaced).write_bytes(b"wrong directory")
    (store.root / "ef").mkdir(exist_ok=True)
    (store.root / "ef" / ("ef" + "0" * 30 + ".tmp")).write_bytes(b"x")
    (store.root / "ef" / ("ef" + "1" * 30)).mkdir()
    listed = list(store.keys())
    assert listed == sorted(stored)


def test_keys_on_an_empty_store(store: FileBlobStore) -> None:
    assert list(store.keys()) == []


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "0" * 31,
        "0" * 33,
        "A" * 32,
        "g" * 32,
        "../" + "0" * 29,
        "0" * 30 + "/x",
        "0" * 32 + "\n",
        "\u0660" * 32,  # Arabic-Indic digits match \d, not [0-9]
        str(uuid.uuid4()),
        None,
        b"0" * 32,
    ],
    ids=repr,
)
def test_bad_keys_are_rejected_everywhere(store: FileBlobStore, bad: Any) -> None:
    for call in (
        lambda: store.put(bad, b"x"),
        lambda: store.put_many([(key(), b"ok"), (bad, b"x")]),
        lambda: store.get(bad),
        lambda: store.open(bad),
        lambda: store.exists(bad),
        lambda: store.delete(bad),
        lambda: store.path_of(bad),
    ):
        with pytest.raises(ValueError, match="bad blob key"):
            call()
    assert list(store.keys()) == [], "put_many validates every key before writing any"


def test_temp_files_are_invisible_and_cleaned_by_age(store: FileBlobStore) -> None:
    k = key()
    old = store.root / "tmp" / f"{k}.123.dead.tmp"
    young = store.root / "tmp" / f"{key()}.124.beef.tmp"
    old.write_bytes(b"crashed mid-write")
    young.write_bytes(b"in progress")
    an_hour_ago = time.time() - 3700
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert not store.exists(k) and list(store.keys()) == []
    with pytest.raises(BlobNotFound):
        store.get(k)
    assert store.cleanup_temp(3600) == 1
    assert temp_files(store) == [young.name]
    assert store.cleanup_temp(0) == 1
    assert temp_files(store) == []
    assert store.cleanup_temp() == 0


def test_put_many_stores_all_in_order(store: FileBlobStore) -> None:
    items = [(key(), os.urandom(n)) for n in (0, 1, 100, 70_000)]
    refs = store.put_many(items)
    assert [r.key for r in refs] == [k for k, _ in items]
    for (k, data), ref in zip(items, refs, strict=True):
        assert ref.size == len(data) and ref.sha256 == hashlib.sha256(data).hexdigest()
        assert store.get(k, verify_sha256=ref.sha256) == data
    assert sorted(store.keys()) == sorted(k for k, _ in items)
    assert store.put_many([]) == []
    assert temp_files(store) == []


def test_put_many_with_repeats_and_existing_keys(store: FileBlobStore) -> None:
    a, b = key(), key()
    store.put(a, b"A")
    refs = store.put_many([(a, b"A"), (b, b"B"), (b, b"B")])
    assert [r.key for r in refs] == [a, b, b] and refs[1] == refs[2]
    with pytest.raises(BlobConflict):
        store.put_many([(key(), b"1"), (b, b"other")])
    c = key()
    with pytest.raises(BlobConflict):
        store.put_many([(c, b"1"), (c, b"2")])
    assert sorted(store.keys()) == sorted([a, b]), "a failed batch leaves nothing behind"
    assert temp_files(store) == []


def test_put_many_group_fsync(store: FileBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file fsync'd before any rename; each touched directory fsync'd once, after."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    keys = ["aa" + "0" * 30, "aa" + "1" * 30, "bb" + "0" * 30]
    store.put_many([(k, k.encode()) for k in keys])
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fsync"] * 3 + ["replace"] * 3 + ["fsync"] * 3
    synced_dirs = sorted(path for kind, path in calls[6:])
    root = str(store.root.resolve())
    assert synced_dirs == sorted([root, f"{root}/aa", f"{root}/bb"]), "new fan-outs: root too"

    calls.clear()
    store.put("aa" + "2" * 30, b"x")  # existing fan-out: the root is not fsync'd again
    assert [p for kind, p in calls if kind == "fsync"][1:] == [f"{root}/aa"]

    calls.clear()
    store.delete(keys[0])
    assert calls == [("fsync", f"{root}/aa")]


def test_no_fsync_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = FileBlobStore(tmp_path / "fast", fsync=False)

    def fail(fd: int) -> None:
        raise AssertionError("fsync called")

    monkeypatch.setattr(os, "fsync", fail)
    k = key()
    fast.put_many([(k, b"x"), (key(), b"y")])
    assert fast.get(k) == b"x" and fast.delete(k)


def test_root_under_a_regular_file_gives_blob_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(BlobStoreUnavailable) as info:
        FileBlobStore(blocker / "blobs")
    assert info.value.errno == errno.ENOTDIR
    assert "Not a directory" in str(info.value)


def test_unwritable_fan_out_gives_blob_store_error_and_no_debris(store: FileBlobStore) -> None:
    (store.root / "ab").write_bytes(b"a file where the fan-out directory should be")
    good, bad = "cd" + "0" * 30, "ab" + "0" * 30
    with pytest.raises(BlobStoreUnavailable) as info:
        store.put_many([(good, b"ok"), (bad, b"x")])
    assert info.value.errno == errno.ENOTDIR and not isinstance(info.value, BlobConflict)
    assert list(store.keys()) == [] and temp_files(store) == [], "all or nothing"
    with pytest.raises(BlobStoreUnavailable):
        store.get(bad)  # reading through a file is trouble, not "not found"
    with pytest.raises(BlobStoreUnavailable):
        store.delete(bad)


def test_disk_full_maps_to_blob_store_error(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    writes = 0

    def write(fd: int, data: Any) -> int:
        nonlocal writes
        writes += 1
        if writes > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    first = key()
    with pytest.raises(BlobStoreUnavailable) as info:
        store.put_many([(first, b"fits"), (key(), b"does not fit")])
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value)
    assert temp_files(store) == [] and list(store.keys()) == []
    monkeypatch.setattr(os, "write", real_write)
    assert store.put(first, b"fits").size == 4, "usable again once space is back"


def test_short_writes_are_completed(store: FileBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def dribble(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", dribble)
    k, data = key(), os.urandom(1000)
    store.put(k, data)
    assert store.get(k) == data


def test_blob_store_error_is_an_os_error() -> None:
    assert issubclass(BlobStoreUnavailable, OSError) and issubclass(
        BlobConflict, BlobStoreUnavailable
    )
    assert issubclass(BlobNotFound, KeyError) and issubclass(BlobCorrupt, ValueError)


@given(data=st.binary(max_size=5000))
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_property_round_trip_of_arbitrary_bytes(store: FileBlobStore, data: bytes) -> None:
    k = key()
    ref = store.put(k, data)
    assert ref.size == len(data) and ref.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get(k, verify_sha256=ref.sha256) == data
    assert store.put(k, data) == ref
    assert store.delete(k)


# --------------------------------------------------------------------------------------------
# The BlobStore port, on both stores


@pytest.fixture(params=["files", "database", "postgresql"])
def port_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "files":
        yield FileBlobStore(tmp_path / "blobs")
        return
    if request.param == "postgresql":
        with fresh_schema() as pg:
            app = open_engine(  # creates the schema's tables, the originals' one among them
                settings=settings_for(), keyring=generate_keyring(), storage=pg.storage(tmp_path)
            )
            assert isinstance(app.blobs, PostgresBlobStore)
            yield app.blobs
            app.close()
            app.blobs.close()
        return
    db = DatabaseBlobStore(tmp_path / "sourceauth.db")
    yield db
    db.close()


def test_file_store_stage_makes_every_original_durable_before_the_events(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    items = [(key(), b"first\r\n"), (key(), b"second\r\n")]
    staged = store.stage(items)
    assert staged.blobs == tuple(Blob(k, len(d), hashlib.sha256(d).hexdigest()) for k, d in items)
    assert staged.with_events == ()
    assert [store.get(k) for k, _ in items] == [d for _, d in items]


def test_database_store_stage_hands_the_originals_to_the_event_transaction(tmp_path: Path) -> None:
    store = DatabaseBlobStore(tmp_path / "sourceauth.db")
    items = [(key(), b"first\r\n"), (key(), b"second\r\n")]
    staged = store.stage(items)
    assert staged.blobs == tuple(Blob(k, len(d), hashlib.sha256(d).hexdigest()) for k, d in items)
    assert staged.with_events == tuple(items)
    assert staged.with_events_for(items[1][0]) == (items[1],)
    assert not any(store.exists(k) for k, _ in items)  # written by the event recorder, not here
    store.close()


def test_port_reads_back_checks_and_deletes(port_store: BlobStore) -> None:
    k, data = key(), b"Subject: hi\r\n\r\nbody\r\n"
    _put(port_store, k, data)
    assert port_store.exists(k)
    assert port_store.get(k, verify_sha256=hashlib.sha256(data).hexdigest().upper()) == data
    with pytest.raises(BlobCorrupt) as corrupt:
        port_store.get(k, verify_sha256=hashlib.sha256(b"other").hexdigest())
    assert isinstance(corrupt.value, BlobError)
    assert port_store.delete(k) is True
    assert port_store.delete(k) is False
    assert not port_store.exists(k)
    with pytest.raises(BlobNotFound) as missing:
        port_store.get(k)
    assert isinstance(missing.value, BlobError)
    others = [key(), key()]
    for other in others:
        _put(port_store, other, b"x")
    assert port_store.delete_many([*others, key()]) == 2


def test_port_refuses_a_bad_key(port_store: BlobStore) -> None:
    for call in (port_store.exists, port_store.get, port_store.delete):
        with pytest.raises(ValueError):
            call("../etc/passwd")
    with pytest.raises(ValueError):
        port_store.stage([("not-a-key", b"x")])


def test_storage_trouble_is_blob_store_unavailable(tmp_path: Path) -> None:
    files = FileBlobStore(tmp_path / "blobs")
    k = key()
    (files.root / k[:2]).write_bytes(b"a file where the fan-out directory should be")
    with pytest.raises(BlobStoreUnavailable) as put_failed:
        files.stage([(k, b"x")])
    assert isinstance(put_failed.value, BlobError)
    db = DatabaseBlobStore(tmp_path / "sourceauth.db")
    db.close()
    for call in (db.exists, db.get, db.delete):
        with pytest.raises(BlobStoreUnavailable):
            call(key())


def test_an_unreachable_postgresql_is_blob_store_unavailable_within_seconds() -> None:
    store = PostgresBlobStore("host=127.0.0.1 port=1 dbname=test user=postgres connect_timeout=5")
    started = time.monotonic()
    for call in (store.exists, store.get, store.delete):
        with pytest.raises(BlobStoreUnavailable) as down:
            call(key())
        assert "127.0.0.1" in str(down.value)
    assert time.monotonic() - started < 15  # three tries, each well inside its 5 s bound


def _put(store: BlobStore, k: str, data: bytes) -> None:
    """Store an original as the group commit would: staged, then written with the events."""
    staged = store.stage([(k, data)])
    if staged.with_events:
        assert isinstance(store, DatabaseBlobStore | PostgresBlobStore)
        store.put_many(list(staged.with_events))  # what the event recorder does in its transaction
