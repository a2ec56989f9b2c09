"""The path a user takes: build the wheel, install it into a fresh virtual environment outside
the checkout, and run the `sourceauth` command from there on a fresh data directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_TOP_LEVEL = ("engine", "adapters", "benchmarks", "tests", "specs")


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy: setuptools reuses a build/ folder, where stale modules would leak in.
    source = tmp_path_factory.mktemp("src") / "sourceauth"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "var",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
        ),
    )
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        cwd=out,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = out.glob("sourceauth-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("venv")
    made = _run([sys.executable, "-m", "venv", str(home / "env")], cwd=home)
    assert made.returncode == 0, made.stderr
    pip = home / "env" / "bin" / "pip"
    installed = _run([str(pip), "install", "-q", str(wheel)], cwd=home)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return home / "env"


def test_wheel_installs_one_namespace_and_carries_the_specs_and_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.startswith("sourceauth-")}
    assert top == {"sourceauth"}, f"top-level entries besides sourceauth: {sorted(top)}"
    for spec in ("sender.toml", "message.toml"):
        assert f"sourceauth/specs/{spec}" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    for page in ("confirm.html", "review.html", "style.css"):  # the web pages' templates
        assert f"sourceauth/adapters/web/templates/{page}" in names
    assert not [n for n in names if "smtp_sink" in n or n.startswith(FORBIDDEN_TOP_LEVEL)]


def test_installed_command_runs_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    sourceauth = str(venv / "bin" / "sourceauth")
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import sourceauth.engine as e; print(e.__file__)"],
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout

    helped = _run([sourceauth, "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr

    diagram = _run([sourceauth, "diagram"], cwd=tmp_path)
    assert diagram.returncode == 0, diagram.stderr
    assert "stateDiagram-v2" in diagram.stdout and "authorized" in diagram.stdout

    config = tmp_path / "sourceauth.toml"
    config.write_text(
        '[server]\ndata_dir = "./var"\n[policy]\nprotected = ["example.test"]\n'
        '[challenge]\nconfirm_address = "confirm@example.test"\n'
        'bounce_address = "bounces@example.test"\n',
        encoding="utf-8",
    )
    allowed = _run([sourceauth, "senders", "allow", "friend@partner.test"], cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    listed = _run([sourceauth, "senders", "list", "--json"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["address"], r["state"]) for r in rows] == [("friend@partner.test", "authorized")]

    bad = _run([sourceauth, "senders", "allow", "not an address"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip(), (bad.returncode, bad.stderr)
