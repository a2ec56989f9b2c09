"""The views' sealing (adapters/storage/viewcrypt.py): deterministic where lookups need it,
bound to the row where they do not, opened back to the plaintext, refused under another key."""

from __future__ import annotations

import os
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sourceauth.adapters.storage.capcount import CapCounter, create_statements
from sourceauth.adapters.storage.viewcrypt import (
    ADDRESS,
    LIST,
    LOOKUP,
    REASON,
    ROW,
    SealBroken,
    ViewSealer,
)
from sourceauth.engine import projections as p
from sourceauth.engine.ports import CapClaim, CapsTaken, MailboxClaim
from sourceauth.engine.service.caps import RATE_LIMITED

SEALER = ViewSealer(os.urandom(32))


@given(st.text(min_size=1, max_size=300))
def test_every_kind_opens_to_its_plaintext(text: str) -> None:
    for kind in (LOOKUP, ROW, REASON):
        sealed = SEALER.seal(kind, ADDRESS, "subject", "k1", text)
        assert text.encode() not in sealed.encode() or len(text) < 8
        assert SEALER.open(kind, ADDRESS, "subject", "k1", sealed) == text


def test_lookup_values_are_equal_for_equal_addresses_and_safe_in_like() -> None:
    a = SEALER.address("zebra@remote.test")
    assert a == SEALER.address("zebra@remote.test") != SEALER.address("Zebra@remote.test")
    assert not set(a) & set("%_!\n")  # a LIKE pattern and the newline-joined lists stay exact
    assert ViewSealer(os.urandom(32)).address("zebra@remote.test") != a  # keyed


def test_row_values_differ_between_rows_and_do_not_open_in_another() -> None:
    one = SEALER.seal(ROW, "", "subject", "row1", "Lunch")
    assert one == SEALER.seal(ROW, "", "subject", "row1", "Lunch")  # a rebuild writes the same
    assert one != SEALER.seal(ROW, "", "subject", "row2", "Lunch")
    with pytest.raises(SealBroken):
        SEALER.open(ROW, "", "subject", "row2", one)
    with pytest.raises(SealBroken):
        ViewSealer(os.urandom(32)).open(ROW, "", "subject", "row1", one)


def test_lengths_leak_only_to_sixteen_bytes() -> None:
    lengths = {len(SEALER.address("a" * n + "@x.test")) for n in range(1, 8)}
    assert len(lengths) == 1


def test_a_recipient_list_seals_each_address_and_a_cap_reason_keeps_its_prefix() -> None:
    sealed = SEALER.seal(LIST, ADDRESS, "recipients", "m1", "a@x.test\nb@x.test")
    assert sealed.split("\n") == [SEALER.address("a@x.test"), SEALER.address("b@x.test")]
    reason = RATE_LIMITED + "domain remote.test over 100/h"
    held = SEALER.value(p.QUARANTINE, "reason", "m1", reason)
    assert held.startswith(RATE_LIMITED) and "remote" not in held
    assert SEALER.open(REASON, "", "reason", "m1", held) == reason


def test_rows_seal_only_the_mail_text_and_open_with_their_key_selected() -> None:
    cols = ("message_id", "sender", "subject", "state", "size")
    row = ("m1", "zebra@remote.test", "Lunch", "held", 12)
    sealed = SEALER.seal_row(p.QUARANTINE, cols, row)
    assert sealed[0] == "m1" and sealed[3:] == ("held", 12)
    assert SEALER.open_row(p.QUARANTINE, cols, sealed) == row
    with pytest.raises(ValueError):
        SEALER.open_row(p.QUARANTINE, cols[1:], sealed[1:])


def test_caps_counted_sealed_still_refuse_over_the_cap_and_name_the_plaintext() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in create_statements("", "REAL"):
        conn.execute(statement)
    counter = CapCounter()
    counter.seal = SEALER.lookup

    def claim(mailbox: str, sender_id: str) -> CapClaim:
        return CapClaim(
            now=100.0,
            minute=1,
            domains=(("remote.test", 1),),
            per_domain=2,
            total=10,
            mailboxes=(MailboxClaim(mailbox, sender_id, "c-" + sender_id, 1000.0),),
        )

    cur = conn.cursor()

    def count(claimed: CapClaim) -> None:  # as the recorder: a refused unit writes nothing
        cur.execute("BEGIN")
        try:
            counter.count(cur, claimed)
        except CapsTaken:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    count(claim("a@remote.test", "s1"))
    with pytest.raises(CapsTaken) as taken:  # another sender's live challenge holds a's mailbox
        count(claim("a@remote.test", "s2"))
    assert set(taken.value.mailboxes) == {"a@remote.test"}
    count(claim("b@remote.test", "s3"))
    with pytest.raises(CapsTaken) as over:  # the third challenge to remote.test this hour
        count(claim("c@remote.test", "s4"))
    assert over.value.counts["remote.test"] >= 2
    raw = repr(conn.execute("SELECT * FROM sa_cap_counts, sa_cap_mailboxes").fetchall())
    assert "remote" not in raw and SEALER.domain("remote.test") in raw
