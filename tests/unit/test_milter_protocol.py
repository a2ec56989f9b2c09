"""What the milter negotiates with the MTA: the steps it answers and those it skips.

The DATA step must be answered, not skipped: with it skipped (P_NODATA) Postfix writes the
DATA-stage macros as a packet of their own, and over TCP its next write waits by Nagle's rule
for the delayed ACK of that packet, 40 ms a message (docs/postfix.md)."""

from __future__ import annotations

from tests.support.milter import need_pymilter


def _milter() -> object:
    need_pymilter()
    import Milter

    return Milter


def _negotiated() -> tuple[int, object]:
    Milter = _milter()
    from sourceauth.adapters.smtp.milter import MilterSession

    offered = 0
    for name in dir(Milter):
        if name.startswith("P_"):
            offered |= getattr(Milter, name)  # everything Postfix 3 offers
    opts = [0x1FF, offered, 0, 0]  # every action, every protocol step
    session = MilterSession.__new__(MilterSession)  # negotiate reads the class's callbacks
    assert session.negotiate(opts) == Milter.CONTINUE  # type: ignore[attr-defined]
    return opts[1], Milter


def test_the_data_step_is_answered_not_skipped() -> None:
    protocol, Milter = _negotiated()
    assert not protocol & Milter.P_NODATA  # type: ignore[attr-defined]
    assert not protocol & Milter.P_NR_DATA  # type: ignore[attr-defined]


def test_steps_that_need_no_answer_are_not_answered_and_headers_keep_their_space() -> None:
    protocol, Milter = _negotiated()
    for bit in ("P_NR_HDR", "P_NR_EOH", "P_NR_BODY", "P_HDR_LEADSPC"):
        assert protocol & getattr(Milter, bit), bit
    for bit in ("P_NOMAIL", "P_NORCPT", "P_NOHDRS", "P_NOBODY", "P_NR_MAIL", "P_NR_RCPT"):
        assert not protocol & getattr(Milter, bit), bit
