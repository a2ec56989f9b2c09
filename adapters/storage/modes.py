"""Who may read the store's files: the owner alone (files 0600, directories 0700) or, with
`[storage] group`, that group too (0640 and 0750, chowned to it). A store file found wider at
start is tightened to that, and the log says so (`store_file_tightened`).
"""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sourceauth.engine.logs import get_logger

log = get_logger(__name__)

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnknownGroup(ValueError):
    """`[storage] group` names no group of this system."""


@dataclass(frozen=True)
class FileModes:
    """The modes (and group) store files and directories are created with."""

    gid: int | None = None
    group: str = ""

    @classmethod
    def for_group(cls, name: str) -> FileModes:
        if not name:
            return cls()
        try:
            return cls(grp.getgrnam(name).gr_gid, name)
        except KeyError:
            raise UnknownGroup(f"storage.group: no group named {name!r} on this system") from None

    @property
    def file(self) -> int:
        return 0o600 if self.gid is None else 0o640

    @property
    def directory(self) -> int:
        return 0o700 if self.gid is None else 0o750

    def make_dirs(self, directory: Path) -> None:
        """Create `directory` and its missing parents with the directory mode (and group);
        existing directories are left as they are."""
        missing: list[Path] = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for created in reversed(missing):
            try:
                created.mkdir(mode=self.directory)
            except FileExistsError:
                continue
            self._own(created, self.directory)

    def create_file(self, path: Path) -> bool:
        """Create an empty file with the file mode (and group), whatever the umask; False when
        it exists already (then it is tightened instead)."""
        self.make_dirs(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, self.file)
        except FileExistsError:
            self.tighten(path)
            return False
        try:
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.file)  # the umask may have taken the group's bit
        finally:
            os.close(fd)
        return True

    def tighten(self, path: Path, *, most: int | None = None) -> None:
        """Bring an existing regular file to at most the file mode (or `most`), and into the
        group when one is configured; say so in the log. A missing file is left missing."""
        try:
            status = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(status.st_mode):
            return
        before = stat.S_IMODE(status.st_mode)
        allowed = self.file if most is None else most
        after = before & allowed
        regroup = self.gid is not None and most is None and status.st_gid != self.gid
        if after == before and not regroup:
            return
        if regroup:
            os.chown(path, -1, self.gid, follow_symlinks=False)  # type: ignore[arg-type]
        os.chmod(path, after, follow_symlinks=False)
        log.warning(
            "store_file_tightened",
            file=str(path),
            mode_before=f"{before:04o}",
            mode_after=f"{after:04o}",
            group=self.group if regroup else "",
        )

    def _own(self, path: Path, mode: int) -> None:
        if self.gid is not None:
            os.chown(path, -1, self.gid)
        os.chmod(path, mode)
