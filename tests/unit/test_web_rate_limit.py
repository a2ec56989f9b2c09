"""The web pages' rate limiter: per client address, per clock minute, memory of one minute."""

from __future__ import annotations

from sourceauth.adapters.web.app import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 600.0

    def __call__(self) -> float:
        return self.now


def test_each_client_gets_its_own_allowance_per_minute_and_a_new_minute_resets_it() -> None:
    clock = Clock()
    limiter = RateLimiter(2, clock)
    assert [limiter.allow("192.0.2.1") for _ in range(3)] == [True, True, False]
    assert limiter.allow("192.0.2.2")
    clock.now += 59.0
    assert not limiter.allow("192.0.2.1")
    clock.now += 1.0
    assert limiter.allow("192.0.2.1")
    assert set(limiter.counts) == {"192.0.2.1"}  # last minute's clients are forgotten
