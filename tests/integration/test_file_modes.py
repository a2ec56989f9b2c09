"""Issue 7: store files readable by other users. `sourceauth` commands run as subprocesses on
a real file system, under umask 0: the SQLite file (and its -wal, -shm) is 0600, or 0640 in
`[storage] group`; a wider file found at start is tightened and logged.
"""

from __future__ import annotations

import grp
import json
import os
import stat
from pathlib import Path

import pytest

from tests.integration.test_crash_safety import cli

# A group of this system that is not the test process's own (so a chown shows).
GROUP = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())


def config_for(tmp_path: Path, data: Path, group: str | None) -> Path:
    config = tmp_path / "sourceauth.toml"
    storage = f'[storage]\ngroup = "{group}"\n' if group else ""
    config.write_text(
        f'[server]\ndata_dir = "{data}"\n{storage}[logging]\nformat = "json"\nlevel = "info"\n',
        encoding="utf-8",
    )
    return config


def run(config: Path, *args: str) -> str:
    umask = os.umask(0)  # inherited by the command: nothing may rely on the operator's umask
    try:
        done = cli(config, *args)
    finally:
        os.umask(umask)
    assert done.returncode == 0, done.stderr
    return done.stderr


def store_files(data: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in data.iterdir() if p.name.startswith("sourceauth.db")}


def tightened(stderr: str) -> dict[str, dict[str, str]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return {
        Path(e["file"]).name: e for e in lines if e.get("event") == "store_file_tightened"
    }


def test_store_files_are_0640_in_the_configured_group(tmp_path: Path) -> None:
    data = tmp_path / "var"  # created by the command
    config = config_for(tmp_path, data, GROUP.gr_name)
    run(config, "senders", "allow", "a@b.example")
    files = store_files(data)
    assert "sourceauth.db" in files
    for name, status in files.items():
        assert stat.S_IMODE(status.st_mode) == 0o640, name
        assert status.st_gid == GROUP.gr_gid, name
    directory = data.stat()
    assert (stat.S_IMODE(directory.st_mode), directory.st_gid) == (0o750, GROUP.gr_gid)
    assert stat.S_IMODE((data / "secret").stat().st_mode) == 0o600  # key material: owner only


@pytest.mark.parametrize("group", [None, GROUP.gr_name])
def test_a_world_readable_database_and_secret_are_tightened_at_start(
    tmp_path: Path, group: str | None
) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    before = config_for(tmp_path, data, None)
    run(before, "senders", "allow", "a@b.example")  # as an older version left them: then 0644
    (data / "sourceauth.db").chmod(0o644)
    (data / "secret").chmod(0o644)
    config = config_for(tmp_path, data, group)
    logged = tightened(run(config, "senders", "list"))
    want = 0o600 if group is None else 0o640
    db = (data / "sourceauth.db").stat()
    assert stat.S_IMODE(db.st_mode) == want
    assert stat.S_IMODE((data / "secret").stat().st_mode) == 0o600
    assert logged["sourceauth.db"]["mode_before"] == "0644"
    assert logged["sourceauth.db"]["mode_after"] == f"{want:04o}"
    assert logged["secret"]["mode_after"] == "0600"
    if group is not None:
        assert db.st_gid == GROUP.gr_gid
        assert logged["sourceauth.db"]["group"] == group
    # Once tight, a start says nothing more.
    assert tightened(run(config, "senders", "list")) == {}


def test_an_unknown_group_is_a_one_line_configuration_error(tmp_path: Path) -> None:
    config = config_for(tmp_path, tmp_path / "var", "no-such-group-here")
    done = cli(config, "senders", "allow", "friend@partner.example")  # a command that would write
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "sourceauth: error: storage.group: no group named 'no-such-group-here' on this system"
    ]
    assert not (tmp_path / "var").exists()
