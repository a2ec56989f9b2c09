"""Every CLI command logs as [logging] says, to stderr only: stdout stays the command's output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.integration import test_cli

BASE = (
    '[server]\ndata_dir = "./var"\nhostname = "mx.example.test"\n'
    '[policy]\nprotected = ["example.test"]\n'
)


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return test_cli.run(*args, "--config", str(config))


def write(tmp_path: Path, logging: str) -> Path:
    path = tmp_path / "sourceauth.toml"
    path.write_text(BASE + logging, encoding="utf-8")
    return path


def test_json_logging_goes_to_stderr_and_list_json_stays_pure_json(tmp_path: Path) -> None:
    config = write(tmp_path, '[logging]\nformat = "json"\nlevel = "debug"\n')
    allowed = run(config, "senders", "allow", "a@b.example")
    assert allowed.returncode == 0, allowed.stderr
    logged = [json.loads(line) for line in allowed.stderr.splitlines()]
    assert logged and all(entry["level"] in ("debug", "info") for entry in logged)
    assert any(entry.get("sender") == "a@b.example" for entry in logged)
    listed = run(config, "senders", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [row["address"] for row in json.loads(listed.stdout)] == ["a@b.example"]


def test_console_format_is_followed_by_operator_commands(tmp_path: Path) -> None:
    config = write(tmp_path, '[logging]\nformat = "console"\nlevel = "info"\n')
    allowed = run(config, "senders", "block", "x@y.example")
    assert allowed.returncode == 0, allowed.stderr
    assert "[info" in allowed.stderr and "x@y.example" in allowed.stderr
    assert not allowed.stderr.lstrip().startswith("{")


def test_level_error_keeps_a_command_quiet(tmp_path: Path) -> None:
    config = write(tmp_path, '[logging]\nlevel = "error"\n')
    allowed = run(config, "senders", "allow", "a@b.example")
    assert allowed.returncode == 0 and allowed.stderr == ""


def test_a_bad_logging_key_exits_2_naming_it(tmp_path: Path) -> None:
    config = write(tmp_path, '[logging]\nlevel = "verbose"\n')
    out = run(config, "senders", "list", "--json")
    assert out.returncode == 2 and out.stdout == ""
    assert (
        'logging.level: must be "debug", "info", "warning" or "error", got "verbose"' in out.stderr
    )
