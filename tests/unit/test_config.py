"""Specification of the operator configuration: TOML file to validated dataclass tree.

Also the secret keyring's file handling (created 0600, reused, refused when others can read it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import sys
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest

from sourceauth.adapters.config import (
    DAY,
    HOUR,
    SECTIONS,
    AuthGateConfig,
    ChallengeConfig,
    Config,
    ConfigError,
    ExemptionsConfig,
    LimitsConfig,
    LoggingConfig,
    MaintenanceConfig,
    PolicyConfig,
    ServerConfig,
    StorageConfig,
    build_config,
    config_key,
    config_summary,
    default_hostname,
    engine_settings,
    load_config,
    load_or_create_keyring,
    parse_duration,
    parse_size,
)
from sourceauth.adapters.config.values import Domain, Duration
from sourceauth.adapters.runtime import storage_of
from sourceauth.adapters.smtp.delivery import NextHop
from sourceauth.adapters.storage.wiring import Storage
from sourceauth.engine.policy import AuthGate, ExemptAction, Exemption, Limits
from sourceauth.engine.settings import EngineSettings
from sourceauth.engine.tokens import generate_keyring, render_keyring

REPO = Path(__file__).resolve().parents[2]

# DESIGN.md section 7, verbatim: outside tests rely on these names and meanings.
OPERATOR_CONTRACT = """\
# sourceauth.toml — every key has a default that runs embedded; these are the ones an operator sets first
[server]
listen = "127.0.0.1:10030"          # inbound SMTP: where the MTA's content_filter points (default 127.0.0.1:2525)
hostname = "mx.example.test"
data_dir = "./var"                  # SQLite file, blobs and the default Maildir live here

[storage]
url = "sqlite:///./var/sourceauth.db"   # or "postgresql://user@127.0.0.1:5432/dbname"

[policy]
protected = ["example.test"]        # domains (or single addresses) that use source authentication
scope = "global"                    # one whitelist for the server, or "recipient": one per protected mailbox
challenge_lifetime = "7d"

[challenge]
relay = "smtp://127.0.0.1:10031"    # challenges leave through this SMTP relay
confirm_address = "confirm@example.test"   # replies come back to confirm+TOKEN@example.test
bounce_address = "bounces@example.test"    # challenges are sent with MAIL FROM:<bounces+TOKEN@example.test>
secret_file = "./var/secret"        # HMAC key; created with 0600 on first start if missing

[delivery]
next_hop = "smtp://127.0.0.1:10031" # or "lmtp://host:port", or "maildir:./var/mail" (the embedded default)

[limits]                            # defaults shown; a load test raises them
challenges_per_domain_per_hour = 100
challenges_per_hour = 1000
held_per_recipient = 100000
max_message_size = "25MB"
max_recipients = 100
"""


def write_config(directory: Path, text: str, name: str = "sourceauth.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write_config(tmp_path, text), environ={} if environ is None else environ)


# ---------------------------------------------------------------- defaults and the contract


def test_defaults_load_with_no_file_and_live_under_cwd_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    var = tmp_path / "var"
    assert cfg.file is None
    assert (cfg.server.listen_host, cfg.server.listen_port) == ("127.0.0.1", 2525)
    assert cfg.server.hostname == default_hostname()
    assert cfg.server.data_dir == var
    assert cfg.storage.kind == "sqlite"
    assert cfg.storage.sqlite_path == var / "sourceauth.db"
    assert cfg.storage.url == f"sqlite:///{var}/sourceauth.db"
    assert cfg.storage.blob_dir == var / "blobs"
    assert cfg.challenge.relay_endpoint == NextHop("maildir", "", 0, str(var / "outbox"))
    assert cfg.challenge.confirm_address == f"confirm@{default_hostname()}"
    assert cfg.challenge.bounce_address == f"bounces@{default_hostname()}"
    assert cfg.challenge.secret_file == var / "secret"
    assert cfg.delivery.next_hop == f"maildir:{var}/mail"
    assert cfg.policy == PolicyConfig()
    assert cfg.limits == LimitsConfig()
    assert cfg.limits.max_message_size == 25_000_000
    assert cfg.exemptions == ExemptionsConfig()
    assert cfg.auth_gate == AuthGateConfig(enabled=False)
    assert cfg.logging == LoggingConfig(format="json", level="info")
    assert cfg.maintenance == MaintenanceConfig(interval=300.0)


def test_default_durations_are_the_documented_ones() -> None:
    policy, challenge = PolicyConfig(), ChallengeConfig()
    assert (policy.challenge_lifetime, policy.hold_lifetime, policy.resend_after) == (
        7 * DAY,
        7 * DAY,
        DAY,
    )
    assert (challenge.retry_initial, challenge.retry_max, challenge.give_up_after) == (
        60.0,
        HOUR,
        2 * DAY,
    )


def test_sourceauth_toml_in_cwd_is_loaded_when_no_path_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, '[policy]\nscope = "recipient"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.policy.scope == "recipient"
    assert cfg.file == tmp_path / "sourceauth.toml"


def test_operator_contract_example_from_design_loads_with_the_values_shown(
    tmp_path: Path,
) -> None:
    cfg = load_text(tmp_path, OPERATOR_CONTRACT)
    var = tmp_path / "var"
    assert cfg.server.listen == "127.0.0.1:10030"
    assert (cfg.server.listen_host, cfg.server.listen_port) == ("127.0.0.1", 10030)
    assert cfg.server.hostname == "mx.example.test"
    assert cfg.server.data_dir == var
    assert cfg.storage.kind == "sqlite"
    assert cfg.storage.sqlite_path == var / "sourceauth.db"
    assert cfg.policy.protected == ("example.test",)
    assert cfg.policy.scope == "global"
    assert cfg.policy.challenge_lifetime == 7 * DAY
    assert cfg.challenge.relay_endpoint == NextHop("smtp", "127.0.0.1", 10031, "")
    assert cfg.challenge.confirm_address == "confirm@example.test"
    assert cfg.challenge.bounce_address == "bounces@example.test"
    assert cfg.challenge.secret_file == var / "secret"
    assert cfg.delivery.next_hop_endpoint == NextHop("smtp", "127.0.0.1", 10031, "")
    assert cfg.limits == LimitsConfig(
        challenges_per_domain_per_hour=100,
        challenges_per_hour=1000,
        held_per_recipient=100000,
        max_message_size=25_000_000,
        max_recipients=100,
    )


def test_repository_example_file_loads_cleanly() -> None:
    cfg = load_config(REPO / "sourceauth.example.toml", environ={})
    assert cfg.server.data_dir == REPO / "var"
    assert cfg.policy.protected


def file_keys() -> list[str]:
    """Every "section.key" an operator may write (pg_password comes from the URL or env)."""
    return [
        f"{name}.{key}"
        for name, section in SECTIONS.items()
        for key in section.__struct_fields__
        if key != "pg_password"
    ]


def test_repository_example_file_shows_the_defaults() -> None:
    """Every key of the example file equals its default, unless marked "# not the default"."""
    marked: dict[str, list[str]] = {}
    section = ""
    for line in (REPO / "sourceauth.example.toml").read_text(encoding="utf-8").splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header.group(1)
        elif "# not the default" in line:
            marked.setdefault(section, []).append(line.split("=", 1)[0].strip())
    example = tomllib.loads((REPO / "sourceauth.example.toml").read_text(encoding="utf-8"))
    only_marked = {name: {key: example[name][key] for key in keys} for name, keys in marked.items()}
    shown, defaults = build_config(example, REPO, {}), build_config(only_marked, REPO, {})
    assert config_summary(shown) == config_summary(defaults)


def test_repository_example_file_shows_every_key() -> None:
    text = (REPO / "sourceauth.example.toml").read_text(encoding="utf-8")
    sections = re.split(r"^#?\s*\[(\w+)\]", text, flags=re.MULTILINE)
    by_section = dict(zip(sections[1::2], sections[2::2], strict=True))
    for dotted in file_keys():
        section, key = dotted.split(".")
        assert re.search(rf"^#?\s*{key} =", by_section.get(section, ""), re.MULTILINE), dotted


def test_configuration_doc_names_every_key() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [key for key in file_keys() if f"`{key.split('.')[1]}`" not in text]
    assert not missing


# ---------------------------------------------------------------- files and errors


def test_configuration_doc_example_loads(tmp_path: Path) -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = load_text(tmp_path, example)
    assert cfg.server.listen_port == 10030
    assert cfg.delivery.next_hop == "smtp://127.0.0.1:10031"


def test_path_may_be_given_as_a_string(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[logging]\nformat = "console"\n')
    assert load_config(str(path), environ={}).logging.format == "console"


def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_config(tmp_path / "nope.toml", environ={})


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[server]\nlisten = "127.0.0.1:2525"\nhostname = \n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(path) in str(caught.value)
    assert "line 3" in str(caught.value)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "sourceauth.toml"
    path.write_bytes(b"[server]\nhostname = '\xff'\n")
    with pytest.raises(ConfigError, match="line 2: not valid UTF-8"):
        load_config(path, environ={})


BAD_VALUES = [
    ('[policy]\nscope = "x"', 'policy.scope: must be "global" or "recipient", got "x"'),
    ('[policy]\nscoep = "global"', "unknown key policy.scoep (did you mean policy.scope?)"),
    ('[polcy]\nscope = "global"', "unknown section [polcy] (did you mean [policy]?)"),
    ('listen = "127.0.0.1:25"', "unknown key listen"),
    ("policy = 5", "policy: must be a table"),
    ("[policy.extra]\nx = 1", "unknown key policy.extra"),
    ('[policy]\nchallenge_lifetime = "7x"', "policy.challenge_lifetime: must be a duration"),
    (
        '[policy]\nchallenge_lifetime = "0d"',
        "policy.challenge_lifetime: must be a duration greater",
    ),
    ("[policy]\nchallenge_lifetime = -5", "policy.challenge_lifetime: must be a duration greater"),
    ("[policy]\nchallenge_lifetime = true", "policy.challenge_lifetime: must be a duration"),
    ('[policy]\nhold_lifetime = "1h30"', "policy.hold_lifetime: must be a duration"),
    ('[policy]\nresend_after = ""', "policy.resend_after: must be a duration"),
    ('[policy]\nfailed_action = "delete"', "policy.failed_action: must be"),
    ('[policy]\nprotected = ["not a domain"]', "policy.protected[0]: "),
    ('[policy]\nprotected = ["example.test", "@example.test"]', "policy.protected[1]: "),
    ("[policy]\nprotected = [5]", "policy.protected[0]: must be a string, got integer 5"),
    ('[policy]\nprotected = "example.test"', "policy.protected: must be an array"),
    ('[policy]\nrecipient_delimiter = "++"', "policy.recipient_delimiter: must be one character"),
    ('[policy]\nrecipient_delimiter = "a"', "policy.recipient_delimiter: must be one character"),
    ("[policy]\nmax_resends = -1", "policy.max_resends: must be at least 0"),
    ("[limits]\nmax_recipients = -1", "limits.max_recipients: must be at least 1, got -1"),
    ("[limits]\nchallenges_per_hour = 0", "limits.challenges_per_hour: must be at least 1"),
    ("[limits]\nchallenges_per_domain_per_hour = -3", "limits.challenges_per_domain_per_hour:"),
    ('[limits]\nmax_recipients = "100"', 'limits.max_recipients: must be an integer, got "100"'),
    ("[limits]\nmax_recipients = 1.5", "limits.max_recipients: must be an integer, got float"),
    ("[limits]\nheld_per_recipient = true", "limits.held_per_recipient: must be an integer"),
    ('[limits]\nmax_message_size = "25M"', "limits.max_message_size: must be a size"),
    ('[limits]\nmax_message_size = "0MB"', "limits.max_message_size: must be greater than zero"),
    ("[limits]\nmax_message_size = -1", "limits.max_message_size: must be greater than zero"),
    ('[server]\nlisten = "127.0.0.1"', "server.listen: must be"),
    ('[server]\nlisten = ":2525"', "server.listen: must be"),
    (
        '[server]\nlisten = "127.0.0.1:0"',
        "server.listen: the port must be a number from 1 to 65535",
    ),
    ('[server]\nlisten = "127.0.0.1:65536"', "server.listen: the port must be"),
    ('[server]\nlisten = "127.0.0.1:smtp"', "server.listen: the port must be"),
    ('[server]\nlisten = "::1:2525"', "server.listen: write an IPv6 address in brackets"),
    ('[server]\nlisten = "[example.test]:2525"', "server.listen: [example.test] is not an IPv6"),
    ('[server]\nlisten = "bad host!:2525"', "server.listen: "),
    ("[server]\nlisten = 2525", "server.listen: must be a string"),
    ('[server]\nhostname = "not a host"', "server.hostname: "),
    ('[server]\ndata_dir = ""', "server.data_dir: must be a non-empty path"),
    ('[storage]\nurl = "mysql://u@h/db"', "storage.url: must be"),
    ('[storage]\nurl = "sqlite://relative.db"', "storage.url: must be"),
    ('[storage]\nurl = "sqlite:///:memory:"', "storage.url: "),
    ('[storage]\nurl = "postgresql://127.0.0.1/db"', "storage.url: must be"),
    ('[storage]\nurl = "postgresql://u@127.0.0.1:5432/"', "storage.url: must be"),
    ('[storage]\nurl = "postgresql://u@h:99999/db"', "storage.url: must be"),
    ('[storage]\nurl = "postgresql://u@h:0/db"', "storage.url: must be"),
    ('[storage]\nurl = "postgresql://u@[::1/db"', "storage.url: must be"),
    (
        '[storage]\nurl = "postgresql://u@h/db?sslmode=require"',
        "storage.url: unknown URL parameter",
    ),
    ('[storage]\nurl = "postgresql://u@h/db?schema=a;b"', "storage.url: schema must be"),
    ('[storage]\nsqlite_synchronous = "OFF"', 'storage.sqlite_synchronous: must be "NORMAL" or'),
    ("[storage]\ngroup_commit_max = 0", "storage.group_commit_max: must be at least 1"),
    ("[storage]\ngroup_commit_wait_ms = -1", "storage.group_commit_wait_ms: must be zero or more"),
    ('[storage]\npg_password = "x"', "unknown key storage.pg_password"),
    ('[challenge]\nrelay = "http://relay.test"', "challenge.relay: bad next hop"),
    ('[challenge]\nrelay = "lmtp://relay.test:24"', "challenge.relay: must be maildir: or smtp:"),
    ('[challenge]\nrelay = "smtp://relay.test:25/path"', "challenge.relay: bad next hop"),
    ('[challenge]\nconfirm_address = "confirm"', "challenge.confirm_address: "),
    ('[challenge]\nconfirm_address = "confirm+x@a.test"', "challenge.confirm_address: "),
    ('[challenge]\nbounce_address = "b@"', "challenge.bounce_address: "),
    (
        '[challenge]\nconfirm_address = "c@a.test"\nbounce_address = "C@a.test"',
        "challenge.bounce_address: must differ from challenge.confirm_address",
    ),
    ('[challenge]\nsecret_env = "NOT-A-NAME"', "challenge.secret_env: "),
    ('[challenge]\nsubject_template = "a\\nb"', "challenge.subject_template: must be a non-empty"),
    ('[challenge]\nbody_template = " "', "challenge.body_template: must not be empty"),
    ('[challenge]\ndisplay_name = ""', "challenge.display_name: must be a non-empty"),
    ('[challenge]\nretry_initial = "2h"', "challenge.retry_initial: must not exceed"),
    ('[challenge]\ngive_up_after = "never"', "challenge.give_up_after: must be a duration"),
    ('[delivery]\nnext_hop = "ftp://x.test"', "delivery.next_hop: bad next hop"),
    ('[delivery]\nnext_hop = "smtp://x.test:0"', "delivery.next_hop: bad next hop"),
    ('[delivery]\nnext_hop = "smtp://u:pw@x.test:25"', "smtp://u:***@x.test:25': credentials"),
    ('[delivery]\nnext_hop = "maildir:"', "delivery.next_hop: bad next hop"),
    ("[delivery]\nnext_hop = 25", "delivery.next_hop: must be a string"),
    ('[delivery]\nretry_max = "10s"', "delivery.retry_initial: must not exceed delivery.retry_max"),
    ('[exemptions]\nspam = "bounce"', 'exemptions.spam: must be "hold", "deliver" or "discard"'),
    ('[exemptions]\nnull_sender = "challenge"', "exemptions.null_sender: must be"),
    (
        '[exemptions]\nspam_headers = [["X-Spam-Flag"]]',
        "exemptions.spam_headers[0]: must be a pair",
    ),
    ('[exemptions]\nspam_headers = [["Bad Name", "YES"]]', "exemptions.spam_headers[0][0]: "),
    ('[auth_gate]\nenabled = "yes"', "auth_gate.enabled: must be true or false"),
    ("[auth_gate]\nenabled = true", "auth_gate.trusted_authserv_ids: must name at least one"),
    ('[auth_gate]\ntrusted_authserv_ids = ["a b"]', "auth_gate.trusted_authserv_ids[0]: "),
    ('[auth_gate]\nrequire = "dmarc"', "auth_gate.require: must be"),
    ('[logging]\nlevel = "verbose"', "logging.level: must be"),
    ('[logging]\nformat = "xml"', 'logging.format: must be "json" or "console", got "xml"'),
    ('[maintenance]\ninterval = "soon"', "maintenance.interval: must be a duration"),
    ('[server]\nhostnme = "mx.test"', "unknown key server.hostnme (did you mean server.hostname?)"),
    ("[policy]\nscope = 5", 'policy.scope: must be "global" or "recipient", got integer 5'),
    (
        '[storage]\ngroup_commit_wait_ms = "2"',
        'storage.group_commit_wait_ms: must be a number, got "2"',
    ),
    ('[challenge]\nconfirm_address = ""', 'challenge.confirm_address: "" is not a valid address'),
    ('[delivery]\nnext_hop = ""', "delivery.next_hop: bad next hop"),
    (
        '[exemptions]\nspam_headers = [["X-Spam", 5]]',
        "exemptions.spam_headers[0][1]: must be a string, got integer 5",
    ),
    (
        '[exemptions]\nspam_headers = "X-Spam"',
        'exemptions.spam_headers: must be an array, got "X-Spam"',
    ),
    ("[maintenance]\ninterval = 0", "maintenance.interval: must be a duration greater than zero"),
]


@pytest.mark.parametrize(("text", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_each_bad_value_is_refused_naming_its_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_text(tmp_path, text + "\n")


def test_several_unknown_keys_are_all_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key limits\.a.*unknown key limits\.b"):
        load_text(tmp_path, "[limits]\na = 1\nb = 2\n")


def test_error_for_a_bad_database_url_hides_its_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, '[storage]\nurl = "mysql://app:hunter2@db.test/mail"\n')
    assert "hunter2" not in str(caught.value)
    assert "storage.url" in str(caught.value)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * DAY),
        ("36h", 36 * HOUR),
        ("90m", 5400.0),
        ("30s", 30.0),
        ("1w", 7 * DAY),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        (" 2 days ", 2 * DAY),
        ("45", 45.0),
        (45, 45.0),
        (0.5, 0.5),
    ],
)
def test_durations_are_read_in_seconds(text: str | int, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "1h30", "-1d", "0", 0, -5, "1e3", "100000w"])
def test_bad_durations_are_refused_naming_the_key(text: str | int) -> None:
    with pytest.raises(ConfigError, match=r"^policy\.x: "):
        parse_duration(text, "policy.x")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("25MB", 25_000_000),
        ("25mb", 25_000_000),
        ("512KB", 512_000),
        ("1MiB", 1_048_576),
        ("1.5 GiB", 1_610_612_736),
        ("1000", 1000),
        ("100B", 100),
        (1000, 1000),
    ],
)
def test_sizes_use_decimal_and_binary_units(text: str | int, size: int) -> None:
    assert parse_size(text, "k") == size


@pytest.mark.parametrize("text", ["", "MB", "25M", "25 TB", "0", 0, -1, "1.5.MB"])
def test_bad_sizes_are_refused_naming_the_key(text: str | int) -> None:
    with pytest.raises(ConfigError, match=r"^limits\.x: "):
        parse_size(text, "limits.x")


def test_listen_accepts_bracketed_ipv6_and_host_names(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\nlisten = "[::1]:10030"\n')
    assert (cfg.server.listen_host, cfg.server.listen_port) == ("::1", 10030)
    assert ServerConfig(listen="localhost:25").listen_host == "localhost"
    assert ServerConfig(listen="0.0.0.0:65535").listen_port == 65535


def test_hold_lifetime_follows_challenge_lifetime_unless_set(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[policy]\nchallenge_lifetime = "3d"\n')
    assert cfg.policy.hold_lifetime == 3 * DAY
    cfg = load_text(tmp_path, '[policy]\nchallenge_lifetime = "3d"\nhold_lifetime = "12h"\n')
    assert (cfg.policy.challenge_lifetime, cfg.policy.hold_lifetime) == (3 * DAY, 12 * HOUR)


def test_confirm_and_bounce_addresses_default_to_the_hostname(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\nhostname = "MX.Example.TEST."\n')
    assert cfg.server.hostname == "mx.example.test"
    assert cfg.challenge.confirm_address == "confirm@mx.example.test"
    assert cfg.challenge.bounce_address == "bounces@mx.example.test"


def test_confirm_and_bounce_domains_may_differ(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[challenge]\nconfirm_address = "Confirm@A.test"\nbounce_address = "bounces@b.test"\n',
    )
    assert (cfg.challenge.confirm_address, cfg.challenge.bounce_address) == (
        "confirm@a.test",
        "bounces@b.test",
    )


def test_protected_entries_are_normalized_and_deduplicated(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[policy]\nprotected = ["Example.TEST", "example.test", "Alice@Other.test", ".sub.test"]\n',
    )
    assert cfg.policy.protected == ("example.test", "alice@other.test", ".sub.test")


def test_choices_ignore_case(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[policy]\nscope = "Recipient"\n[storage]\nsqlite_synchronous = "full"\n'
        '[logging]\nlevel = "DEBUG"\n',
    )
    assert (cfg.policy.scope, cfg.storage.sqlite_synchronous, cfg.logging.level) == (
        "recipient",
        "FULL",
        "debug",
    )


def test_spam_headers_and_exemption_actions_are_read(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[exemptions]\nspam = "discard"\nmailing_list = "deliver"\n'
        'spam_headers = [["X-Spam", "yes"], ["X-Rspamd-Action", "reject"]]\n',
    )
    assert cfg.exemptions.spam == "discard"
    assert cfg.exemptions.mailing_list == "deliver"
    assert cfg.exemptions.null_sender == "hold"
    assert cfg.exemptions.spam_headers == (("X-Spam", "yes"), ("X-Rspamd-Action", "reject"))


def test_auth_gate_reads_trusted_ids(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[auth_gate]\nenabled = true\ntrusted_authserv_ids = ["mx.example.test"]\n'
        'require = "dkim"\n',
    )
    assert cfg.auth_gate == AuthGateConfig(True, ("mx.example.test",), "dkim")


def test_endpoints_accept_maildir_smtp_and_lmtp(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[challenge]\nrelay = "smtp://[::1]"\n[delivery]\nnext_hop = "lmtp://mail.test"\n',
    )
    assert cfg.challenge.relay_endpoint == NextHop("smtp", "::1", 25, "")
    assert cfg.challenge.relay == "smtp://[::1]:25"
    assert cfg.delivery.next_hop_endpoint == NextHop("lmtp", "mail.test", 24, "")


# ---------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    path = write_config(
        etc,
        '[server]\ndata_dir = "state"\n'
        '[storage]\nurl = "sqlite:///db/events.db"\nblob_dir = "../blobs"\n'
        '[challenge]\nrelay = "maildir:out"\nsecret_file = "./keys/secret"\n'
        '[delivery]\nnext_hop = "maildir:mail"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("../etc/sourceauth.toml"), environ={})
    assert cfg.file == path
    assert cfg.server.data_dir == etc / "state"
    assert cfg.storage.sqlite_path == etc / "db" / "events.db"
    assert cfg.storage.url == f"sqlite:///{etc}/db/events.db"
    assert cfg.storage.blob_dir == tmp_path / "blobs"
    assert cfg.challenge.relay_endpoint.path == str(etc / "out")
    assert cfg.challenge.secret_file == etc / "keys" / "secret"
    assert cfg.delivery.next_hop == f"maildir:{etc}/mail"


def test_defaults_derived_from_data_dir_follow_it(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\ndata_dir = "/srv/sourceauth"\n')
    data = Path("/srv/sourceauth")
    assert cfg.storage.sqlite_path == data / "sourceauth.db"
    assert cfg.storage.blob_dir == data / "blobs"
    assert cfg.challenge.secret_file == data / "secret"
    assert cfg.challenge.relay == "maildir:/srv/sourceauth/outbox"
    assert cfg.delivery.next_hop == "maildir:/srv/sourceauth/mail"


def test_absolute_sqlite_url_takes_four_slashes(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[storage]\nurl = "sqlite:////abs/events.db"\n')
    assert cfg.storage.sqlite_path == Path("/abs/events.db")


def test_home_directory_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_text(
        tmp_path,
        '[challenge]\nsecret_file = "~/sourceauth.secret"\n'
        '[delivery]\nnext_hop = "maildir:~/Mail"\n',
    )
    assert cfg.challenge.secret_file == tmp_path / "home" / "sourceauth.secret"
    assert cfg.delivery.next_hop == f"maildir:{tmp_path}/home/Mail"


# ---------------------------------------------------------------- PostgreSQL and its password

PG_URL = '[storage]\nurl = "postgresql://mail%40app:p%3Ass@db.example.test:6432/sourceauth?schema=filter"\n'


PG_PARTS = ("db.example.test", 6432, "mail@app", "sourceauth", "filter", "p:ss")


def pg_parts(storage: StorageConfig | Storage) -> tuple[object, ...]:
    return (
        storage.pg_host,
        storage.pg_port,
        storage.pg_user,
        storage.pg_dbname,
        storage.pg_schema,
        storage.pg_password,
    )


def test_postgresql_url_is_parsed_into_fields(tmp_path: Path) -> None:
    storage = load_text(tmp_path, PG_URL).storage
    assert storage.kind == "postgresql"
    assert storage.sqlite_path is None
    assert pg_parts(storage) == PG_PARTS
    assert storage.url == "postgresql://mail%40app@db.example.test:6432/sourceauth?schema=filter"


def test_postgresql_port_defaults_to_5432_and_postgres_scheme_is_accepted() -> None:
    storage = StorageConfig(url="postgres://app@[::1]/mail")
    assert (storage.pg_host, storage.pg_port, storage.pg_schema) == ("::1", 5432, None)
    assert storage.url == "postgresql://app@[::1]:5432/mail"


def test_database_password_from_the_environment_wins(tmp_path: Path) -> None:
    environ = {"SOURCEAUTH_DB_PASSWORD": "from-env"}
    assert load_text(tmp_path, PG_URL, environ).storage.pg_password == "from-env"
    plain = '[storage]\nurl = "postgresql://app@db.test/mail"\n'
    assert load_text(tmp_path, plain, environ).storage.pg_password == "from-env"
    assert load_text(tmp_path, plain).storage.pg_password is None


def test_database_password_never_shows_in_repr_str_url_or_summary(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, PG_URL.replace("p%3Ass", "hunter2"))
    assert cfg.storage.pg_password == "hunter2"
    for text in (
        repr(cfg),
        str(cfg),
        repr(cfg.storage),
        str(cfg.storage),
        cfg.storage.url,
        json.dumps(config_summary(cfg)),
    ):
        assert "hunter2" not in text
    assert config_summary(cfg)["storage"]["pg_password_set"] is True  # type: ignore[index]


# ---------------------------------------------------------------- summary and engine settings


def test_config_summary_is_json_ready_and_covers_every_section(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, OPERATOR_CONTRACT)
    summary = config_summary(cfg)
    decoded = json.loads(json.dumps(summary))
    assert decoded["file"] == str(tmp_path / "sourceauth.toml")
    assert decoded["server"]["listen_port"] == 10030
    assert decoded["challenge"]["relay_endpoint"] == "smtp://127.0.0.1:10031"
    assert set(decoded) == {"file", *SECTIONS}


def test_engine_settings_carry_the_operators_policy(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, OPERATOR_CONTRACT + '[exemptions]\nbulk = "deliver"\n')
    settings = engine_settings(cfg)
    assert settings.protected == ("example.test",)
    assert settings.confirm_address == "confirm@example.test"
    assert settings.challenge_lifetime == 7 * DAY
    assert settings.exemptions[Exemption.BULK] is ExemptAction.DELIVER
    assert settings.exemptions[Exemption.SPAM] is ExemptAction.HOLD
    assert settings.limits.challenges_per_hour == 1000
    assert settings.limits.max_resends == cfg.policy.max_resends
    assert settings.delivery_give_up_after == 5 * DAY


def test_every_engine_setting_comes_from_one_config_key() -> None:
    nested = [
        f for f in dataclasses.fields(EngineSettings) if f.name not in ("limits", "auth_gate")
    ]
    names = [f.name for kind in (Limits, AuthGate) for f in dataclasses.fields(kind)]
    names += [f.name for f in nested if f.name != "exemptions"]
    assert {name: config_key(name) for name in names if config_key(name) is None} == {}
    assert config_key("challenge_retry_initial") == "challenge.retry_initial"
    assert config_key("max_resends") == "policy.max_resends"


def test_schema_defaults_are_the_engines_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\nhostname = "mx.example.test"\n')
    assert engine_settings(cfg) == EngineSettings(
        confirm_address="confirm@mx.example.test", bounce_address="bounces@mx.example.test"
    )


def test_sections_built_directly_derive_what_the_loader_derives() -> None:
    cfg = Config(server=ServerConfig(hostname=Domain("mx.example.test"), data_dir=Path("/srv/sa")))
    assert cfg.challenge.confirm_address == "confirm@mx.example.test"
    assert cfg.storage.sqlite_path == Path("/srv/sa/sourceauth.db")
    assert cfg.delivery.next_hop_endpoint == NextHop("maildir", "", 0, "/srv/sa/mail")
    assert PolicyConfig(challenge_lifetime=Duration("3d")).hold_lifetime == 3 * DAY


def test_storage_wiring_takes_every_postgresql_part_from_the_url(tmp_path: Path) -> None:
    storage = storage_of(load_text(tmp_path, PG_URL))
    assert pg_parts(storage) == PG_PARTS
    assert (storage.kind, storage.blob_location) == ("postgresql", "database")
    assert "p:ss" not in repr(storage)


# ---------------------------------------------------------------- the secret keyring


def secret_config(tmp_path: Path) -> ChallengeConfig:
    return ChallengeConfig(
        confirm_address="confirm@example.test",
        bounce_address="bounces@example.test",
        secret_file=tmp_path / "state" / "keys" / "secret",
    )


def test_secret_is_created_0600_in_0700_directories_and_reused(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    first = load_or_create_keyring(cfg, {})
    mode = stat.S_IMODE(cfg.secret_file.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(cfg.secret_file.parent.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) & 0o077 == 0
    second = load_or_create_keyring(cfg, {})
    assert render_keyring(second) == render_keyring(first)
    assert os.listdir(cfg.secret_file.parent) == ["secret"]


def test_concurrent_first_starts_end_up_with_one_keyring(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    start = threading.Barrier(8)

    def first_start() -> str:
        start.wait()
        return render_keyring(load_or_create_keyring(cfg, {}))

    with ThreadPoolExecutor(8) as pool:
        rendered = set(pool.map(lambda _: first_start(), range(8)))
    assert rendered == {cfg.secret_file.read_text()}
    assert os.listdir(cfg.secret_file.parent) == ["secret"]


def test_group_readable_secret_is_made_private_and_read(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    cfg.secret_file.parent.mkdir(parents=True)
    text = render_keyring(generate_keyring())
    cfg.secret_file.write_text(text)
    cfg.secret_file.chmod(0o644)
    assert render_keyring(load_or_create_keyring(cfg, {})) == text
    assert stat.S_IMODE(cfg.secret_file.stat().st_mode) == 0o600


def test_secret_writable_by_others_is_refused_with_chmod_advice(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    cfg.secret_file.parent.mkdir(parents=True)
    cfg.secret_file.write_text(render_keyring(generate_keyring()))
    cfg.secret_file.chmod(0o620)
    with pytest.raises(ConfigError, match="chmod 600") as caught:
        load_or_create_keyring(cfg, {})
    assert "challenge.secret_file" in str(caught.value)


def test_secret_from_the_environment_wins_and_no_file_is_created(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    text = render_keyring(generate_keyring())
    keyring = load_or_create_keyring(cfg, {"SOURCEAUTH_SECRET": text})
    assert render_keyring(keyring) == text
    assert not cfg.secret_file.exists()


def test_secret_env_variable_name_is_configurable(tmp_path: Path) -> None:
    cfg = msgspec.structs.replace(secret_config(tmp_path), secret_env="MY_KEYS")
    text = render_keyring(generate_keyring())
    assert render_keyring(load_or_create_keyring(cfg, {"MY_KEYS": text})) == text


def test_bad_secret_is_refused_without_showing_key_material(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    leaked = "00112233445566778899aabbccddeeff"
    with pytest.raises(ConfigError, match="SOURCEAUTH_SECRET: not a valid keyring") as caught:
        load_or_create_keyring(cfg, {"SOURCEAUTH_SECRET": f"id {leaked}\n1 {leaked[:-2]}\n"})
    assert leaked[:10] not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_empty_secret_variable_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SOURCEAUTH_SECRET is set but empty"):
        load_or_create_keyring(secret_config(tmp_path), {"SOURCEAUTH_SECRET": ""})


def test_secret_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    real = tmp_path / "real"
    real.write_text(render_keyring(generate_keyring()))
    real.chmod(0o600)
    cfg.secret_file.parent.mkdir(parents=True)
    cfg.secret_file.symlink_to(real)
    with pytest.raises(ConfigError, match=r"challenge\.secret_file: .* is a symlink"):
        load_or_create_keyring(cfg, {})


def test_milter_section_is_off_by_default_and_parses_its_listen(tmp_path: Path) -> None:
    assert load_text(tmp_path, "").milter.listen is None
    cfg = load_text(tmp_path, '[milter]\nlisten = "127.0.0.1:10032"\ntimeout = "30s"\n')
    assert (cfg.milter.listen.host, cfg.milter.listen.port) == ("127.0.0.1", 10032)  # type: ignore[union-attr]
    assert cfg.milter.timeout == 30.0
    with pytest.raises(ConfigError, match="milter"):
        load_text(tmp_path, '[milter]\nlisten = "nowhere"\n')
    unix = load_text(tmp_path, '[milter]\nlisten = "unix:/run/sa-milter.sock"\n').milter.listen
    assert unix is not None and (unix.path, unix.port) == ("/run/sa-milter.sock", 0)
    with pytest.raises(ConfigError, match="absolute"):
        load_text(tmp_path, '[milter]\nlisten = "unix:relative.sock"\n')


def test_milter_without_pymilter_is_a_one_line_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourceauth.adapters.runtime import milter_server

    cfg = load_text(tmp_path, '[milter]\nlisten = "127.0.0.1:10032"\n')
    monkeypatch.setitem(sys.modules, "sourceauth.adapters.smtp.milter", None)
    with pytest.raises(ConfigError, match=r"sourceauth\[milter\]"):
        milter_server(cfg, None)  # type: ignore[arg-type]
