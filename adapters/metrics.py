"""`[metrics] listen`: Prometheus text at /metrics (prometheus_client), names `sourceauth_*`.

Served from its own thread, never the SMTP acceptor's loop: counters are bumped where work
ends (the commit thread, the outbound workers), gauges are read from the store at scrape time
on a read-only connection of their own.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sourceauth.adapters.status import version
from sourceauth.adapters.storage.figures import queue_figures, reader
from sourceauth.adapters.storage.wiring import Storage
from sourceauth.engine.api import Decision, Receipt
from sourceauth.engine.logs import get_logger

log = get_logger(__name__)

# Where one outbound step's outcome is counted: (metric, label) for each (sent, deferred, failed).
CHALLENGE_OUTCOMES = ("sent", "deferred", "failed")
DELIVERY_OUTCOMES = ("delivered", "deferred", "failed")
REPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


UNREADABLE = len(CHALLENGE_OUTCOMES) + len(DELIVERY_OUTCOMES)  # the last slot of the array


class OutboundCounts:
    """Challenges and deliveries by outcome, and delivery attempts that found their original
    unreadable, shared with the worker process (one shared array: the workers add, the
    scrape reads).

    No lock is shared between the processes: a process killed with SIGKILL while holding a
    multiprocessing lock leaves it held for ever (the worker would then block in `add` and
    never stop). Only the worker process writes, its threads under a lock of its own; the
    scrape reads each aligned 64-bit counter without one (each counter only grows)."""

    def __init__(self, context: Any = None) -> None:
        ctx = context or multiprocessing.get_context("spawn")
        self.values = ctx.Array("q", UNREADABLE + 1, lock=False)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"values": self.values}  # a lock is per process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.values = state["values"]
        self._lock = threading.Lock()

    def add(self, offset: int, counts: Sequence[int]) -> None:
        with self._lock:
            for i, n in enumerate(counts):
                self.values[offset + i] += int(n)

    def challenges(self, step: Callable[[], tuple[int, int, int]]) -> Callable[[], None]:
        """`step` (dispatch_challenges), counting what each call returns."""
        return lambda: self.add(0, step())

    def deliveries(self, step: Callable[[], tuple[int, int, int]]) -> Callable[[], None]:
        return lambda: self.add(len(CHALLENGE_OUTCOMES), step())

    def original_unreadable(self) -> None:
        """A delivery attempt found its original missing or failing its SHA-256."""
        self.add(UNREADABLE, (1,))

    def unreadable(self) -> int:
        return int(self.values[UNREADABLE])

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        values = [int(v) for v in self.values]
        n = len(CHALLENGE_OUTCOMES)
        return dict(zip(CHALLENGE_OUTCOMES, values[:n], strict=True)), dict(
            zip(DELIVERY_OUTCOMES, values[n:UNREADABLE], strict=True)
        )


def _by_outcome(name: str, documentation: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, f"{documentation}, by outcome", labels=["outcome"])
    for outcome, n in counts.items():
        family.add_metric([outcome], n)
    return family


class _StoreCollector(Collector):
    """Gauges read from the views at scrape time, and the outbound counters."""

    def __init__(self, storage: Storage, outbound: OutboundCounts) -> None:
        self.connect = reader(storage)
        self.outbound = outbound
        self._conn: Any = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        challenges, deliveries = self.outbound.snapshot()
        yield _by_outcome("sourceauth_challenges", "Challenges handed to the relay", challenges)
        yield _by_outcome("sourceauth_deliveries", "Delivery attempts of copies", deliveries)
        yield CounterMetricFamily(
            "sourceauth_originals_unreadable",
            "Delivery attempts whose original was missing or failed its SHA-256 (the copy "
            "stays queued and is retried)",
            value=self.outbound.unreadable(),
        )
        info = GaugeMetricFamily("sourceauth_info", "This filter's version", labels=["version"])
        info.add_metric([version()], 1)
        yield info
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self.connect()
                figures = queue_figures(self._conn)
            except Exception as exc:
                log.warning("metrics_store_unreadable", error=str(exc))
                self._close()
                yield GaugeMetricFamily("sourceauth_store_up", "The store answered", value=0)
                return
        yield GaugeMetricFamily("sourceauth_store_up", "The store answered", value=1)
        yield GaugeMetricFamily("sourceauth_held_messages", "Copies held", value=figures.held)
        yield GaugeMetricFamily(
            "sourceauth_pending_challenges",
            "Challenges awaiting a reply",
            value=figures.pending_challenges,
        )
        yield GaugeMetricFamily(
            "sourceauth_delivery_queue_depth",
            "Copies awaiting the next hop",
            value=figures.delivery_queue,
        )
        yield GaugeMetricFamily(
            "sourceauth_delivery_queue_oldest_timestamp_seconds",
            "When the oldest copy awaiting the next hop was queued (unix time; 0: none)",
            value=figures.oldest_queued_at or 0.0,
        )

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("metrics_store_close_failed")
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()


class Metrics:
    """The filter's metrics, and the HTTP endpoint that serves them."""

    def __init__(self, storage: Storage, outbound: OutboundCounts | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.outbound = outbound or OutboundCounts()
        self.decisions = Counter(
            "sourceauth_messages",
            "Accepted messages, one per recipient, by decision",
            ["decision"],
            registry=self.registry,
        )
        for decision in Decision:
            self.decisions.labels(decision.value)
        self.reply_latency = Histogram(
            "sourceauth_smtp_reply_seconds",
            "From the end of DATA to the final reply (250 only after the commit)",
            buckets=REPLY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "sourceauth_group_commit_batch_size",
            "Messages committed per group-commit transaction",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.store = _StoreCollector(storage, self.outbound)
        self.registry.register(self.store)
        self._server: Any = None

    def committed(self, receipts: Sequence[Receipt]) -> None:
        """A group commit answered these messages (called on the commit thread)."""
        self.batch_size.observe(len(receipts))
        for receipt in receipts:
            for decided in receipt.decisions:
                self.decisions.labels(decided.decision.value).inc()

    def replied(self, seconds: float) -> None:
        self.reply_latency.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on its own thread; returns the port (useful when 0 was asked)."""
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None
        bound = int(self._server.server_address[1]) if self._server is not None else port
        log.info("metrics_listening", listen=f"{host}:{bound}")
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.store.close()
