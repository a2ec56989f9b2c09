"""[policy.domains."…"] and [policy.mailboxes."…"]: the schema, its errors, and what the engine
gets from them (docs/configuration.md, "Policy per network")."""

from __future__ import annotations

from pathlib import Path

import pytest

from sourceauth.adapters.config import (
    Config,
    ConfigError,
    config_summary,
    engine_settings,
    load_config,
)
from sourceauth.engine.policy import ExemptAction, Exemption

REPO = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "sourceauth.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ={})


def _doc_example() -> str:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = text.split("\n## Policy per network\n", 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_documented_example_loads_and_resolves_per_recipient(tmp_path: Path) -> None:
    cfg = _load(tmp_path, _doc_example())
    policies = engine_settings(cfg).policies
    alice = policies.for_recipient("alice@a.test")
    bob = policies.for_recipient("bob@b.test")
    ceo = policies.for_recipient("ceo@a.test")
    assert (alice.source, alice.failed_action, alice.hold_lifetime) == (
        "domain:a.test",
        "purge",
        3600,
    )
    assert (bob.source, bob.failed_action, bob.hold_lifetime) == (
        "domain:b.test",
        "keep",
        7 * 86400,
    )
    assert ceo.source == "mailbox:ceo@a.test"
    assert (ceo.scope, ceo.hold_lifetime, ceo.challenge_lifetime) == ("recipient", 3600, 3600)
    assert ceo.exemptions[Exemption.BULK] == ExemptAction.DELIVER
    assert ceo.exemptions[Exemption.DSN] == ExemptAction.HOLD  # from [exemptions]
    assert ceo.auth_gate.enabled and ceo.auth_gate.trusted_authserv_ids == ("mx.a.test",)
    assert not alice.auth_gate.enabled
    summary = config_summary(cfg)
    assert summary["policy"]["domains"]["b.test"] == {  # type: ignore[index]
        "failed_action": "keep",
        "hold_lifetime": 604800.0,
    }


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[policy.domains."a.test"]\nhold_lifetme = "1h"\n',
            'unknown key policy.domains."a.test".hold_lifetme '
            '(did you mean policy.domains."a.test".hold_lifetime?)',
        ),
        (
            '[policy.domains."a.test"]\nfailed_action = "delete"\n',
            'policy.domains."a.test".failed_action: must be "purge" or "keep", got "delete"',
        ),
        (
            '[policy.mailboxes."ceo@a.test".exemptions]\nbulkk = "hold"\n',
            'unknown key policy.mailboxes."ceo@a.test".exemptions.bulkk '
            '(did you mean policy.mailboxes."ceo@a.test".exemptions.bulk?)',
        ),
        (
            '[policy.domains."other.test"]\nhold_lifetime = "1h"\n',
            'policy: domains."other.test": not a protected domain (add it to policy.protected)',
        ),
        (
            '[policy.mailboxes."x@other.test"]\nhold_lifetime = "1h"\n',
            'policy: mailboxes."x@other.test": not a protected mailbox (policy.protected)',
        ),
        (
            '[policy.mailboxes."not an address"]\nscope = "recipient"\n',
            'policy: mailboxes."not an address": "not an address" is not a valid address',
        ),
    ],
)
def test_a_bad_override_names_its_whole_key(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, '[policy]\nprotected = ["a.test"]\n' + table)
    assert str(caught.value).startswith(message)


def test_choices_inside_an_override_are_case_insensitive(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        '[policy]\nprotected = [".a.test"]\n[policy.domains."x.a.test"]\nfailed_action = "KEEP"\n',
    )
    policy = engine_settings(cfg).policies.for_recipient("u@x.a.test")
    assert policy.failed_action == "keep"
