"""Engine throughput: `receive_many` group commits on the SQLite file, against a raw append of
the same stored events through the same recorder. Blob I/O is excluded (refs are pre-made).

Also the shared helpers the other benchmarks use to open an engine and make Incoming.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.result import BenchResult
from sourceauth.engine import tokens
from sourceauth.engine.api import Blob, Decision, Incoming
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.message import Message
from sourceauth.engine.policy import Limits
from sourceauth.engine.settings import EngineSettings

BATCH = 200
PROTECTED = "example.test"
FRIEND = "friend@partner.example.net"
RECIPIENT = f"alice@{PROTECTED}"
MESSAGE_SIZE = 2048
# Every unknown sender is challenged: a load test raises the caps (as DESIGN.md says).
OPEN_LIMITS = Limits(challenges_per_domain_per_hour=10**9, challenges_per_hour=10**9)


_DEVNULL = open(os.devnull, "w")


def quiet_production_logging() -> None:
    """The production structlog config (JSON, level info) writing to /dev/null: every
    decision is still rendered, as in `sourceauth serve`, just not kept."""
    from sourceauth.adapters.runtime import configure_logging

    configure_logging("json", "info", stream=_DEVNULL)


def bench_settings(**overrides: Any) -> EngineSettings:
    values: dict[str, Any] = {
        "protected": (PROTECTED,),
        "confirm_address": f"confirm@{PROTECTED}",
        "bounce_address": f"bounces@{PROTECTED}",
        "limits": OPEN_LIMITS,
    }
    values.update(overrides)
    return EngineSettings(**values)


def open_bench_engine(
    directory: Path,
    *,
    synchronous: str = "FULL",
    settings: EngineSettings | None = None,
    keyring: tokens.Keyring | None = None,
    encryption_key: bytes | None = None,
    **kwargs: Any,
) -> SourceAuth:
    """An engine on a fresh SQLite file under `directory` (the embedded default wiring)."""
    from sourceauth.adapters.storage.encryption import KeySet
    from sourceauth.adapters.storage.wiring import Storage, open_engine

    directory.mkdir(parents=True, exist_ok=True)
    storage = Storage(
        sqlite_path=directory / "sourceauth.db",
        blob_dir=directory / "blobs",
        sqlite_synchronous=synchronous,
        encryption_keys=None if encryption_key is None else KeySet.of(encryption_key),
    )
    return open_engine(
        settings=settings or bench_settings(),
        keyring=keyring or tokens.generate_keyring(),
        storage=storage,
        **kwargs,
    )


def make_incoming(sender: str, n: int, recipient: str = RECIPIENT) -> Incoming:
    """One accepted 2 KB message whose blob is already stored (a pre-made ref)."""
    key = uuid.uuid4().hex
    return Incoming(
        mail_from=sender,
        recipients=(recipient,),
        blob=Blob(key, MESSAGE_SIZE, hashlib.sha256(key.encode()).hexdigest()),
        headers=(
            ("From", sender),
            ("To", recipient),
            ("Subject", f"benchmark message {n}"),
            ("Message-ID", f"<{key}@bench.example.net>"),
            ("Date", "Mon, 01 Jan 2024 00:00:00 +0000"),
        ),
    )


def batches(items: Sequence[Incoming], size: int = BATCH) -> list[Sequence[Incoming]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def _received_event(incoming: Incoming, now: float) -> Any:
    """The Message.Accepted event `receive` records for an authorized sender, built the same way."""
    msg = Message._create(
        Message.Accepted,
        id=uuid.uuid4(),
        timestamp=datetime.fromtimestamp(now, tz=UTC),
        receipt_id=incoming.blob.key,
        size=incoming.blob.size,
        sha256=incoming.blob.sha256,
        sender=incoming.mail_from,
        sender_id="",
        recipients=list(incoming.recipients),
        subject=dict(incoming.headers)["Subject"][:300],
        message_id_header=dict(incoming.headers)["Message-ID"][:300],
        actor="engine",
        reason="sender_authorized",
        expires_at=0.0,
    )
    return msg.collect_events()[0]


def _raw_append(directory: Path, synchronous: str, stored_batches: list[list[Any]]) -> float:
    """Seconds to insert these stored-event batches (one transaction each) into a fresh log;
    the first batch is a warm-up, not timed."""
    raw = open_bench_engine(directory, synchronous=synchronous)
    try:
        warm, timed = stored_batches[0], stored_batches[1:]
        raw.recorder.insert_events(warm)
        wall, _ = _timed(lambda: [raw.recorder.insert_events(b) for b in timed])
        return wall
    finally:
        raw.close()


def _raw_pipeline(
    directory: Path, synchronous: str, warm: list[Incoming], load: list[Incoming]
) -> tuple[float, float, float]:
    """The baseline for authorized mail: build each Message.Accepted exactly as the engine does,
    map it with app.mapper.to_stored_event and insert 200 per transaction with
    app.recorder.insert_events into a fresh log. Returns (total, insert-only, build+map) seconds."""
    raw = open_bench_engine(directory, synchronous=synchronous)
    try:
        now = time.time()
        raw.recorder.insert_events(
            [raw.mapper.to_stored_event(_received_event(i, now)) for i in warm]
        )
        build = insert = 0.0
        for chunk in batches(load):
            t0 = time.perf_counter()
            stored = [raw.mapper.to_stored_event(_received_event(i, now)) for i in chunk]
            t1 = time.perf_counter()
            raw.recorder.insert_events(stored)
            t2 = time.perf_counter()
            build += t1 - t0
            insert += t2 - t1
        return build + insert, insert, build
    finally:
        raw.close()


def authorized(n: int, synchronous: str) -> BenchResult:
    """Messages from one pre-authorized sender: one Message.Accepted each, 200 per commit."""
    with tempfile.TemporaryDirectory(prefix="sa-bench-engine-") as tmp:
        app = open_bench_engine(Path(tmp) / "engine", synchronous=synchronous)
        try:
            app.authorize(FRIEND, actor="benchmark", reason="pre-authorized")
            warm = [make_incoming(FRIEND, i) for i in range(BATCH)]
            load = [make_incoming(FRIEND, i) for i in range(n)]
            app.receive_many(warm)
            receipts: list[Any] = []
            wall, cpu = _timed(
                lambda: [receipts.extend(app.receive_many(b)) for b in batches(load)]
            )
            assert all(r.decisions[0].decision == Decision.DELIVER for r in receipts)
        finally:
            app.close()
        # Baseline: the same events, built the same way, mapped and appended raw (timed together).
        raw_wall, insert_wall, build_wall = _raw_pipeline(
            Path(tmp) / "raw", synchronous, warm, load
        )
    rate, raw_rate = n / wall, n / raw_wall
    ratio = rate / raw_rate
    default = synchronous == "FULL"
    return BenchResult(
        name=f"engine.authorized[{synchronous}]",
        value=rate,
        unit="msgs/s",
        baseline_name="build + to_stored_event + insert_events, same events, same recorder",
        baseline_value=raw_rate,
        ratio=ratio,
        target="≥ 10,000/s and ≥ 0.7x" if default else "",
        passed=(rate >= 10_000 and ratio >= 0.7) if default else True,
        details={
            "messages": n,
            "batch": BATCH,
            "engine_cpu_us_per_msg": round(cpu / n * 1e6, 1),
            "engine_wall_us_per_msg": round(wall / n * 1e6, 1),
            "baseline_us_per_event": round(raw_wall / n * 1e6, 1),
            "baseline_insert_only_us_per_event": round(insert_wall / n * 1e6, 1),
            "baseline_build_and_map_us_per_event": round(build_wall / n * 1e6, 1),
            "ratio_vs_insert_only": round(rate / (n / insert_wall), 3),
            "blob_io": "excluded (pre-made refs)",
        },
    )


def unknown(n: int, synchronous: str) -> BenchResult:
    """First message from a distinct new sender each: Sender.FirstChallenged (challenge queued)
    and Message.Challenged (held), 200 messages per commit."""
    with tempfile.TemporaryDirectory(prefix="sa-bench-engine-") as tmp:
        app = open_bench_engine(Path(tmp) / "engine", synchronous=synchronous)
        try:

            def sender(i: int) -> str:
                return f"stranger{i}@d{i % 1000}.example.org"

            warm = [make_incoming(sender(-1 - i), i) for i in range(BATCH)]
            load = [make_incoming(sender(i), i) for i in range(n)]
            app.receive_many(warm)
            receipts: list[Any] = []
            wall, cpu = _timed(
                lambda: [receipts.extend(app.receive_many(b)) for b in batches(load)]
            )
            assert all(
                r.decisions[0].decision == Decision.CHALLENGE and r.challenges for r in receipts
            )
            # Every event recorded (warm-up first), read back: the raw-append baseline (info only).
            stored: list[Any] = []
            position = 0
            while True:
                page = app.recorder.select_notifications(position, 5000, inclusive_of_start=False)
                if not page:
                    break
                stored.extend(page)
                position = page[-1].id
        finally:
            app.close()
        per_commit = 2 * BATCH
        raw_wall = _raw_append(
            Path(tmp) / "raw",
            synchronous,
            [stored[i : i + per_commit] for i in range(0, len(stored), per_commit)],
        )
    rate, raw_rate = n / wall, n / raw_wall
    default = synchronous == "FULL"
    return BenchResult(
        name=f"engine.unknown[{synchronous}]",
        value=rate,
        unit="msgs/s",
        baseline_name="raw insert_events of the same stored events (info)",
        baseline_value=raw_rate,
        ratio=rate / raw_rate,
        target="≥ 5,000/s" if default else "",
        passed=rate >= 5_000 if default else True,
        details={
            "messages": n,
            "events": len(stored) - 2 * BATCH,
            "batch": BATCH,
            "engine_cpu_us_per_msg": round(cpu / n * 1e6, 1),
            "engine_wall_us_per_msg": round(wall / n * 1e6, 1),
            "raw_wall_us_per_msg": round(raw_wall / n * 1e6, 1),
            "blob_io": "excluded (pre-made refs)",
        },
    )


def _paired(
    tmp: str,
    n: int,
    rounds: int,
    variant: Callable[[SourceAuth, bool], None],
    opening: Callable[[bool], dict[str, Any]] = lambda on: {},
) -> tuple[dict[bool, float], dict[bool, float]]:
    """Best msgs/s and CPU us/msg of one load (half authorized, half first mail from
    strangers), FULL, on fresh engines with `variant(app, True)` and `variant(app, False)`
    applied, interleaved; best of `rounds` each. `opening(on)` gives open_bench_engine's
    keyword arguments."""
    best = {True: 0.0, False: 0.0}
    cpu_best = {True: 1e9, False: 1e9}
    for r in range(rounds):
        for on in (True, False):
            app = open_bench_engine(Path(tmp) / f"{r}-{on}", **opening(on))
            try:
                variant(app, on)
                app.authorize(FRIEND, actor="benchmark", reason="pre-authorized")
                app.receive_many([make_incoming(FRIEND, i) for i in range(BATCH)])
                load = [
                    make_incoming(FRIEND if i % 2 else f"s{r}x{i}@d{i % 500}.example.org", i)
                    for i in range(n)
                ]
                wall, cpu = _timed(lambda: [app.receive_many(b) for b in batches(load)])  # noqa: B023
            finally:
                app.close()
            best[on] = max(best[on], n / wall)
            cpu_best[on] = min(cpu_best[on], cpu / n * 1e6)
    return best, cpu_best


def _paired_result(
    name: str,
    baseline: str,
    best: dict[bool, float],
    cpu_best: dict[bool, float],
    n: int,
    rounds: int,
    floor: float,
) -> BenchResult:
    ratio = best[True] / best[False]
    return BenchResult(
        name=name,
        value=best[True],
        unit="msgs/s",
        baseline_name=baseline,
        baseline_value=best[False],
        ratio=ratio,
        target=f"≥ {floor}x" if floor else "",
        passed=ratio >= floor,
        details={
            "messages": n,
            "rounds": rounds,
            "batch": BATCH,
            "cpu_us_per_msg_on": round(cpu_best[True], 1),
            "cpu_us_per_msg_off": round(cpu_best[False], 1),
            "cpu_ratio": round(cpu_best[False] / cpu_best[True], 3),
        },
    )


def _switch_cost(
    n: int, rounds: int, name: str, switch: Callable[[SourceAuth], None], baseline: str
) -> BenchResult:
    """The same load with a feature on, and off (`switch(app)` turns it off)."""

    def variant(app: SourceAuth, on: bool) -> None:
        if not on:
            switch(app)

    with tempfile.TemporaryDirectory(prefix="sa-bench-switch-") as tmp:
        best, cpu = _paired(tmp, n, rounds, variant)
    floor = 0.9 if name.startswith("engine.hash_chain") else 0.0
    return _paired_result(
        name,
        f"same load, {baseline} (half authorized, half first mail)",
        best,
        cpu,
        n,
        rounds,
        floor,
    )


def chain_cost(n: int, rounds: int = 2) -> BenchResult:
    """The audit hash chain's cost on the engine bars: first mail from strangers (2 events per
    message) and authorized mail, with the chain attached and detached (chain_key None)."""

    def detach(app: SourceAuth) -> None:
        app.recorder.chain_key = None  # type: ignore[attr-defined]

    return _switch_cost(n, rounds, "engine.hash_chain[FULL]", detach, "chain detached")


def shared_caps_cost(n: int, rounds: int = 2) -> BenchResult:
    """Caps counted in the store (every unit with a challenge counts them in its transaction)
    against caps counted per process only (the recorder's cap_counter None), same load."""

    def per_process(app: SourceAuth) -> None:
        app.recorder.cap_counter = None  # type: ignore[attr-defined]

    return _switch_cost(n, rounds, "engine.shared_caps[FULL]", per_process, "caps per process")


def encryption_cost(n: int, rounds: int = 2) -> BenchResult:
    """Event state through eventsourcing's AES-GCM cipher, against the same load unencrypted
    (originals are pre-made refs here: their AES-GCM cost is measured apart, per 2 KB)."""
    from sourceauth.adapters.storage.encryption import BlobCipher, KeySet

    key = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="sa-bench-crypt-") as tmp:
        best, cpu = _paired(
            tmp, n, rounds, lambda app, on: None, lambda on: {"encryption_key": key if on else None}
        )
    result = _paired_result(
        "engine.encryption[FULL]",
        "same load, not encrypted (half authorized, half first mail)",
        best,
        cpu,
        n,
        rounds,
        0.0,
    )
    cipher, original = BlobCipher(KeySet.of(key)), os.urandom(MESSAGE_SIZE)
    count = 2000
    wall, _ = _timed(
        lambda: [
            cipher.decrypt(f"{i:032x}", cipher.encrypt(f"{i:032x}", original)) for i in range(count)
        ]
    )
    result.details["original_2KB_encrypt_and_decrypt_us"] = round(wall / count * 1e6, 1)
    return result


def run(scale: float = 1.0) -> list[BenchResult]:
    quiet_production_logging()
    quick = scale < 1
    n_auth = 2_000 if quick else int(40_000 * scale) // BATCH * BATCH
    n_unknown = 1_000 if quick else int(20_000 * scale) // BATCH * BATCH
    results = []
    for synchronous in ("FULL", "NORMAL"):
        results.append(authorized(n_auth, synchronous))
        results.append(unknown(n_unknown, synchronous))
    results.append(chain_cost(n_unknown))
    results.append(shared_caps_cost(n_unknown))
    results.append(encryption_cost(n_unknown))
    return results
