"""Composition root: turns the operator's Config into a running engine with its adapters,
and runs `serve` (inbound SMTP, challenge sender, delivery worker, maintenance timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
import structlog

from sourceauth.adapters.config import (
    Config,
    ConfigError,
    config_summary,
    engine_settings,
    load_or_create_keyring,
)
from sourceauth.adapters.config.values import Listen
from sourceauth.adapters.smtp import xforward
from sourceauth.adapters.smtp.challenge import DEFAULT_BODY_TEMPLATE, DEFAULT_SUBJECT_TEMPLATE
from sourceauth.adapters.smtp.inbound import (
    FilterHandler,
    GroupCommitter,
    SessionLimits,
    inbound_server_factory,
)
from sourceauth.adapters.smtp.outbound import ChallengeSender, NextHopDelivery
from sourceauth.adapters.status import run_maintenance, version
from sourceauth.adapters.storage.blobs import FileBlobStore
from sourceauth.adapters.storage.dbblobs import DatabaseBlobStore
from sourceauth.adapters.storage.encryption import EncryptedBlobStore, EncryptionKeyError, load_keys
from sourceauth.adapters.storage.modes import UnknownGroup
from sourceauth.adapters.storage.postgres import PostgresBlobStore, begin_stop, database_gone
from sourceauth.adapters.storage.wiring import (
    EncryptionMismatch,
    KeyringMismatch,
    Storage,
    StorageUnreachable,
    open_blobs,
    open_engine,
)
from sourceauth.adapters.web.digest import Digest
from sourceauth.adapters.web.server import WebServer
from sourceauth.engine.api import Incoming, Receipt
from sourceauth.engine.application import SourceAuth, system_clock
from sourceauth.engine.logs import (
    BatchWriter,
    LogThrottle,
    get_logger,
    install_batch_writer,
    redact_tokens,
    stamp_iso_utc,
)
from sourceauth.engine.ports import Clock

if TYPE_CHECKING:
    from sourceauth.adapters.metrics import Metrics, OutboundCounts

log = get_logger(__name__)

DATABASE_REPLY_WITHIN = 4.5  # seconds: an SMTP client gets 4xx within 5 s if PostgreSQL is down


class LogFile:
    """The `[logging] file` of `serve`: appended to, reopened under the same name on SIGHUP
    (after logrotate moved it away). Takes bytes (JSON) or text (console)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._handle = self._open()

    def _open(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "ab")

    def write(self, data: bytes | str) -> int:
        with self._lock:
            return int(self._handle.write(data.encode() if isinstance(data, str) else data))

    def flush(self) -> None:
        with self._lock:
            self._handle.flush()

    def reopen(self) -> None:
        fresh = self._open()
        with self._lock:
            old, self._handle = self._handle, fresh
        old.close()


_log_file: LogFile | None = None


def reopen_log() -> None:
    """SIGHUP: reopen `[logging] file` (a no-op when logging goes to stderr)."""
    if _log_file is not None:
        _log_file.reopen()
        log.info("log_reopened", file=str(_log_file.path))


def configure_logging(
    fmt: str = "json", level: str = "info", stream: Any = None, file: Path | None = None
) -> None:
    """structlog: JSON lines (orjson, bytes straight to the stream) in production, a console
    renderer for people; never print. `file` (serve's [logging] file) wins over `stream`."""
    global _log_file
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        redact_tokens,
        structlog.processors.add_log_level,
        stamp_iso_utc,  # structlog's TimeStamper(fmt="iso", utc=True), cheaper
    ]
    if file is not None:
        _log_file = stream = LogFile(file)
    out = stream or sys.stderr
    factory: Any
    batch: BatchWriter | None = None
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory = structlog.BytesLoggerFactory(file=getattr(out, "buffer", out))
        batch = _json_batch_writer(processors, factory())
    else:
        # plain tracebacks, as before rich was a dependency (structlog picks rich's boxed
        # ones whenever rich is installed): log files stay plain text
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            )
        )
        factory = structlog.PrintLoggerFactory(file=out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    install_batch_writer(processors, lvl, batch)


def _json_batch_writer(processors: list[Any], sink: Any) -> BatchWriter:
    """Many JSON lines rendered by `processors` (as structlog renders each: the fields, then
    `event`, through the chain) and written to `sink` (a BytesLogger: structlog's lock for its
    file) in one write: the decisions of a whole group commit cost one system call."""

    def write(method: str, event: str, rows: Sequence[Mapping[str, Any]]) -> None:
        lines = []
        for row in rows:
            line: Any = dict(row)
            line["event"] = event
            for processor in processors:
                line = processor(sink, method, line)
            lines.append(line)
        sink.msg(b"\n".join(lines))

    return write


def storage_of(cfg: Config) -> Storage:
    """The storage wiring for [storage]: each Storage field the configuration sets, by name
    (the URL fills every pg_* field, so no default is repeated here)."""
    values = {item.name: getattr(cfg.storage, item.name, None) for item in fields(Storage)}
    try:
        values["encryption_keys"] = load_keys(cfg.storage.encryption_key_file, os.environ)
    except EncryptionKeyError as exc:
        raise ConfigError(str(exc)) from None
    return Storage(**{name: value for name, value in values.items() if value is not None})


def build_engine(
    cfg: Config,
    *,
    clock: Clock = system_clock,
    environ: dict[str, str] | None = None,
    transports: bool = True,
) -> SourceAuth:
    """The engine for this configuration, with its challenge and delivery transports."""
    storage = storage_of(cfg)
    try:
        modes = storage.modes
    except UnknownGroup as exc:
        raise ConfigError(str(exc)) from None
    modes.make_dirs(cfg.server.data_dir)
    keyring = load_or_create_keyring(
        cfg.challenge, dict(os.environ if environ is None else environ)
    )
    blobs = open_blobs(storage)
    challenges = deliveries = None
    if transports:
        challenges = ChallengeSender(
            relay=cfg.challenge.relay_endpoint,
            confirm_address=cfg.challenge.confirm_address,
            bounce_address=cfg.challenge.bounce_address,
            hostname=cfg.server.hostname,
            delimiter=cfg.policy.recipient_delimiter,
            subject_template=cfg.challenge.subject_template or DEFAULT_SUBJECT_TEMPLATE,
            body_template=cfg.challenge.body_template or DEFAULT_BODY_TEMPLATE,
            display_name=cfg.challenge.display_name,
            link_base=f"{cfg.web.url}/confirm/" if cfg.web.url else "",
        )
        deliveries = NextHopDelivery(
            next_hop=cfg.delivery.next_hop_endpoint,
            blobs=blobs,
            hostname=cfg.server.hostname,
            connections=cfg.delivery.connections,
            batch=cfg.delivery.batch,
        )
    try:
        return open_engine(
            settings=engine_settings(cfg),
            keyring=keyring,
            storage=storage,
            clock=clock,
            challenges=challenges,
            deliveries=deliveries,
            blobs=blobs,
        )
    except EncryptionMismatch as exc:
        raise ConfigError(str(exc)) from None
    except KeyringMismatch as exc:
        env = os.environ if environ is None else environ
        fix = (
            f"set {cfg.challenge.secret_env} to the keyring of a running node"
            if cfg.challenge.secret_env in env
            else f"copy the keyring file of a running node to {cfg.challenge.secret_file} (0600)"
        )
        raise ConfigError(f"{exc}: {fix}") from None


class Worker:
    """A thread that runs `step` whenever woken, and at least every `interval` seconds."""

    def __init__(
        self, name: str, step: Callable[[], object], interval: float, min_gap: float = 0.0
    ) -> None:
        self.name = name
        self.step = step
        self.interval = interval
        self.min_gap = min_gap  # lets work pile up into batches under load
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"sourceauth-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            if self.stopping.is_set():
                return
            try:
                self.step()
            except Exception as exc:
                log.error("worker_step_failed", worker=self.name, error=str(exc))
            if self.min_gap:
                self.stopping.wait(self.min_gap)


class Workers:
    """The outbound side: challenge sender, delivery worker and maintenance timer, as threads
    around one engine. `serve` runs them in their own process (see Filter)."""

    def __init__(self, app: SourceAuth, cfg: Config, counts: OutboundCounts | None = None) -> None:
        # Set on stop: a dispatcher sends nothing more of the batch it holds (its leases are
        # released for the next taker), so stopping waits for one send at most, not a batch.
        self.halted = threading.Event()
        send = functools.partial(app.dispatch_challenges, stop=self.halted.is_set)
        deliver = functools.partial(app.dispatch_deliveries, stop=self.halted.is_set)
        self.transport = app.delivery_transport
        if counts is not None:  # [metrics]: count each step's outcomes
            send, deliver = counts.challenges(send), counts.deliveries(deliver)  # type: ignore[assignment]
            if isinstance(app.delivery_transport, NextHopDelivery):
                app.delivery_transport.on_unreadable = counts.original_unreadable
        self.challenges = Worker("challenges", send, 1.0, min_gap=0.05)
        self.deliveries = Worker("deliveries", deliver, 1.0, min_gap=0.05)
        self.maintenance = Worker(
            "maintenance",
            lambda: run_maintenance(app, cfg, dispatch=False),
            cfg.maintenance.interval,
        )
        self.all: tuple[Worker, ...] = (self.challenges, self.deliveries, self.maintenance)
        self.digest: Digest | None = None
        if cfg.web.digest and cfg.web.url:
            self.digest = Digest(
                app,
                next_hop=cfg.delivery.next_hop_endpoint,
                base_url=cfg.web.url,
                review_ttl=cfg.web.review_ttl,
                sender=cfg.challenge.confirm_address,
                hostname=cfg.server.hostname,
            )
            self.all += (Worker("digest", self.digest.send_all, cfg.web.digest_interval),)

    def start(self) -> None:
        for worker in self.all:
            worker.start()
        self.wake()  # pick up whatever a previous run left queued

    def wake(self) -> None:
        self.challenges.wake.set()
        self.deliveries.wake.set()

    def stop(self, timeout: float = 60.0) -> bool:
        """Let each thread finish the send in progress (no more of its batch) and end, all
        within `timeout` seconds; False when one is still running then."""
        self.halted.set()
        if isinstance(self.transport, NextHopDelivery):
            self.transport.halt()
        for worker in self.all:
            worker.stopping.set()
            worker.wake.set()
        deadline = time.monotonic() + timeout
        for worker in self.all:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        if any(worker.thread.is_alive() for worker in self.all):
            return False
        if isinstance(self.transport, NextHopDelivery):
            self.transport.close()  # QUIT the kept-open next-hop sessions
        return True


class Doorbell:
    """A one-way pipe from the SMTP process to a child process (workers, web). A byte rings
    it (work is due); closing it says stop, and so does the parent's death, even by kill -9,
    because the kernel closes the dead parent's end. No lock is shared: a multiprocessing
    Event's lock, held by a parent killed in the middle of `set()`, left the child waiting on
    it for ever (tests/integration/test_crash_rounds.py found it)."""

    def __init__(self, ctx: Any) -> None:
        self.reader, self.writer = ctx.Pipe(duplex=False)
        # Never block the commit thread: a full pipe already holds a ring. (The flag belongs
        # to the pipe's open file, so the copies acceptor processes get keep it.)
        os.set_blocking(self.writer.fileno(), False)

    def ring(self) -> None:
        ring(self.writer)

    def close(self) -> None:
        self.writer.close()


def ring(writer: Any) -> None:
    """Ring a Doorbell through its write end (in this process or a copy in another)."""
    try:
        writer.send_bytes(b"w")  # 5 bytes in one write: atomic on a pipe
    except OSError:  # full (BlockingIOError): rung already; closed: stopping
        pass


def await_doorbell(reader: Any, timeout: float) -> str:
    """In the child: "wake" when rung, "stop" when the parent closed its end or died, "" when
    `timeout` passed quietly."""
    if not reader.poll(timeout):
        return ""
    try:
        while reader.poll(0):
            reader.recv_bytes()
    except (EOFError, OSError):
        return "stop"
    return "wake"


class SignalFlag:
    """Raised by a signal, read by a loop: the handler only assigns an attribute.

    It takes no lock, because a Python signal handler runs in the main thread between two
    bytecodes, and that may be in the middle of the same handler run for the signal before.
    The children's SIGTERM handler was `threading.Event.set`, whose lock is not re-entrant;
    the kernel sends PR_SET_PDEATHSIG's SIGTERM again each time the child is handed on to
    another thread of its dying parent and finally to init, so a second SIGTERM arriving
    inside the first `set()` left the worker waiting for its own lock for ever (the second
    cause of issue 7's hung workers; tests/integration/test_child_signals.py)."""

    def __init__(self, signum: int) -> None:
        self.raised = False
        signal.signal(signum, self._raise)

    def _raise(self, signum: int, frame: Any) -> None:
        self.raised = True

    def is_set(self) -> bool:
        return self.raised

    def clear(self) -> None:
        self.raised = False


ORPHAN_GRACE = 5.0  # seconds a child whose parent died may take to stop before it exits anyway


class ParentWatch:
    """A child process of `serve` (worker, web, acceptor) watching the SMTP process that
    started it, so that it stops within seconds of that process's death, even by kill -9.

    Three signs, because each alone was seen to miss: PR_SET_PDEATHSIG (Linux) sends SIGTERM,
    but not when the parent died before the child ran prctl (a spawned child spends seconds
    importing first under load); the end of the parent's Doorbell pipe, but an acceptor
    process holds a copy of the worker's (to ring it), so that end closed only when the
    acceptor had stopped too; and `gone()`, the parent pid no longer being this process's
    parent, which the child loops check on every turn. SIGUSR1 writes every thread's Python
    stack to stderr (the log): what a stuck child is doing."""

    def __init__(self) -> None:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        parent = multiprocessing.parent_process()
        self.pid = parent.pid if parent is not None and parent.pid else os.getppid()
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            log.debug("pdeathsig_unavailable")

    def gone(self) -> bool:
        """True once the parent died (this process was handed to init or a subreaper)."""
        return os.getppid() != self.pid

    def exit_after(self, seconds: float, process: str) -> None:
        """Orphaned: end this process in `seconds` whatever it is waiting for (an SMTP reply,
        a lock, a thread). Nothing is lost: work it had claimed is taken over once its lease
        lapses (`[server] work_lease`); a send made but not recorded is made again, with the
        same token or id, as after a kill -9 of the process itself."""

        def tell() -> None:
            log.warning("orphan_stop_cut_short", child=process, pid=os.getpid(), after=seconds)

        def cut() -> None:
            time.sleep(seconds)
            telling = threading.Thread(target=tell, daemon=True)  # a stuck log must not hold it
            telling.start()
            telling.join(0.5)
            os._exit(0)

        threading.Thread(target=cut, name="sourceauth-orphan-exit", daemon=True).start()


STOP_DEADLINE = 5.0  # seconds: then a stop stuck on a database that does not answer gives up
WORKERS_STOP_DEADLINE = 4.0  # (the worker process gives up first: its parent waits for it)


def abandon(what: str, after: float) -> NoReturn:
    """End this process now: its stop is stuck on a database that does not answer. Nothing
    accepted is lost: a 250 is only sent after its commit; the work in flight is retried by
    its sender, or by a node whose lease on it lapses."""
    log.error(
        "stop_abandoned",
        what=what,
        after_s=after,
        reason="the database does not answer; uncommitted work got no 250",
    )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)


def within_deadline(app: SourceAuth, stop: Callable[[], object], deadline: float) -> None:
    """Run `stop` (in a daemon thread); past `deadline` with the database gone, abandon it.
    With the database answering (or on SQLite) it is waited for, however long."""
    thread = threading.Thread(target=stop, name="sourceauth-stop", daemon=True)
    thread.start()
    thread.join(deadline)
    while thread.is_alive():
        if database_gone(app):
            abandon("worker process", deadline)
        thread.join(deadline)


async def stop_within_deadline(app: SourceAuth, stopping: Awaitable[None], what: str) -> None:
    """Await `stopping`; past STOP_DEADLINE with the database gone, abandon it (see
    `abandon`). With the database answering (or on SQLite) it is waited for, however long."""
    task = asyncio.ensure_future(stopping)
    loop = asyncio.get_running_loop()
    while not task.done():
        await asyncio.wait([task], timeout=STOP_DEADLINE)
        if not task.done() and await loop.run_in_executor(None, database_gone, app):
            abandon(what, STOP_DEADLINE)
    task.result()


def told_to_stop(stop: SignalFlag, parent: ParentWatch, doorbell: Any) -> Callable[[float], bool]:
    """A child's wait: True once it is to stop (SIGTERM, its parent gone or its Doorbell
    closed), after waiting up to `seconds` for that."""

    def wait(seconds: float) -> bool:
        return stop.is_set() or parent.gone() or await_doorbell(doorbell, seconds) == "stop"

    return wait


CHILD_RETRY = 1.0  # seconds between a child's attempts to open a database it cannot reach
CHILD_RETRY_LOG = 30.0  # seconds between its log lines about it


def child_engine(
    cfg: Config, child: str, give_up: Callable[[float], bool], **kwargs: Any
) -> SourceAuth | None:
    """A child process's engine (worker, web, acceptor). The database may have gone while the
    child was starting (a spawned child spends seconds importing under load): then it logs
    one line (`child_storage_unreachable`, again every 30 s), never a traceback, and tries again
    every second until the database answers, or `give_up(seconds)` (which waits that long)
    says the child is to stop: None then. The SMTP process meanwhile answers 4xx, and nothing
    is lost (a 250 only follows a commit)."""
    since = time.monotonic()
    told = None
    while True:
        try:
            return build_engine(cfg, **kwargs)
        except StorageUnreachable as exc:
            now = time.monotonic()
            if told is None or now - told >= CHILD_RETRY_LOG:
                told = now
                log.error(
                    "child_storage_unreachable",
                    child=child,
                    error=str(exc),
                    waited_s=round(now - since, 1),
                )
        if give_up(CHILD_RETRY):
            return None


def run_worker_process(cfg: Config, doorbell: Any, counts: OutboundCounts | None = None) -> None:
    """Entry point of the worker process: its own engine on the same storage; the event log
    (and, with [metrics], the outbound counts) is all it shares with the SMTP process, which
    rings `doorbell` (the read end of a `Doorbell`) when work is due and closes it to stop."""
    parent = ParentWatch()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the SMTP process decides when to stop
    stop = SignalFlag(signal.SIGTERM)
    hangup = SignalFlag(signal.SIGHUP)  # forwarded by the SMTP process: reopen the log file
    configure_logging(cfg.logging.format, cfg.logging.level, file=cfg.logging.file)
    if parent.gone():  # died while this process started: no SIGTERM will ever come
        log.warning("parent_gone", child="workers", pid=os.getpid(), parent=parent.pid)
        return

    app = child_engine(cfg, "workers", told_to_stop(stop, parent, doorbell))
    if app is None:
        return
    workers = Workers(app, cfg, counts)
    workers.start()
    log.info("workers_started", pid=os.getpid())
    try:
        while not stop.is_set() and not parent.gone():
            rung = await_doorbell(doorbell, 0.2)
            if rung == "stop":  # stopped, or the SMTP process died: finish and end
                break
            if rung == "wake":
                workers.wake()
            if hangup.is_set():  # here, not in the signal handler: no write is cut in half
                hangup.clear()
                reopen_log()
    finally:
        if parent.gone():
            log.warning("parent_gone", child="workers", pid=os.getpid(), parent=parent.pid)
            parent.exit_after(ORPHAN_GRACE, "workers")
        begin_stop(app)

        def stop_all() -> None:
            workers.stop()
            app.close()

        within_deadline(app, stop_all, WORKERS_STOP_DEADLINE)
        log.info("workers_stopped", pid=os.getpid())


PIPELINING = "250-PIPELINING"


class ServedHandler(FilterHandler):
    """The inbound handler as `serve` runs it: PIPELINING advertised to every client and
    XFORWARD to trusted MTAs, and each
    DATA reply timed for [metrics] (from the end of DATA to the reply, which for a 250
    includes the wait for its group commit)."""

    def __init__(
        self,
        *args: Any,
        trusted: tuple[xforward.Network, ...] = (),
        on_reply: Callable[[float], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.trusted = trusted
        self.on_reply = on_reply

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        # RFC 2920: aiosmtpd reads each command from its stream buffer in order and answers it
        # before it reads the next, so MAIL, RCPT and DATA written in one packet get their
        # replies in order. Postfix's smtp client (the content_filter transport) then sends
        # them in one round trip instead of three: under load each round trip costs the
        # scheduling latency of both processes (benchmarks/README.md, Postfix section).
        if responses:
            responses = [*responses[:-1], PIPELINING, responses[-1]]
        return xforward.ehlo(session, hostname, responses, self.trusted)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.on_reply is None:
            return await super().handle_DATA(server, session, envelope)
        started = time.perf_counter()
        reply = await super().handle_DATA(server, session, envelope)
        self.on_reply(time.perf_counter() - started)
        return reply


def operator_login(cfg: Config) -> tuple[str, str] | None:
    """The operator view's (user, password), or None when it is off; ConfigError if the
    password's environment variable is empty."""
    if cfg.web.operator_user is None:
        return None
    password = os.environ.get(cfg.web.operator_password_env, "")
    if not password:
        raise ConfigError(f"web.operator_user is set but ${cfg.web.operator_password_env} is empty")
    return (cfg.web.operator_user, password)


def web_server(cfg: Config, app: SourceAuth) -> WebServer:
    assert cfg.web.listen is not None
    return WebServer(
        app,
        host=Listen(cfg.web.listen).host,
        port=Listen(cfg.web.listen).port,
        base_url=cfg.web.url,
        requests_per_minute=cfg.web.requests_per_minute,
        operator=operator_login(cfg),
    )


def run_web_process(cfg: Config, doorbell: Any) -> None:
    """Entry point of the web process: its own engine on the same storage, so a page never
    holds the SMTP process's interpreter lock; confirmations and releases reach the workers
    through the event log."""
    parent = ParentWatch()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = SignalFlag(signal.SIGTERM)
    configure_logging(cfg.logging.format, cfg.logging.level)
    if parent.gone():
        log.warning("parent_gone", child="web", pid=os.getpid(), parent=parent.pid)
        return

    app = child_engine(cfg, "web", told_to_stop(stop, parent, doorbell), transports=False)
    if app is None:
        return
    web = web_server(cfg, app)
    try:
        web.start()
        while not stop.is_set() and not parent.gone() and await_doorbell(doorbell, 0.2) != "stop":
            pass
    finally:
        if parent.gone():
            parent.exit_after(ORPHAN_GRACE, "web")
        begin_stop(app)
        web.stop()
        app.close()


class Filter:
    """Everything `sourceauth serve` runs, startable from tests on any loop.

    `workers="process"` (what `serve` uses) runs the outbound workers in a second process, so
    SMTP and commits keep a CPU and the interpreter lock to themselves; "thread" keeps
    everything in this process (handy for tests that inspect the engine)."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock = system_clock,
        app: SourceAuth | None = None,
        workers: str = "thread",
        wake: Any = None,
        reuse_port: bool = False,
    ) -> None:
        self.cfg = cfg
        self.reuse_port = reuse_port
        operator_login(cfg)  # refuse to start here, not in the web process
        self.app = app or build_engine(cfg, clock=clock)
        assert isinstance(
            self.app.blobs,
            FileBlobStore | DatabaseBlobStore | PostgresBlobStore | EncryptedBlobStore,
        )
        self.mode = workers
        ctx = multiprocessing.get_context("spawn")
        self.metrics: Metrics | None = None
        if cfg.metrics.listen is not None and workers != "none":
            from sourceauth.adapters.metrics import Metrics, OutboundCounts

            self.metrics = Metrics(storage_of(cfg), OutboundCounts(ctx))
        counts = self.metrics.outbound if self.metrics is not None else None
        self.workers: Workers | None = (
            Workers(self.app, cfg, counts) if workers == "thread" else None
        )
        self._process: Any = None
        self._web_process: Any = None
        self.web: WebServer | None = None
        if cfg.web.listen is not None and workers == "thread":
            self.web = web_server(cfg, self.app)
        # What wakes the worker process after a commit: in an acceptor process ("none"), the
        # write end of the first process's Doorbell (`wake`).
        self._ring: Callable[[], None] | None = None
        if wake is not None:
            self._ring = functools.partial(ring, wake)
        if workers == "process":
            self._doorbell = Doorbell(ctx)
            self._ring = self._doorbell.ring
            self._process = ctx.Process(
                target=run_worker_process,
                args=(cfg, self._doorbell.reader, counts),
                name="sourceauth-workers",
                daemon=True,
            )
            if cfg.web.listen is not None:
                self._web_doorbell = Doorbell(ctx)
                self._web_process = ctx.Process(
                    target=run_web_process,
                    args=(cfg, self._web_doorbell.reader),
                    name="sourceauth-web",
                    daemon=True,
                )
        self.committer = GroupCommitter(
            self.app,
            self.app.blobs,
            max_batch=cfg.storage.group_commit_max,
            wait_ms=cfg.storage.group_commit_wait_ms,
            on_commit=self._committed,
        )
        self.trusted = xforward.networks(cfg.xforward.networks)
        self.handler = ServedHandler(
            self.committer,
            trusted=self.trusted,
            on_reply=self.metrics.replied if self.metrics is not None else None,
            max_recipients=cfg.limits.max_recipients,
            bounce_address=cfg.challenge.bounce_address,
            delimiter=cfg.policy.recipient_delimiter,
            reply_within=DATABASE_REPLY_WITHIN if cfg.storage.kind == "postgresql" else None,
        )
        # The [correspondents] and [milter] listeners run in the first process only.
        first = workers != "none"
        self.outbound = (
            self._correspondents() if cfg.correspondents.listen is not None and first else None
        )
        self.limits = Worker("quarantine-limits", self.app.refresh_full_mailboxes, 0.5)
        self.sessions = SessionLimits(cfg.server.max_sessions, cfg.server.max_sessions_per_client)
        _quiet_aiosmtpd()
        self.server: asyncio.AbstractServer | None = None
        self.outbound_server: asyncio.AbstractServer | None = None
        self.milter: Any = None  # adapters.smtp.milter.MilterServer when [milter] listen is set
        if cfg.milter.listen is not None and first:
            self.milter = milter_server(cfg, self.handler)

    def _correspondents(self) -> tuple[GroupCommitter, ServedHandler, SessionLimits]:
        """[correspondents]: mail local users send out, relayed and learned from; its own
        committer (durable before 250, as inbound) and its own session limits."""
        cfg = self.cfg
        learn = cfg.correspondents.learn

        def record(
            batch: Sequence[Incoming], *, attachments: Sequence[tuple[str, bytes]] = ()
        ) -> list[Receipt]:
            return self.app.submit_outbound_many(batch, attachments=attachments, learn=learn)

        committer = GroupCommitter(
            self.app,
            self.app.blobs,
            max_batch=cfg.storage.group_commit_max,
            wait_ms=cfg.storage.group_commit_wait_ms,
            on_commit=self._committed,
            record=record,
        )
        handler = ServedHandler(
            committer,
            trusted=self.trusted,
            max_recipients=cfg.limits.max_recipients,
            bounce_address=cfg.challenge.bounce_address,
            delimiter=cfg.policy.recipient_delimiter,
            reply_within=DATABASE_REPLY_WITHIN if cfg.storage.kind == "postgresql" else None,
            outbound=True,
        )
        limits = SessionLimits(cfg.server.max_sessions, cfg.server.max_sessions_per_client)
        return committer, handler, limits

    def _committed(self, receipts: list[Receipt]) -> None:
        if self.metrics is not None:
            self.metrics.committed(receipts)
        # A challenge leaves as soon as its hold is committed, not at the next timer tick.
        # (A copy the MTA keeps in milter mode is not the delivery worker's: no wake for it.)
        if any(r.challenges for r in receipts) or any(
            d.decision.value == "confirm" or (d.decision.value == "deliver" and not r.kept_by_mta)
            for r in receipts
            for d in r.decisions
        ):
            if self.workers is not None:
                self.workers.wake()
            elif self._ring is not None:
                self._ring()

    async def start(self) -> None:
        self.app.refresh_full_mailboxes()
        self.committer.start()
        self.limits.start()
        if self.workers is not None:
            self.workers.start()
        elif self._process is not None:
            self._process.start()
        if self.web is not None:
            self.web.start()
        elif self._web_process is not None:
            self._web_process.start()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_error_handler(LogThrottle()))
        smtp = inbound_server_factory(
            self.handler,
            hostname=self.cfg.server.hostname,
            max_size=self.cfg.limits.max_message_size,
            limits=self.sessions,
        )
        self.server = await loop.create_server(
            lambda: xforward.enable(smtp(), self.trusted),
            host=self.cfg.server.listen_host,
            port=self.cfg.server.listen_port,
            reuse_port=self.reuse_port or None,
        )
        if self.outbound is not None:
            committer, handler, limits = self.outbound
            committer.start()
            outbound = inbound_server_factory(
                handler,
                hostname=self.cfg.server.hostname,
                max_size=self.cfg.limits.max_message_size,
                limits=limits,
            )
            where = Listen(self.cfg.correspondents.listen)
            self.outbound_server = await loop.create_server(
                lambda: xforward.enable(outbound(), self.trusted),
                host=where.host,
                port=where.port,
            )
        if self.milter is not None:
            await loop.run_in_executor(None, self.milter.start)
        if self.metrics is not None:
            listen = self.cfg.metrics.listen
            assert listen is not None
            self.metrics_port = self.metrics.serve(listen.host, listen.port)
        cfg = self.cfg
        if self.mode == "none":
            log.info("acceptor_started", pid=os.getpid(), listen=cfg.server.listen)
            return
        log.info(
            "filter_started",
            listen=cfg.server.listen,
            hostname=cfg.server.hostname,
            workers=self.mode,
            version=version(),
            config_file=str(cfg.file) if cfg.file else None,
            store=str(cfg.storage.url),
            protected=list(cfg.policy.protected),
            relay=str(cfg.challenge.relay),
            next_hop=str(cfg.delivery.next_hop),
            metrics=str(cfg.metrics.listen) if cfg.metrics.listen else None,
            correspondents=str(cfg.correspondents.listen) if cfg.correspondents.listen else None,
            milter=str(cfg.milter.listen) if cfg.milter.listen else None,
            log_file=str(cfg.logging.file) if cfg.logging.file else None,
            config=config_summary(cfg),
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def correspondents_port(self) -> int:
        assert self.outbound_server is not None
        return int(self.outbound_server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, finish every message already accepted, then stop the workers.
        With the database gone, what cannot commit fails within seconds (it got no 250)."""
        begin_stop(self.app)
        loop = asyncio.get_running_loop()
        if self.milter is not None:
            await loop.run_in_executor(None, self.milter.stop)
        for server in (self.server, self.outbound_server):
            if server is not None:
                server.close()
                await server.wait_closed()
        await loop.run_in_executor(None, self.committer.stop)
        if self.outbound is not None:
            await loop.run_in_executor(None, self.outbound[0].stop)
        await loop.run_in_executor(None, self.limits.stop)
        if self.web is not None:
            await loop.run_in_executor(None, self.web.stop)
        if self.workers is not None:
            await loop.run_in_executor(None, self.workers.stop)
        elif self._process is not None:
            self._doorbell.close()
            if self._web_process is not None:
                self._web_doorbell.close()
            for process in (self._process, self._web_process):
                if process is not None and process.is_alive():
                    await loop.run_in_executor(None, process.join, 60)
                    if process.is_alive():
                        process.terminate()
        if self.metrics is not None:
            self.metrics.stop()
        self.app.close()
        if self.mode == "none":
            log.info("acceptor_stopped", pid=os.getpid())
        else:
            log.info("filter_stopped")

    def reopen_logs(self) -> None:
        """SIGHUP: reopen [logging] file here and in the worker process."""
        reopen_log()
        if self._process is not None and self._process.pid is not None:
            os.kill(self._process.pid, signal.SIGHUP)


def milter_server(cfg: Config, handler: FilterHandler) -> Any:
    """The milter listener of [milter] (pymilter, the optional extra `sourceauth[milter]`)."""
    try:
        from sourceauth.adapters.smtp.milter import MilterGate, MilterServer
    except ImportError as exc:
        raise ConfigError(
            f"milter.listen is set but pymilter is missing ({exc}): "
            "pip install 'sourceauth[milter]' (it builds against libmilter-dev)"
        ) from None
    assert cfg.milter.listen is not None
    gate = MilterGate(handler, max_size=cfg.limits.max_message_size)
    return MilterServer(gate, cfg.milter.listen, timeout=cfg.milter.timeout)


def loop_error_handler(throttle: LogThrottle) -> Callable[[Any, dict[str, Any]], None]:
    """The event loop's exception handler: what asyncio would print (an accept() failing for
    want of descriptors, a callback raising) as `loop_error`, each kind at most once per
    throttle interval. asyncio's own handler logs every occurrence with a traceback: under
    descriptor exhaustion that was a gigabyte in seconds."""

    def handle(loop: Any, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message") or "event loop error")
        kind = type(error).__name__ if error is not None else message[:60]
        suppressed = throttle.passes(kind)
        if suppressed is not None:
            log.error(
                "loop_error",
                what=message[:200],
                error=str(error)[:200] if error is not None else None,
                suppressed=suppressed,
            )

    return handle


class _Throttled(logging.Filter):
    """A stdlib filter letting each kind of record (its message template) through at most once
    per throttle interval."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = LogThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        return self.throttle.passes(str(record.msg)[:60]) is not None


def _quiet_aiosmtpd() -> None:
    """aiosmtpd logs every sender and recipient (confirm+TOKEN@ too) at info, and a traceback
    per failed session: keep warnings and errors, each kind at most once per interval."""
    logger = logging.getLogger("mail.log")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _Throttled) for f in logger.filters):
        logger.addFilter(_Throttled())


_DESCRIPTOR_RESERVE = 256  # the store, blobs, outbound connections, the worker's pipes


def fit_descriptor_limit(max_sessions: int) -> None:
    """Raise the soft open-file limit so every allowed session gets a descriptor with room to
    spare; log `descriptor_limit_low` when the hard limit forbids it."""
    import resource

    wanted = max_sessions + _DESCRIPTOR_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    except (ValueError, OSError):
        pass
    if soft < wanted:
        log.warning("descriptor_limit_low", limit=soft, max_sessions=max_sessions, wanted=wanted)


def _port_free(cfg: Config) -> None:
    """Raise OSError (address in use) when anything else listens on [server] listen: the
    acceptors share the port with SO_REUSEPORT, which would otherwise share it silently with
    another program (or another `serve`) too."""
    import socket

    infos = socket.getaddrinfo(
        cfg.server.listen_host, cfg.server.listen_port, type=socket.SOCK_STREAM
    )
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def run_acceptor_process(cfg: Config, doorbell: Any, wake: Any) -> None:
    """Entry point of one more SMTP acceptor (`[server] processes`): its own engine, group
    committer and quarantine-limit refresh on the same storage and the same port
    (SO_REUSEPORT); what it commits wakes the one worker process through `wake` (the write
    end of its Doorbell); it stops when `doorbell` (its own) closes or the first process dies."""
    parent = ParentWatch()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first process decides when to stop
    stop = SignalFlag(signal.SIGTERM)
    configure_logging(cfg.logging.format, cfg.logging.level, file=cfg.logging.file)
    fit_descriptor_limit(cfg.server.max_sessions)
    if parent.gone():
        log.warning("parent_gone", child="acceptor", pid=os.getpid(), parent=parent.pid)
        return

    app = child_engine(cfg, "acceptor", told_to_stop(stop, parent, doorbell))
    if app is None:
        return

    async def main() -> None:
        flt = Filter(cfg, app=app, workers="none", wake=wake, reuse_port=True)
        await flt.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reopen_log)

        def stopped() -> bool:
            return stop.is_set() or parent.gone() or await_doorbell(doorbell, 0.5) == "stop"

        while not await loop.run_in_executor(None, stopped):
            pass
        if parent.gone():  # it stops taking mail at once; what it took is committed first
            log.warning("parent_gone", child="acceptor", pid=os.getpid(), parent=parent.pid)
            parent.exit_after(ORPHAN_GRACE, "acceptor")
        await stop_within_deadline(flt.app, flt.stop(), "acceptor")

    asyncio.run(main())


class Acceptors:
    """The acceptor processes after the first (`[server] processes` - 1)."""

    def __init__(self, cfg: Config, wake: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.doorbell = Doorbell(ctx)  # closed: stop
        self.processes = [
            ctx.Process(
                target=run_acceptor_process,
                args=(cfg, self.doorbell.reader, wake),
                name=f"sourceauth-smtp-{n}",
                daemon=True,
            )
            for n in range(1, cfg.server.acceptors)
        ]

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def hangup(self) -> None:
        for process in self.processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    def stop(self, timeout: float = 90.0) -> None:
        """Each stops accepting and answers every message it took before it exits."""
        self.doorbell.close()
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                log.error("acceptor_stop_timeout", pid=process.pid)
                process.terminate()


def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    fit_descriptor_limit(cfg.server.max_sessions)

    if cfg.logging.file is not None:
        configure_logging(cfg.logging.format, cfg.logging.level, file=cfg.logging.file)

    async def main() -> None:
        many = cfg.server.acceptors > 1
        if many:
            _port_free(cfg)
        flt = Filter(cfg, workers="process", reuse_port=many)
        await flt.start()
        acceptors = Acceptors(cfg, flt._doorbell.writer) if many else None
        if acceptors is not None:
            acceptors.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def hangup() -> None:
            flt.reopen_logs()
            if acceptors is not None:
                acceptors.hangup()

        loop.add_signal_handler(signal.SIGHUP, hangup)
        await stop.wait()
        log.info("filter_stopping")

        async def stop_all() -> None:
            if acceptors is not None:
                # the others stop accepting and commit what they took while this one does too
                stopping = loop.run_in_executor(None, acceptors.stop)
                await flt.stop()
                await stopping
            else:
                await flt.stop()

        await stop_within_deadline(flt.app, stop_all(), "serve")

    asyncio.run(main())
    return 0
