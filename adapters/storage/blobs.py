"""The message blob store: one file per accepted message, durable before the filter says 250.

Files live at root/<key[:2]>/<key>, keyed by receipt id, written via root/tmp and renamed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from sourceauth.adapters.durable import fsync_all, fsync_dir, unlink_quietly, write_new_file
from sourceauth.engine.api import Blob
from sourceauth.engine.logs import get_logger
from sourceauth.engine.ports import (
    BlobCorrupt,
    BlobNotFound,
    BlobStoreUnavailable,
    StagedBlobs,
)

log = get_logger(__name__)

__all__ = ["BlobConflict", "FileBlobStore", "blob_ref", "check_key"]

_KEY = re.compile(r"[0-9a-f]{32}")
_FANOUT = re.compile(r"[0-9a-f]{2}")
_TMP = "tmp"  # never a fan-out name: those are two hex digits
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class BlobConflict(BlobStoreUnavailable):
    """A key is already stored with other content (errno EEXIST)."""


def check_key(key: str) -> str:
    """`key` if it is a blob key (a receipt id: 32 lowercase hex digits); ValueError if not."""
    if type(key) is not str or _KEY.fullmatch(key) is None:
        raise ValueError(f"bad blob key {key!r}: expected 32 lowercase hex digits")
    return key


def blob_ref(key: str, data: bytes) -> Blob:
    """What the events record about an original: its key, size and SHA-256."""
    return Blob(check_key(key), len(data), hashlib.sha256(data).hexdigest())


def _store_error(exc: OSError, what: str) -> BlobStoreUnavailable:
    message = f"{what}: {exc.strerror or exc}"
    if exc.filename is not None:
        return BlobStoreUnavailable(exc.errno, message, exc.filename)
    return BlobStoreUnavailable(exc.errno, message)


class FileBlobStore:
    """Blobs as files under `root`, durable (file and directory fsync) unless fsync=False.

    A write goes to root/tmp/<key>.<pid>.<random>.tmp, is fsync'd, renamed to
    root/<key[:2]>/<key> and the directory is fsync'd, so a blob is either absent or
    complete; temp files a crash leaves behind are never visible as blobs (see
    `cleanup_temp`). Re-putting a key with the same bytes is a no-op; with other bytes it
    raises BlobConflict. Two concurrent puts of one key with different bytes are not
    arbitrated (last rename wins): keys are receipt ids, unique per message.
    Every OSError surfaces as BlobStoreUnavailable; bad keys raise ValueError.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._tmp = self.root / _TMP
        try:
            if not self.root.is_dir():
                os.makedirs(self.root, mode=_DIR_MODE, exist_ok=True)
                os.chmod(self.root, _DIR_MODE)  # makedirs' mode is subject to the umask
            try:
                os.mkdir(self._tmp, _DIR_MODE)
            except FileExistsError:
                if not self._tmp.is_dir():
                    raise NotADirectoryError(
                        errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self._tmp)
                    ) from None
        except OSError as exc:
            raise _store_error(exc, f"cannot create blob store at {self.root}") from exc

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.root)!r}, fsync={self.fsync})"

    # ------------------------------------------------------------------------------ paths

    def path_of(self, key: str) -> Path:
        """The final path of `key` (whether or not it is stored)."""
        check_key(key)
        return self.root / key[:2] / key

    # ------------------------------------------------------------------------------ writes

    def stage(self, items: Sequence[tuple[str, bytes]]) -> StagedBlobs:
        """The port's stage: every original is durable on return (nothing rides with events)."""
        return StagedBlobs(tuple(self.put_many(items)))

    def put(self, key: str, data: bytes) -> Blob:
        """Store `data` under `key` durably; BlobStoreUnavailable (4xx) if it cannot."""
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[Blob]:
        """Store several blobs with one group fsync; refs in the order of `items`.

        Every file is written and fsync'd, then all are renamed, then each touched
        directory is fsync'd once. On failure the blobs this call created are removed
        again (best effort) and BlobStoreUnavailable is raised: all or nothing for the caller.
        """
        for key, _ in items:
            check_key(key)
        refs: list[Blob] = []
        staged: list[tuple[Path, Path]] = []  # (temp file, final path)
        created: list[Path] = []  # renamed into place by this call: staged[: len(created)]
        dirty: set[Path] = set()  # directories whose entries changed
        batch: dict[str, Blob] = {}
        try:
            for key, data in items:
                ref = blob_ref(key, data)
                refs.append(ref)
                seen = batch.get(key)
                if seen is not None:
                    if seen != ref:
                        raise BlobConflict(
                            errno.EEXIST, f"blob {key} given twice with different content"
                        )
                    continue
                batch[key] = ref
                final = self.root / key[:2] / key
                if self._matches_existing(final, ref):
                    dirty.add(final.parent)  # durable on return, even if its first put failed
                    continue
                if self._ensure_fanout(final.parent):
                    dirty.add(self.root)
                staged.append((self._write_temp(key, data), final))
            if self.fsync:
                fsync_all([tmp for tmp, _ in staged])
            for tmp, final in staged:
                os.replace(tmp, final)
                created.append(final)
                dirty.add(final.parent)
            if self.fsync:
                fsync_all(sorted(dirty), directory=True)
        except BaseException as exc:
            for tmp, _ in staged[len(created) :]:
                unlink_quietly(tmp)
            for final in created:
                unlink_quietly(final)
            if isinstance(exc, BlobStoreUnavailable | ValueError) or not isinstance(exc, OSError):
                raise
            log.warning("blob_put_failed", error=str(exc), batch=len(items))
            raise _store_error(exc, f"cannot store {len(items)} blob(s)") from exc
        return refs

    def _matches_existing(self, final: Path, ref: Blob) -> bool:
        """True if `final` already holds exactly these bytes; BlobConflict if other bytes."""
        try:
            with open(final, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                same = size == ref.size and hashlib.file_digest(f, "sha256").hexdigest() == (
                    ref.sha256
                )
        except FileNotFoundError:
            return False
        if not same:
            log.warning("blob_conflict", key=ref.key)
            raise BlobConflict(
                errno.EEXIST, f"blob {ref.key} already exists with different content", str(final)
            )
        return True

    def _ensure_fanout(self, directory: Path) -> bool:
        """Create root/<xx> if missing; True if this call created it."""
        try:
            os.mkdir(directory, _DIR_MODE)
        except FileExistsError:
            return False
        return True

    def _write_temp(self, key: str, data: bytes) -> Path:
        """An unsynced temp file with `data`: put_many fsyncs the whole batch at once."""
        tmp = self._tmp / f"{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        write_new_file(tmp, data, mode=_FILE_MODE, fsync=False)
        return tmp

    def replace_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Rewrite originals (key, old bytes, new bytes), each only if its file still holds the
        old bytes, by an fsync'd temp file renamed over it (a reader sees old or new, never a
        mix); how many were rewritten."""
        dirty: set[Path] = set()
        done = 0
        for key, old, new in items:
            final = self.path_of(key)
            try:
                if final.read_bytes() != old:
                    continue
            except FileNotFoundError:
                continue  # (purged meanwhile)
            except OSError as exc:
                raise _store_error(exc, f"cannot rewrite blob {key}") from exc
            tmp = self._write_temp(key, new)
            try:
                if self.fsync:
                    fsync_all([tmp])
                os.replace(tmp, final)
            except OSError as exc:
                unlink_quietly(tmp)
                raise _store_error(exc, f"cannot rewrite blob {key}") from exc
            dirty.add(final.parent)
            done += 1
        if self.fsync and dirty:
            fsync_all(sorted(dirty), directory=True)
        return done

    def delete(self, key: str) -> bool:
        """Remove a blob: True if removed, False if it was already gone. Durable."""
        path = self.path_of(key)
        try:
            os.unlink(path)
            if self.fsync:
                fsync_dir(path.parent)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _store_error(exc, f"cannot delete blob {key}") from exc
        return True

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete several blobs; how many were there."""
        return sum(self.delete(key) for key in keys)

    def cleanup_temp(self, older_than_seconds: float = 3600.0) -> int:
        """Remove temp files older than this (left by a crash mid-write); how many.

        Writes in progress are younger than any sane threshold: 0 removes those too.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        try:
            with os.scandir(self._tmp) as entries:
                for entry in entries:
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            raise _store_error(exc, "cannot clean blob temp files") from exc
        if removed:
            log.info("blob_temp_cleaned", removed=removed)
        return removed

    # ------------------------------------------------------------------------------ reads

    def get(self, key: str, *, verify_sha256: str | None = None) -> bytes:
        """The bytes of `key`; BlobNotFound, or BlobCorrupt if they fail `verify_sha256`."""
        path = self.path_of(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        except OSError as exc:
            raise _store_error(exc, f"cannot read blob {key}") from exc
        if verify_sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != verify_sha256.lower():
                log.error("blob_corrupt", key=key, expected=verify_sha256, actual=actual)
                raise BlobCorrupt(
                    f"blob {key} does not match its SHA-256 (expected {verify_sha256}, "
                    f"found {actual})"
                )
        return data

    def open(self, key: str) -> BinaryIO:
        """A binary file object on the blob (the caller closes it); BlobNotFound if absent."""
        path = self.path_of(key)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        except OSError as exc:
            raise _store_error(exc, f"cannot open blob {key}") from exc

    def exists(self, key: str) -> bool:
        """True if `key` is stored."""
        try:
            os.stat(self.path_of(key))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _store_error(exc, f"cannot stat blob {key}") from exc
        return True

    def keys(self) -> Iterator[str]:
        """Every stored key, sorted (temp files and stray names excluded)."""
        try:
            with os.scandir(self.root) as top:
                fanouts = sorted(e.name for e in top if _FANOUT.fullmatch(e.name) and e.is_dir())
            for name in fanouts:
                try:
                    with os.scandir(self.root / name) as entries:
                        found = sorted(
                            e.name
                            for e in entries
                            if e.name.startswith(name)
                            and _KEY.fullmatch(e.name)
                            and e.is_file(follow_symlinks=False)
                        )
                except FileNotFoundError:
                    continue
                yield from found
        except OSError as exc:
            raise _store_error(exc, f"cannot list blob store {self.root}") from exc
