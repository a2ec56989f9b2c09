"""Composition root: turns the operator's Config into a running engine with its adapters,
and runs `serve` (inbound SMTP, challenge sender, delivery worker, maintenance timer).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import orjson
import structlog

from sourceauth.adapters.config import (
    Config,
    config_summary,
    engine_settings,
    load_or_create_keyring,
)
from sourceauth.adapters.smtp.challenge import DEFAULT_BODY_TEMPLATE, DEFAULT_SUBJECT_TEMPLATE
from sourceauth.adapters.smtp.inbound import (
    FilterHandler,
    GroupCommitter,
    SessionLimits,
    inbound_server_factory,
)
from sourceauth.adapters.smtp.outbound import ChallengeSender, NextHopDelivery
from sourceauth.adapters.storage.blobs import FileBlobStore
from sourceauth.adapters.storage.dbblobs import DatabaseBlobStore
from sourceauth.adapters.storage.wiring import Storage, open_blobs, open_engine
from sourceauth.engine.api import Receipt
from sourceauth.engine.application import SourceAuth, system_clock
from sourceauth.engine.logs import LogThrottle, get_logger, redact_tokens
from sourceauth.engine.ports import Clock

log = get_logger(__name__)


def configure_logging(fmt: str = "json", level: str = "info", stream: Any = None) -> None:
    """structlog: JSON lines (orjson, bytes straight to the stream) in production, a console
    renderer for people; never print."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        redact_tokens,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    out = stream or sys.stderr
    factory: Any
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory = structlog.BytesLoggerFactory(file=getattr(out, "buffer", out))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
        factory = structlog.PrintLoggerFactory(file=out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def storage_of(cfg: Config) -> Storage:
    """The storage wiring for [storage]: each Storage field the configuration sets, by name
    (the URL fills every pg_* field, so no default is repeated here)."""
    values = {item.name: getattr(cfg.storage, item.name, None) for item in fields(Storage)}
    return Storage(**{name: value for name, value in values.items() if value is not None})


def build_engine(
    cfg: Config,
    *,
    clock: Clock = system_clock,
    environ: dict[str, str] | None = None,
    transports: bool = True,
) -> SourceAuth:
    """The engine for this configuration, with its challenge and delivery transports."""
    cfg.server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = load_or_create_keyring(
        cfg.challenge, dict(os.environ if environ is None else environ)
    )
    storage = storage_of(cfg)
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
        )
        deliveries = NextHopDelivery(
            next_hop=cfg.delivery.next_hop_endpoint,
            blobs=blobs,
            hostname=cfg.server.hostname,
        )
    return open_engine(
        settings=engine_settings(cfg),
        keyring=keyring,
        storage=storage,
        clock=clock,
        challenges=challenges,
        deliveries=deliveries,
        blobs=blobs,
    )


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

    def __init__(self, app: SourceAuth, cfg: Config) -> None:
        self.challenges = Worker("challenges", app.dispatch_challenges, 1.0, min_gap=0.05)
        self.deliveries = Worker("deliveries", app.dispatch_deliveries, 1.0, min_gap=0.05)
        self.maintenance = Worker(
            "maintenance", lambda: app.maintain(dispatch=False), cfg.maintenance.interval
        )
        self.all = (self.challenges, self.deliveries, self.maintenance)

    def start(self) -> None:
        for worker in self.all:
            worker.start()
        self.wake()  # pick up whatever a previous run left queued

    def wake(self) -> None:
        self.challenges.wake.set()
        self.deliveries.wake.set()

    def stop(self) -> None:
        for worker in self.all:
            worker.stop()


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that started it dies (even by kill -9)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("pdeathsig_unavailable")


def run_worker_process(cfg: Config, stop: Any, wake: Any) -> None:
    """Entry point of the worker process: its own engine on the same storage; the event log
    is the only thing it shares with the SMTP process."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the SMTP process decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    configure_logging(cfg.logging.format, cfg.logging.level)
    app = build_engine(cfg)
    workers = Workers(app, cfg)
    workers.start()
    parent = multiprocessing.parent_process()
    log.info("workers_started", pid=os.getpid())
    try:
        while not stop.is_set():
            if wake.wait(0.2):
                wake.clear()
                workers.wake()
            if parent is not None and not parent.is_alive():
                break
    finally:
        workers.stop()
        app.close()
        log.info("workers_stopped", pid=os.getpid())


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
    ) -> None:
        self.cfg = cfg
        self.app = app or build_engine(cfg, clock=clock)
        assert isinstance(self.app.blobs, FileBlobStore | DatabaseBlobStore)
        self.mode = workers
        self.workers: Workers | None = Workers(self.app, cfg) if workers == "thread" else None
        self._process: Any = None
        if workers == "process":
            ctx = multiprocessing.get_context("spawn")
            self._stop = ctx.Event()
            self._wake = ctx.Event()
            self._process = ctx.Process(
                target=run_worker_process,
                args=(cfg, self._stop, self._wake),
                name="sourceauth-workers",
                daemon=True,
            )
        self.committer = GroupCommitter(
            self.app,
            self.app.blobs,
            max_batch=cfg.storage.group_commit_max,
            wait_ms=cfg.storage.group_commit_wait_ms,
            on_commit=self._committed,
        )
        self.handler = FilterHandler(
            self.committer,
            max_recipients=cfg.limits.max_recipients,
            bounce_address=cfg.challenge.bounce_address,
            delimiter=cfg.policy.recipient_delimiter,
        )
        self.limits = Worker("quarantine-limits", self.app.refresh_full_mailboxes, 0.5)
        self.sessions = SessionLimits(cfg.server.max_sessions, cfg.server.max_sessions_per_client)
        _quiet_aiosmtpd()
        self.server: asyncio.AbstractServer | None = None

    def _committed(self, receipts: list[Receipt]) -> None:
        # A challenge leaves as soon as its hold is committed, not at the next timer tick.
        if any(r.challenges for r in receipts) or any(
            d.decision.value in ("deliver", "confirm") for r in receipts for d in r.decisions
        ):
            if self.workers is not None:
                self.workers.wake()
            else:
                self._wake.set()

    async def start(self) -> None:
        self.app.refresh_full_mailboxes()
        self.committer.start()
        self.limits.start()
        if self.workers is not None:
            self.workers.start()
        else:
            self._process.start()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_error_handler(LogThrottle()))
        self.server = await loop.create_server(
            inbound_server_factory(
                self.handler,
                hostname=self.cfg.server.hostname,
                max_size=self.cfg.limits.max_message_size,
                limits=self.sessions,
            ),
            host=self.cfg.server.listen_host,
            port=self.cfg.server.listen_port,
        )
        log.info(
            "filter_started",
            listen=self.cfg.server.listen,
            hostname=self.cfg.server.hostname,
            workers=self.mode,
            config=config_summary(self.cfg),
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, finish every message already accepted, then stop the workers."""
        loop = asyncio.get_running_loop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await loop.run_in_executor(None, self.committer.stop)
        await loop.run_in_executor(None, self.limits.stop)
        if self.workers is not None:
            await loop.run_in_executor(None, self.workers.stop)
        elif self._process is not None and self._process.is_alive():
            self._stop.set()
            await loop.run_in_executor(None, self._process.join, 60)
            if self._process.is_alive():
                self._process.terminate()
        self.app.close()
        log.info("filter_stopped")


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


def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    fit_descriptor_limit(cfg.server.max_sessions)

    async def main() -> None:
        flt = Filter(cfg, workers="process")
        await flt.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("filter_stopping")
        await flt.stop()

    asyncio.run(main())
    return 0
