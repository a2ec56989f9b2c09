"""What an operator installs around `serve`: the systemd unit (checked by systemd-analyze verify),
`[logging] file` reopened on SIGHUP as logrotate expects, and the start-up line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.smtp_harness import free_port
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "sourceauth.service"
LOGROTATE = ROOT / "contrib" / "logrotate" / "sourceauth"


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        reason = (
            "systemd-analyze is not installed (Debian package `systemd`; .ci/run installs it), "
            "so contrib/systemd/sourceauth.service was NOT verified"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    # verify checks that ExecStart exists: point it at this environment's command.
    command = Path(sys.executable).with_name("sourceauth")
    assert command.exists(), f"{command} missing: install the package (make venv)"
    unit = tmp_path / "sourceauth.service"
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/sourceauth", str(command)),
        encoding="utf-8",
    )
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Lines about other units on this host (not ours) are not our business.
    ours = [line for line in done.stderr.splitlines() if "sourceauth.service" in line]
    assert done.returncode == 0 and not ours, done.stderr


def test_systemd_unit_runs_as_a_dedicated_user_hardened_and_restarting() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["User"] == ["sourceauth"] and settings["Group"] == ["sourceauth"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictSUIDSGID"):
        assert settings[option] == ["yes"], option
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["StateDirectory"] == ["sourceauth"]
    rotate = [
        line.strip()
        for line in LOGROTATE.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert "copytruncate" not in rotate  # SIGHUP reopens: nothing lost between move and reopen
    assert "create 0640 sourceauth sourceauth" in rotate
    assert any("--signal=HUP" in line for line in rotate)


def test_serve_logs_to_its_file_and_reopens_it_on_sighup(tmp_path: Path) -> None:
    log_file = tmp_path / "log" / "sourceauth.log"
    config = tmp_path / "sourceauth.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{free_port()}"\nhostname = "mx.example.test"\n'
        f'data_dir = "{tmp_path / "var"}"\n'
        '[policy]\nprotected = ["example.test"]\n'
        f'[logging]\nfile = "{log_file}"\n',
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sourceauth.adapters.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def events(path: Path) -> list[dict[str, object]]:
            if not path.exists():
                return []
            return [json.loads(line) for line in path.read_text().splitlines() if line]

        def named(path: Path, name: str) -> list[dict[str, object]]:
            return [e for e in events(path) if e["event"] == name]

        wait_until(lambda: named(log_file, "workers_started"), message="serve to start")
        started = named(log_file, "filter_started")[0]
        assert started["config_file"] == str(config)
        assert started["store"] == f"sqlite:///{tmp_path / 'var' / 'sourceauth.db'}"
        assert started["protected"] == ["example.test"]
        assert started["next_hop"] == f"maildir:{tmp_path / 'var' / 'mail'}"
        assert started["log_file"] == str(log_file)
        secret = (tmp_path / "var" / "secret").read_text().split()
        assert not any(len(word) >= 32 and word in log_file.read_text() for word in secret)

        rotated = log_file.with_name("sourceauth.log.1")
        log_file.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        # Both processes (SMTP and workers) reopen: each writes its first line to the new file.
        wait_until(
            lambda: len(named(log_file, "log_reopened")) == 2, message="both processes to reopen"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert named(log_file, "filter_stopped"), stderr
    assert not named(rotated, "filter_stopped") and named(rotated, "filter_started")
    assert stderr == ""
