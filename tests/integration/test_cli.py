"""The `sourceauth` command as an operator uses it: a real process, a fresh data directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sourceauth.adapters.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "sourceauth.toml"
    path.write_text(
        '[server]\ndata_dir = "./var"\nhostname = "mx.example.test"\n'
        '[policy]\nprotected = ["example.test"]\n'
        '[challenge]\nconfirm_address = "confirm@example.test"\nbounce_address = "bounces@example.test"\n',
        encoding="utf-8",
    )
    return path


def test_allowed_sender_is_listed_as_authorized_in_a_fresh_data_directory(config: Path) -> None:
    allowed = run("senders", "allow", "a@b.example", "--config", str(config))
    assert allowed.returncode == 0, allowed.stderr
    listed = run("senders", "list", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["address"], r["state"]) for r in rows] == [("a@b.example", "authorized")]
    assert (config.parent / "var" / "secret").stat().st_mode & 0o777 == 0o600


def test_block_then_forget_changes_state_and_history_records_both(config: Path) -> None:
    assert run("senders", "block", "x@y.example", "--config", str(config)).returncode == 0
    assert run("senders", "forget", "x@y.example", "--config", str(config)).returncode == 0
    rows = json.loads(run("senders", "list", "--json", "--config", str(config)).stdout)
    assert rows[0]["state"] == "unknown"
    history = json.loads(
        run("audit", "history", "x@y.example", "--json", "--config", str(config)).stdout
    )
    assert [h["event"] for h in history] == ["Sender.FirstBlocked", "Sender.Forgotten"]
    assert history[0]["fields"]["trigger"] == "block"


def test_quarantine_list_is_an_empty_json_array_on_a_fresh_store(config: Path) -> None:
    assert run("senders", "allow", "a@b.example", "--config", str(config)).returncode == 0
    out = run("quarantine", "list", "--json", "--config", str(config))
    assert out.returncode == 0 and json.loads(out.stdout) == []


def test_diagram_prints_all_four_machines_as_mermaid() -> None:
    out = run("diagram")
    assert out.returncode == 0
    assert out.stdout.count("stateDiagram-v2") == 4
    for title in ("sender state machine", "message state machine", "challenge state machine"):
        assert title in out.stdout
    for state in ("unknown", "challenged", "authorized", "expired", "purged", "discarded"):
        assert state in out.stdout
    for state in ("queued", "sent", "deferred", "confirmed", "failed", "superseded"):
        assert state in out.stdout
    only = run("diagram", "--machine", "challenge")
    assert only.returncode == 0 and only.stdout.count("stateDiagram-v2") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["senders", "allow", "not-an-address"],
        ["senders", "forget", "nobody@never.example"],
        ["quarantine", "release", "not-a-uuid"],
        ["quarantine", "show", "00000000-0000-0000-0000-000000000000"],
        ["audit", "history", "neither"],
        ["senders", "list", "--state", "bogus"],
        ["senders", "list", "--limit", "0"],
        ["nonsense-command"],
    ],
)
def test_bad_input_exits_2_with_a_one_line_message(config: Path, args: list[str]) -> None:
    extra = [] if args == ["nonsense-command"] else ["--config", str(config)]
    out = run(*args, *extra)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip() and "Traceback" not in out.stderr


def test_bad_config_names_the_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[policy]\nscope = "everywhere"\n', encoding="utf-8")
    out = run("senders", "list", "--config", str(bad))
    assert out.returncode == 2
    assert "policy.scope" in out.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    out = run("maintain", "--config", str(tmp_path / "nope.toml"))
    assert out.returncode == 2 and "not found" in out.stderr


def test_every_command_has_help() -> None:
    for args in (
        [],
        ["serve"],
        ["maintain"],
        ["senders"],
        ["senders", "list"],
        ["senders", "allow"],
        ["quarantine"],
        ["quarantine", "list"],
        ["quarantine", "show"],
        ["quarantine", "release"],
        ["audit"],
        ["audit", "history"],
        ["audit", "verify"],
        ["audit", "export"],
        ["audit", "seal"],
        ["audit", "state"],
        ["audit", "explain"],
        ["projections"],
        ["projections", "rebuild"],
        ["diagram"],
    ):
        out = run(*args, "--help")
        assert out.returncode == 0 and "Usage:" in out.stdout, args


def test_maintain_verify_export_and_rebuild_on_a_fresh_install(config: Path) -> None:
    run("senders", "allow", "a@b.example", "--config", str(config))
    maintain = run("maintain", "--json", "--config", str(config))
    assert maintain.returncode == 0, maintain.stderr
    assert json.loads(maintain.stdout)["purged"] == 0
    verify = run("audit", "verify", "--config", str(config))
    assert verify.returncode == 0 and "log sound" in verify.stdout
    export = run("audit", "export", "--config", str(config))
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert [e["event"] for e in lines] == ["Sender.FirstAuthorized"]
    rebuild = run("projections", "rebuild", "--config", str(config))
    assert rebuild.returncode == 0 and "1 events" in rebuild.stdout
    listed = json.loads(run("senders", "list", "--json", "--config", str(config)).stdout)
    assert listed[0]["state"] == "authorized"


def test_audit_history_prints_headed_columns_with_transitions_and_ids_take_prefixes(
    config: Path,
) -> None:
    run("senders", "block", "x@y.example", "--config", str(config))
    run("senders", "allow", "x@y.example", "--reason", "paper form", "--config", str(config))
    table = run("audit", "history", "x@y.example", "--config", str(config))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TIME", "KIND", "ID", "EVENT", "TRANSITION", "ACTOR", "REASON"]
    assert "unknown → blocked" in lines[1] and "blocked → authorized" in lines[2]
    assert "operator" in lines[2] and "paper form" in lines[2]
    sender_id = json.loads(run("senders", "list", "--json", "--config", str(config)).stdout)[0][
        "id"
    ]
    assert len(sender_id) == 32 and sender_id in lines[1]
    by_prefix = run("audit", "history", sender_id[:8], "--json", "--config", str(config))
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert [h["to_state"] for h in json.loads(by_prefix.stdout)] == ["blocked", "authorized"]
    short = run("audit", "history", sender_id[:3], "--config", str(config))
    assert short.returncode == 2 and "at least 4" in short.stderr


def test_audit_seal_verify_state_and_export_through_the_command(config: Path) -> None:
    run("senders", "allow", "a@b.example", "--config", str(config))
    sealed = run("audit", "seal", "--config", str(config))
    assert sealed.returncode == 0, sealed.stderr
    head = json.loads(sealed.stdout)
    assert head["position"] == 1 and len(head["digest"]) == 64
    seal_file = config.parent / "seal.json"
    seal_file.write_text(sealed.stdout, encoding="utf-8")
    run("senders", "block", "a@b.example", "--config", str(config))
    verify = run("audit", "verify", "--seal", str(seal_file), "--config", str(config))
    assert verify.returncode == 0 and "hash chain intact to position 2" in verify.stdout
    seal_file.write_text(json.dumps({"position": 1, "digest": "00" * 32}), encoding="utf-8")
    forged = run("audit", "verify", "--seal", str(seal_file), "--config", str(config))
    assert forged.returncode == 1 and "event #1" in forged.stderr and "seal" in forged.stderr

    state = run("audit", "state", "--at", "2999-01-01T00:00:00Z", "--json", "--config", str(config))
    assert state.returncode == 0, state.stderr
    found = json.loads(state.stdout)
    assert set(found) == {"at", "senders", "messages"}
    assert [(s["address"], s["state"]) for s in found["senders"]] == [("a@b.example", "blocked")]
    early = run("audit", "state", "--at", "2000-01-01", "--json", "--config", str(config))
    assert json.loads(early.stdout)["senders"] == []
    bad = run("audit", "state", "--at", "yesterday", "--config", str(config))
    assert bad.returncode == 2

    none = run("audit", "export", "--until", "2000-01-01", "--config", str(config))
    assert none.returncode == 0 and none.stdout == ""
    both = run("audit", "export", "--since", "2000-01-01", "--config", str(config))
    assert len(both.stdout.splitlines()) == 2
