"""The configuration schema: one msgspec Struct per [section]; each field is the key, its type
and its default. Keys the engine reads take their defaults from the engine's own settings.

A default of None or "" means "derived", as its comment says; Config fills it in. The values
are shown in docs/configuration.md and sourceauth.example.toml; a test keeps the example equal.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec.structs import force_setattr, replace

from sourceauth.adapters.config.values import (
    Address,
    Domain,
    Duration,
    Listen,
    MilterListen,
    NextHopUrl,
    Protected,
    Relay,
    Secret,
    Size,
    StorageUrl,
    default_hostname,
    parse_endpoint,
    unset,
)
from sourceauth.adapters.smtp.delivery import NextHop
from sourceauth.engine.policy import AuthGate, ExemptAction, Exemption, Limits, is_protected
from sourceauth.engine.settings import EngineSettings

_ENGINE = EngineSettings()
_LIMITS = Limits()
_GATE = AuthGate()


def _must(description: str, **constraints: Any) -> Any:
    """A constraint with the message an operator sees when it fails: "must be …"."""
    return msgspec.Meta(description=description, **constraints)


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Line = Annotated[str, _must("must be a non-empty single line", pattern=r"\A[^\x00-\x1f\x7f]+\Z")]
Template = Annotated[
    str, _must("must not be empty (leave the key out for the built-in text)", pattern=r"\S")
]
Delimiter = Annotated[
    str, _must('must be one character such as "+" or "-"', pattern=r"\A[-+=_~#%&!$*/?^{|}]\Z")
]
EnvName = Annotated[
    str, _must("must be an environment variable name", pattern=r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
]
AuthservId = Annotated[
    str,
    _must(
        "must be an authserv-id (no spaces, quotes, ; or parentheses)", pattern=r'\A[^\s;"()]+\Z'
    ),
]
HeaderName = Annotated[str, _must("must be a header field name", pattern=r"\A[!-9;-~]+\Z")]
SpamHeader = Annotated[tuple[HeaderName, Line], _must('must be a pair ["Header-Name", "value"]')]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A [section] of the file; derived lists the computed values config_summary also shows."""

    derived: ClassVar[tuple[str, ...]] = ()


class ServerConfig(Section, frozen=True):
    """[server]: the inbound SMTP listener, this host's name and the data directory."""

    listen: Listen = Listen("127.0.0.1:2525")
    hostname: Domain = unset(Domain)  # "": this host's FQDN, else "localhost"
    data_dir: Path = Path("var")
    # Abuse limits (issue 7): a session over either gets "421 4.7.0" and is closed, so the
    # MTA retries later; keep max_sessions_per_client at or above the MTA's process limit
    # for the filter transport (Postfix: default_process_limit, 100).
    max_sessions: PositiveInt = 200
    max_sessions_per_client: PositiveInt = 100
    # Several nodes (issue 8): how long a claimed challenge send or delivery stays with the
    # worker that claimed it; a crashed node's work goes to another node after this.
    work_lease: Duration = Duration(_ENGINE.work_lease)
    # Issue 13: SMTP acceptor processes on the listen port (SO_REUSEPORT), each with its own
    # group commit; 0 = the number of CPUs. max_sessions and max_sessions_per_client are per
    # acceptor.
    processes: Count = 0

    derived = ("listen_host", "listen_port", "acceptors")

    @property
    def listen_host(self) -> str:
        return Listen(self.listen).host

    @property
    def listen_port(self) -> int:
        return Listen(self.listen).port

    @property
    def acceptors(self) -> int:
        """How many SMTP acceptor processes `serve` runs (processes, 0 read as the CPUs)."""
        return self.processes or os.cpu_count() or 1


def _url_part(name: str) -> Any:
    return property(lambda self: getattr(StorageUrl(self.url), name), doc=f"{name} of url")


class StorageConfig(Section, frozen=True):
    """[storage]: the event store (SQLite file or PostgreSQL) and the blob directory.

    url never holds the password: it comes from the URL or SOURCEAUTH_DB_PASSWORD.
    """

    url: StorageUrl | None = None  # None: sqlite:///<data_dir>/sourceauth.db
    blob_dir: Path | None = None  # None: <data_dir>/blobs
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "FULL"
    group_commit_max: PositiveInt = 256
    group_commit_wait_ms: Annotated[float, _must("must be zero or more", ge=0)] = 2.0
    # "database" (the same transaction as the events) or "files" (PostgreSQL nodes: shared fs).
    blobs: Literal["database", "files"] = "database"
    # --- abuse resistance (issue 7): store files 0640 in this group (else 0600)
    group: str | None = None
    pg_password: Secret | None = None  # not a file key: from the URL or SOURCEAUTH_DB_PASSWORD
    # Encryption at rest (issue 8): a 0600 file holding a base64 AES key (16, 24 or 32
    # bytes); None: SOURCEAUTH_ENCRYPTION_KEY if set, else not encrypted.
    encryption_key_file: Path | None = None

    derived = ("kind", "sqlite_path", "pg_host", "pg_port", "pg_user", "pg_dbname", "pg_schema")
    kind = _url_part("kind")
    sqlite_path = _url_part("sqlite_path")
    pg_host = _url_part("pg_host")
    pg_port = _url_part("pg_port")
    pg_user = _url_part("pg_user")
    pg_dbname = _url_part("pg_dbname")
    pg_schema = _url_part("pg_schema")

    def __post_init__(self) -> None:
        if self.url is None:
            return
        url = StorageUrl(self.url)
        force_setattr(self, "url", url)
        if url.kind != "postgresql":
            force_setattr(self, "pg_password", None)
        elif self.pg_password is None and url.password is not None:
            force_setattr(self, "pg_password", url.password)


class Override(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A table inside [policy.domains."…"] or [policy.mailboxes."…"]: absent keys inherit."""


class ExemptionsOverride(Override, frozen=True):
    """[policy.domains."…".exemptions]: the actions of [exemptions], per network."""

    null_sender: ExemptAction | None = None
    mailer_daemon: ExemptAction | None = None
    auto_submitted: ExemptAction | None = None
    mailing_list: ExemptAction | None = None
    bulk: ExemptAction | None = None
    dsn: ExemptAction | None = None
    spam: ExemptAction | None = None


class AuthGateOverride(Override, frozen=True):
    """[policy.domains."…".auth_gate]: the keys of [auth_gate], per network."""

    enabled: bool | None = None
    trusted_authserv_ids: tuple[AuthservId, ...] | None = None
    require: Literal["spf", "dkim", "spf_or_dkim"] | None = None
    authorized_fail_action: ExemptAction | None = None


class PolicyOverride(Override, frozen=True):
    """The policy of one protected domain or mailbox (mailbox, then domain, then [policy])."""

    challenge_lifetime: Duration | None = None
    hold_lifetime: Duration | None = None
    failed_action: Literal["purge", "keep"] | None = None
    scope: Literal["global", "recipient"] | None = None
    exemptions: ExemptionsOverride | None = None
    auth_gate: AuthGateOverride | None = None


class PolicyConfig(Section, frozen=True):
    """[policy]: who is protected, whitelist scope, lifetimes and resend rules; overrides per
    protected domain ([policy.domains."example.org"]) and mailbox ([policy.mailboxes."…"])."""

    protected: tuple[Protected, ...] = _ENGINE.protected  # type: ignore[assignment]
    scope: Literal["global", "recipient"] = _ENGINE.scope
    challenge_lifetime: Duration = Duration(_ENGINE.challenge_lifetime)
    failed_action: Literal["purge", "keep"] = _ENGINE.failed_action
    hold_lifetime: Duration | None = None  # None: challenge_lifetime
    recipient_delimiter: Delimiter = _ENGINE.recipient_delimiter
    max_resends: Count = _LIMITS.max_resends
    resend_after: Duration = Duration(_ENGINE.resend_after)
    # --- policy per network (issue 10)
    domains: dict[str, PolicyOverride] = {}
    mailboxes: dict[str, PolicyOverride] = {}

    def __post_init__(self) -> None:
        if self.hold_lifetime is None:
            force_setattr(self, "hold_lifetime", self.challenge_lifetime)
        domains = {Domain(_key(Domain, "domains", k)): v for k, v in self.domains.items()}
        mailboxes = {Address(_key(Address, "mailboxes", k)): v for k, v in self.mailboxes.items()}
        for domain in domains:
            if not any(_covers(p, domain) for p in self.protected):
                raise ValueError(
                    f'domains."{domain}": not a protected domain (add it to policy.protected)'
                )
        for mailbox in mailboxes:
            if not is_protected(mailbox, self.protected, self.recipient_delimiter):
                raise ValueError(
                    f'mailboxes."{mailbox}": not a protected mailbox (policy.protected)'
                )
        force_setattr(self, "domains", domains)
        force_setattr(self, "mailboxes", mailboxes)


def _key(kind: type[str], table: str, key: str) -> str:
    try:
        return kind(key)
    except ValueError as error:
        raise ValueError(f'{table}."{key}": {error}') from None


def _covers(protected: str, domain: str) -> bool:
    """A protected entry covers this domain: itself, a parent ".domain", or an address in it."""
    if protected.startswith("."):
        return domain.endswith(protected)
    return protected == domain or (protected.rpartition("@")[2] == domain and "@" in protected)


class ChallengeConfig(Section, frozen=True):
    """[challenge]: how challenges leave, the VERP addresses, the secret and the wording."""

    relay: Relay = Relay("")  # "": maildir:<data_dir>/outbox
    confirm_address: Address = unset(Address)  # "": confirm@<server.hostname>
    bounce_address: Address = unset(Address)  # "": bounces@<server.hostname>
    secret_file: Path | None = None  # None: <data_dir>/secret
    secret_env: EnvName = "SOURCEAUTH_SECRET"
    subject_template: Line | None = None  # None: the built-in text
    body_template: Template | None = None  # None: the built-in text
    display_name: Line = "Mail Source Authentication"
    retry_initial: Duration = Duration(_ENGINE.challenge_retry_initial)
    retry_max: Duration = Duration(_ENGINE.challenge_retry_max)
    give_up_after: Duration = Duration(_ENGINE.challenge_give_up_after)

    derived = ("relay_endpoint",)

    @property
    def relay_endpoint(self) -> NextHop:
        return parse_endpoint(self.relay, Relay.schemes)


class DeliveryConfig(Section, frozen=True):
    """[delivery]: the next hop for released and unprotected mail, and its retry schedule."""

    next_hop: NextHopUrl = NextHopUrl("")  # "": maildir:<data_dir>/mail
    retry_initial: Duration = Duration(_ENGINE.delivery_retry_initial)
    retry_max: Duration = Duration(_ENGINE.delivery_retry_max)
    give_up_after: Duration = Duration(_ENGINE.delivery_give_up_after)
    # smtp/lmtp next hop (issue 13): parallel kept-open sessions, transactions per session
    connections: PositiveInt = 4
    batch: PositiveInt = 100

    derived = ("next_hop_endpoint",)

    @property
    def next_hop_endpoint(self) -> NextHop:
        return parse_endpoint(self.next_hop, NextHopUrl.schemes)


class LimitsConfig(Section, frozen=True):
    """[limits]: rate limits and size caps; excess mail is held without a challenge."""

    challenges_per_domain_per_hour: PositiveInt = _LIMITS.challenges_per_domain_per_hour
    challenges_per_hour: PositiveInt = _LIMITS.challenges_per_hour
    held_per_recipient: PositiveInt = _ENGINE.held_per_recipient
    max_message_size: Size = Size("25MB")
    max_recipients: PositiveInt = _ENGINE.max_recipients
    # --- abuse resistance (issue 7)
    challenged_later_per_pass: Count = _LIMITS.challenged_later_per_pass


def _exempt(exemption: Exemption) -> ExemptAction:
    return _ENGINE.exemptions[exemption]


class ExemptionsConfig(Section, frozen=True):
    """[exemptions]: what to do with each class of mail that must never be challenged."""

    null_sender: ExemptAction = _exempt(Exemption.NULL_SENDER)
    mailer_daemon: ExemptAction = _exempt(Exemption.MAILER_DAEMON)
    auto_submitted: ExemptAction = _exempt(Exemption.AUTO_SUBMITTED)
    mailing_list: ExemptAction = _exempt(Exemption.MAILING_LIST)
    bulk: ExemptAction = _exempt(Exemption.BULK)
    dsn: ExemptAction = _exempt(Exemption.DSN)
    plain_bounce: ExemptAction = _exempt(Exemption.PLAIN_BOUNCE)  # issue 7: no report format
    spam: ExemptAction = _exempt(Exemption.SPAM)
    spam_headers: tuple[SpamHeader, ...] = _ENGINE.spam_headers
    # --- abuse resistance (issue 7)
    authorized_spam: ExemptAction = _ENGINE.authorized_spam  # spam-flagged, sender authorized


class AuthGateConfig(Section, frozen=True):
    """[auth_gate]: challenge only senders whose domain passed SPF and/or DKIM upstream."""

    enabled: bool = _GATE.enabled
    trusted_authserv_ids: tuple[AuthservId, ...] = _GATE.trusted_authserv_ids
    require: Literal["spf", "dkim", "spf_or_dkim"] = _GATE.require
    # --- abuse resistance (issue 7): authorized sender, trusted results show its domain failing
    authorized_fail_action: ExemptAction = _GATE.authorized_fail_action


class LoggingConfig(Section, frozen=True):
    """[logging]: structlog output format and level (every command, not only serve), and the
    file `serve` writes to (reopened on SIGHUP, for logrotate)."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: Path | None = None  # None: stderr


class MetricsConfig(Section, frozen=True):
    """[metrics]: the Prometheus endpoint of `serve` (/metrics), off unless listen is set."""

    listen: Listen | None = None  # None: no endpoint


Network = Annotated[
    str,
    _must(
        'must be an IP network such as "192.0.2.0/24" or "2001:db8::/32"',
        pattern=r"\A[0-9A-Fa-f.:]+(/[0-9]{1,3})?\Z",
    ),
]


class MilterConfig(Section, frozen=True):
    """[milter]: the milter listener of `serve` for Postfix's smtpd_milters (before-queue),
    beside the SMTP listener (which the bounce transport still reaches); off unless set."""

    listen: MilterListen | None = None  # None: no milter listener; or "unix:/path"
    timeout: Duration = Duration("2m")  # libmilter's read/write timeout on Postfix's socket


class XForwardConfig(Section, frozen=True):
    """[xforward]: which MTAs may tell the filter the original client (Postfix's XFORWARD)."""

    networks: tuple[Network, ...] = ()  # besides loopback, which is always trusted

    def __post_init__(self) -> None:
        for network in self.networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"networks: {exc}") from None


class CorrespondentsConfig(Section, frozen=True):
    """[correspondents]: a second SMTP listener for mail local users send out, on a path whose
    clients authenticated (the MTA's submission service); each message is relayed to
    [delivery] next_hop and its recipients are whitelisted for the sender. Off unless listen."""

    listen: Listen | None = None  # None: no listener, nothing is learned
    learn: bool = True  # False: the listener only relays


class MaintenanceConfig(Section, frozen=True):
    """[maintenance]: the maintenance timer inside `sourceauth serve`."""

    interval: Duration = Duration("5m")


WebUrl = Annotated[
    str, _must("must be an http:// or https:// URL", pattern=r"\Ahttps?://[^\s?#\x00-\x1f]+\Z")
]


class WebConfig(Section, frozen=True):
    """[web]: the confirmation and quarantine review pages; off unless listen is set."""

    listen: Listen | None = None  # None: no web pages, and no link in the challenge
    base_url: WebUrl | None = None  # None: http://<listen>; set it behind a reverse proxy
    review_ttl: Duration = Duration("7d")
    requests_per_minute: PositiveInt = 30  # per client address, on the link pages
    operator_user: Line | None = None  # None: no operator view
    operator_password_env: EnvName = "SOURCEAUTH_WEB_PASSWORD"
    digest: bool = False  # a digest mail to each protected recipient with held mail
    digest_interval: Duration = Duration("1d")

    derived = ("url",)

    @property
    def url(self) -> str:
        """The links' base URL without a trailing slash ("" when the web is off)."""
        if self.listen is None:
            return ""
        return (self.base_url or f"http://{self.listen}").rstrip("/")


def _section(kind: type[Section]) -> Any:
    return msgspec.field(default_factory=kind)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole configuration; build it with load_config. file is None for built-in defaults.

    Building one fills in every derived default (None above) from data_dir and hostname.
    """

    server: ServerConfig = _section(ServerConfig)
    storage: StorageConfig = _section(StorageConfig)
    policy: PolicyConfig = _section(PolicyConfig)
    challenge: ChallengeConfig = _section(ChallengeConfig)
    delivery: DeliveryConfig = _section(DeliveryConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    exemptions: ExemptionsConfig = _section(ExemptionsConfig)
    auth_gate: AuthGateConfig = _section(AuthGateConfig)
    logging: LoggingConfig = _section(LoggingConfig)
    maintenance: MaintenanceConfig = _section(MaintenanceConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    milter: MilterConfig = _section(MilterConfig)
    xforward: XForwardConfig = _section(XForwardConfig)
    web: WebConfig = _section(WebConfig)
    correspondents: CorrespondentsConfig = _section(CorrespondentsConfig)
    file: Path | None = None  # not a file key: the file this was loaded from

    def __post_init__(self) -> None:
        server = self.server
        if not server.hostname:  # only look the FQDN up (DNS) when the file names no host
            server = replace(server, hostname=Domain(default_hostname()))
        data, host = server.data_dir, server.hostname
        storage, challenge, delivery = self.storage, self.challenge, self.delivery
        if storage.url is None or storage.blob_dir is None:
            storage = replace(
                storage,
                url=storage.url or StorageUrl(f"sqlite:///{data / 'sourceauth.db'}"),
                blob_dir=storage.blob_dir or data / "blobs",
            )
        challenge = replace(
            challenge,
            relay=challenge.relay or Relay(f"maildir:{data / 'outbox'}"),
            confirm_address=challenge.confirm_address or Address(f"confirm@{host}"),
            bounce_address=challenge.bounce_address or Address(f"bounces@{host}"),
            secret_file=challenge.secret_file or data / "secret",
        )
        delivery = replace(
            delivery, next_hop=delivery.next_hop or NextHopUrl(f"maildir:{data / 'mail'}")
        )
        for name, section in (
            ("server", server),
            ("storage", storage),
            ("challenge", challenge),
            ("delivery", delivery),
        ):
            force_setattr(self, name, section)


SECTIONS: dict[str, type[Section]] = {
    field.name: field.type for field in msgspec.structs.fields(Config) if field.name != "file"
}
# Fields an operator cannot set in the file.
NOT_FILE_KEYS = frozenset({"pg_password"})
