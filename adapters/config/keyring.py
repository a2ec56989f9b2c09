"""The challenge keyring: read from the environment or the secret file, or created 0600.

Key material never reaches a message or a log; rotation (kids) is engine.tokens' format.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from sourceauth.adapters.config.schema import ChallengeConfig
from sourceauth.adapters.config.values import ConfigError
from sourceauth.adapters.durable import write_once
from sourceauth.engine.logs import get_logger
from sourceauth.engine.tokens import Keyring, generate_keyring, parse_keyring, render_keyring

log = get_logger(__name__)

_KEY = "challenge.secret_file"
_SECRET_MAX = 1 << 20  # a keyring is a few hundred bytes; anything this large is a mistake


def load_or_create_keyring(cfg: ChallengeConfig, environ: Mapping[str, str]) -> Keyring:
    """The token keyring: from env var cfg.secret_env if set, else cfg.secret_file.

    A missing file is created with mode 0600 (parents 0700) from a new random keyring. A file
    readable by group or others is made 0600 (logged: `store_file_tightened`; the key may have
    been read: rotate it); one writable by them is refused. Errors never contain key material.
    """
    if cfg.secret_env in environ:
        text = environ[cfg.secret_env]
        if not text.strip():
            raise ConfigError(f"environment variable {cfg.secret_env} is set but empty")
        return _parse_secret(text, f"environment variable {cfg.secret_env}")
    path = cfg.secret_file
    if path is None:
        raise ConfigError(f"{_KEY}: not set")
    try:
        return _read_secret_file(path)
    except FileNotFoundError:
        pass
    return _create_secret_file(path)


def _parse_secret(text: str, where: str) -> Keyring:
    try:
        return parse_keyring(text)
    except ValueError as error:
        # parse_keyring's messages name the line, never the key material.
        raise ConfigError(f"{where}: not a valid keyring: {error}") from None


def _read_secret_file(path: Path) -> Keyring:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; no effect on a regular file.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigError(f"{_KEY}: {path} is a symlink; name the file itself") from None
        raise ConfigError(f"{_KEY}: cannot open {path} ({error.strerror})") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"{_KEY}: {path} is {_kind(status.st_mode)}, not a regular file")
        if status.st_mode & 0o022:
            raise ConfigError(
                f"{_KEY}: {path} is writable by group or others, so its key may not be ours "
                f"(mode {status.st_mode & 0o777:04o}); check it, then run: chmod 600 {path}"
            )
        if status.st_mode & 0o055:
            # Readable by others: made private at once (on the open file, no race), and said.
            before = stat.S_IMODE(status.st_mode)
            os.fchmod(descriptor, before & 0o700)
            log.warning(
                "store_file_tightened",
                file=str(path),
                mode_before=f"{before:04o}",
                mode_after=f"{before & 0o700:04o}",
                group="",
            )
        if status.st_size > _SECRET_MAX:
            raise ConfigError(f"{_KEY}: {path} is too large for a keyring ({status.st_size} bytes)")
        data = _read_all(descriptor)
    except OSError as error:
        raise ConfigError(f"{_KEY}: cannot read {path} ({error.strerror})") from None
    finally:
        os.close(descriptor)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{_KEY}: {path} is not a valid keyring (not UTF-8 text)") from None
    return _parse_secret(text, f"{_KEY}: {path}")


def _read_all(descriptor: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(descriptor, 65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > _SECRET_MAX:
            raise ConfigError(f"{_KEY}: the file is too large for a keyring")
    return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


def _create_secret_file(path: Path) -> Keyring:
    keyring = generate_keyring()
    data = render_keyring(keyring).encode("utf-8")
    try:
        _make_private_dirs(path.parent)
        # Readers never see a partial file; a process racing us keeps whichever keyring won.
        if not write_once(path, data, mode=0o600):
            return _read_secret_file(path)
    except OSError as error:
        raise ConfigError(f"{_KEY}: cannot create {path} ({error.strerror})") from None
    return keyring


def _make_private_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        created.mkdir(mode=0o700, exist_ok=True)
