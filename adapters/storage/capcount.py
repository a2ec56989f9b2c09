"""Challenge caps counted in the store, in the transaction that records the challenges: every
node on one database shares the counts (issue 8, item 3).

Two tables beside the events: `sa_cap_counts` (registered domain, minute, challenges; the
domain "*" holds every domain's total) and `sa_cap_mailboxes` (one row per sender mailbox
with its last challenge). The recorder calls `CapCounter.count` while it holds the store's
write lock (SQLite's write transaction; on PostgreSQL the events table's EXCLUSIVE lock, taken
first), so the counts it reads are the last committed and no other node counts in between.
A unit of work that would take a domain or the server over its hourly cap, or a mailbox whose
live challenge belongs to another sender, raises CapsTaken: nothing of it is written, and the
engine decides it again knowing the store's counts. Units without a challenge touch neither
table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from sourceauth.engine.policy import TOTAL
from sourceauth.engine.ports import CapClaim, CapsTaken

CAP_COUNTS = "sa_cap_counts"
CAP_MAILBOXES = "sa_cap_mailboxes"
WINDOW_MINUTES = 60  # a challenge counts in its own minute and the 60 after it (policy.py)


def create_statements(prefix: str, real: str) -> list[str]:
    """CREATE statements for both tables (`prefix` is "" or a quoted schema and a dot)."""
    return [
        f"CREATE TABLE IF NOT EXISTS {prefix}{CAP_COUNTS} (domain TEXT NOT NULL, "
        "minute BIGINT NOT NULL, n BIGINT NOT NULL, PRIMARY KEY (domain, minute))",
        f"CREATE TABLE IF NOT EXISTS {prefix}{CAP_MAILBOXES} (mailbox TEXT PRIMARY KEY, "
        f"sender_id TEXT NOT NULL, challenge_id TEXT NOT NULL, expires {real} NOT NULL)",
    ]


def _row(r: Any) -> tuple[Any, ...]:
    return tuple(r.values()) if isinstance(r, dict) else tuple(r)


class CapCounter:
    """The statements of one store (`mark` is the driver's parameter marker: ? or %s)."""

    def __init__(self, prefix: str = "", mark: str = "?") -> None:
        counts, mailboxes = prefix + CAP_COUNTS, prefix + CAP_MAILBOXES
        self.mark = mark
        # With an encryption key: (context, text) -> the sealed LOOKUP value (viewcrypt.py),
        # so the tables hold no domain or mailbox in plaintext; equal values still meet.
        self.seal: Callable[[str, str], str] | None = None
        self._pruned = -1  # the minute this process last dropped lapsed rows
        self.prune_counts = f"DELETE FROM {counts} WHERE minute < {mark}"
        self.prune_mailboxes = f"DELETE FROM {mailboxes} WHERE expires < {mark}"
        self.add = (
            f"INSERT INTO {counts} AS c (domain, minute, n) VALUES ({mark}, {mark}, {mark}) "
            "ON CONFLICT (domain, minute) DO UPDATE SET n = c.n + excluded.n"
        )
        self.sums = (
            f"SELECT domain, SUM(n) FROM {counts} WHERE minute >= {mark} AND domain IN (@) "
            "GROUP BY domain"
        )
        self.holders = (
            f"SELECT mailbox, sender_id, challenge_id, expires FROM {mailboxes} "
            "WHERE mailbox IN (@)"
        )
        self.hold = (
            f"INSERT INTO {mailboxes} (mailbox, sender_id, challenge_id, expires) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}) ON CONFLICT (mailbox) DO UPDATE SET "
            "sender_id = excluded.sender_id, challenge_id = excluded.challenge_id, "
            "expires = excluded.expires"
        )

    def _in(self, statement: str, n: int) -> str:
        return statement.replace("@", ", ".join([self.mark] * n))

    def count(self, cur: Any, claim: CapClaim) -> None:
        """Count `claim` (call holding the store's write lock); CapsTaken if it cannot be."""
        if self.seal is not None:
            self._count_sealed(cur, claim, self.seal)
        else:
            self._count(cur, claim)

    def _count_sealed(self, cur: Any, claim: CapClaim, seal: Callable[[str, str], str]) -> None:
        domains = {seal("domain", d): d for d, _ in claim.domains}
        mailboxes = {seal("address", m.mailbox): m.mailbox for m in claim.mailboxes}
        sealed = replace(
            claim,
            domains=tuple((seal("domain", d), n) for d, n in claim.domains),
            mailboxes=tuple(
                replace(m, mailbox=seal("address", m.mailbox)) for m in claim.mailboxes
            ),
        )
        try:
            self._count(cur, sealed)
        except CapsTaken as taken:  # the engine decides again on the plaintext names
            raise CapsTaken(
                {domains.get(d, d): n for d, n in taken.counts.items()},
                {mailboxes.get(m, m): v for m, v in taken.mailboxes.items()},
            ) from None

    def _count(self, cur: Any, claim: CapClaim) -> None:
        if claim.minute > self._pruned:  # once a minute per process: lapsed rows go
            cur.execute(self.prune_counts, (claim.minute - WINDOW_MINUTES,))
            cur.execute(self.prune_mailboxes, (claim.now,))
            self._pruned = claim.minute
        taken = self._mailboxes(cur, claim) if claim.mailboxes else {}
        queued = dict(claim.domains)
        queued[TOTAL] = sum(queued.values())
        cur.executemany(self.add, [(d, claim.minute, n) for d, n in queued.items()])
        cur.execute(self._in(self.sums, len(queued)), (claim.minute - WINDOW_MINUTES, *queued))
        counts = {str(d): int(n) for d, n in map(_row, cur.fetchall())}
        over = counts.get(TOTAL, 0) > claim.total or any(
            counts.get(d, 0) > claim.per_domain for d in queued if d != TOTAL
        )
        if over or taken:
            raise CapsTaken({d: counts.get(d, 0) - n for d, n in queued.items()}, taken)

    def _mailboxes(self, cur: Any, claim: CapClaim) -> dict[str, tuple[str, str, float]]:
        wanted = {m.mailbox: m for m in claim.mailboxes}
        cur.execute(self._in(self.holders, len(wanted)), tuple(wanted))
        taken: dict[str, tuple[str, str, float]] = {}
        for mailbox, sender_id, challenge_id, expires in map(_row, cur.fetchall()):
            mine = wanted[mailbox]
            if (
                float(expires) > claim.now
                and sender_id != mine.sender_id
                and challenge_id != mine.replaces
            ):
                taken[mailbox] = (sender_id, challenge_id, float(expires))
        rows: Sequence[tuple[Any, ...]] = [
            (m.mailbox, m.sender_id, m.challenge_id, m.expires) for m in claim.mailboxes
        ]
        cur.executemany(self.hold, rows)
        return taken
