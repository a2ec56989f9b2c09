"""The inbound server's fast reading of MAIL FROM / RCPT TO paths (issue 13) gives exactly
what aiosmtpd's RFC 5322 parser gives, and leaves everything else to that parser."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from sourceauth.adapters.smtp.inbound import FilterSMTP, SessionLimits

PATHS = [
    "<a@b.c>",
    "<a@b>",
    "<known12@partner3.example.net> SIZE=2048",
    "<a.b+tag@c.d>SIZE=1",
    "<a@b.c>  BODY=8BITMIME SMTPUTF8",
    "<a@b.c> ",
    "<o'hara!x#y$z%w&v*u/t=s?r^q_p`o{n|m}l~k-@ex-ample.org>",
    "<a..b@c.d>",
    '<"quoted local"@c.d>',
    "<a@[192.0.2.1]>",
    "<@route.example:a@b.c>",
    "<a@b.c> (comment) SIZE=1",
    "<üser@exämple.org>",
    " <a@b.c>",
    "a@b.c",
    "<a@b.c",
    "<" + "x" * 70 + "@b.c>",
    "",
]


class _Plain(SMTP):
    """aiosmtpd's own reading, with FilterSMTP's 553 -> 501 mapping."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        address, rest = super()._getaddr(arg)
        return ("", rest) if address is None else (address, rest)


def _server(cls: type[SMTP]) -> SMTP:
    kwargs = {"limits": SessionLimits(10, 10)} if cls is FilterSMTP else {}
    return cls(object(), enable_SMTPUTF8=True, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", PATHS)
def test_fast_path_reading_equals_aiosmtpd(path: str) -> None:
    fast, plain = _server(FilterSMTP), _server(_Plain)
    assert fast._getaddr(path) == plain._getaddr(path)
