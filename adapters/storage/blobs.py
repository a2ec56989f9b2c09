"""The message blob store: one file per accepted message, fsync'd before the filter says 250.

Keyed by the receipt id (so deleting one original never removes another's), verified by SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_KEY = re.compile(r"^[0-9a-f]{32}$")
_TMP = "tmp"


@dataclass(frozen=True)
class BlobRef:
    key: str
    size: int
    sha256: str


class BlobStoreError(OSError):
    """Storage trouble (disk full, permissions): the SMTP side answers 4xx."""


class BlobNotFound(KeyError):
    pass


class BlobCorrupt(ValueError):
    pass


def _check(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"bad blob key {key!r}: expected 32 lowercase hex characters")
    return key


class FileBlobStore:
    """root/<key[:2]>/<key>; writes go to root/tmp first, then rename, then directory fsync."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        try:
            (self.root / _TMP).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise BlobStoreError(
                exc.errno, f"cannot create blob store at {self.root}: {exc.strerror}"
            ) from exc

    def path_of(self, key: str) -> Path:
        _check(key)
        return self.root / key[:2] / key

    def _fsync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_tmp(self, key: str, data: bytes) -> Path:
        tmp = self.root / _TMP / f"{key}.{os.getpid()}.{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def put(self, key: str, data: bytes) -> BlobRef:
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[BlobRef]:
        """Write every blob, fsync each file, rename all, then fsync each touched directory once."""
        refs: list[BlobRef] = []
        dirs: set[Path] = set()
        try:
            staged: list[tuple[Path, Path]] = []
            for key, data in items:
                final = self.path_of(key)
                digest = hashlib.sha256(data).hexdigest()
                refs.append(BlobRef(key, len(data), digest))
                if final.exists():
                    if hashlib.sha256(final.read_bytes()).hexdigest() != digest:
                        raise BlobStoreError(f"blob {key} already exists with other content")
                    continue
                if not final.parent.exists():
                    final.parent.mkdir(mode=0o700, exist_ok=True)
                    dirs.add(self.root)
                staged.append((self._write_tmp(key, data), final))
            for tmp, final in staged:
                os.replace(tmp, final)
                dirs.add(final.parent)
            for d in dirs:
                self._fsync_dir(d)
        except BlobStoreError:
            raise
        except OSError as exc:
            raise BlobStoreError(exc.errno, f"blob store write failed: {exc.strerror}") from exc
        return refs

    def get(self, key: str, *, verify_sha256: str | None = None) -> bytes:
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        except OSError as exc:
            raise BlobStoreError(exc.errno, f"blob {key} unreadable: {exc.strerror}") from exc
        if verify_sha256 is not None and hashlib.sha256(data).hexdigest() != verify_sha256:
            raise BlobCorrupt(f"blob {key} does not match its recorded SHA-256")
        return data

    def exists(self, key: str) -> bool:
        return self.path_of(key).exists()

    def delete(self, key: str) -> bool:
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise BlobStoreError(exc.errno, f"blob {key} not deleted: {exc.strerror}") from exc
        self._fsync_dir(path.parent)
        return True

    def keys(self) -> Iterator[str]:
        for sub in sorted(self.root.iterdir()):
            if sub.name == _TMP or not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if _KEY.match(f.name):
                    yield f.name

    def cleanup_temp(self, older_than_seconds: float = 3600.0) -> int:
        """Remove temp files a crash left behind; they were never acknowledged."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        for f in (self.root / _TMP).iterdir():
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
