"""The docs cannot drift from the specs: the diagrams page is what `sourceauth diagram` prints."""

from __future__ import annotations

import re
from pathlib import Path

from sourceauth.engine.statemachine import MACHINES

ROOT = Path(__file__).resolve().parents[2]


def test_state_machine_page_matches_the_specs() -> None:
    page = (ROOT / "docs" / "state-machines.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```mermaid\n(.*?)\n```", page, flags=re.S)
    names = ("sender", "message", "challenge", "rule")
    assert blocks == [MACHINES[name].mermaid().rstrip("\n") for name in names], (
        "docs/state-machines.md is stale: regenerate it with `sourceauth diagram` (see its header)"
    )


def test_readme_names_every_sender_and_message_state() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("sender", "message"):
        for state in MACHINES[name].states:
            assert f"`{state}`" in readme, f"README does not mention the {name} state {state!r}"


def test_readme_library_example_runs_when_pasted(tmp_path: Path) -> None:
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The library API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from sourceauth." in code and "from engine" not in code
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "confirmed=True" in done.stdout and "released=1" in done.stdout


def test_readme_import_section_runs_when_pasted() -> None:
    """ "Coming from TMDA, ASK or postconfirm": the shell block, run as written from the
    repository root, imports every sample and leaves a sound log."""
    import os
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Coming from TMDA, ASK or postconfirm", 1)[1]
    script = section.split("```sh\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-e", "-c", script + 'echo "STORE=$DIR"'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 senders as authorized and 0 rules" in done.stdout  # the re-import
    assert "log sound" in done.stdout
    assert "docs/examples/ask-whitelist.txt:8:" in done.stderr  # a bad line, named
    store = Path(done.stdout.rsplit("STORE=", 1)[1].strip())
    exported = (store / "whitelist.txt").read_text(encoding="utf-8")
    assert "carol@friends.example" in exported and "*@vendor.example" in exported
    import shutil

    shutil.rmtree(store, ignore_errors=True)
