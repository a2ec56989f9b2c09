"""Fixtures of the fast unit layer: the service on in-memory persistence (tests/support/service.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sourceauth.engine import tokens
from tests.support.fakes import FakeClock
from tests.support.service import Service, open_service

ServiceFactory = Callable[..., Service]


@pytest.fixture
def make_service(clock: FakeClock, keyring: tokens.Keyring) -> Iterator[ServiceFactory]:
    """make_service(**settings): a fresh service on the test's clock; keyword arguments
    override EngineSettings fields. Closed at teardown."""
    opened: list[Service] = []

    def build(**settings: Any) -> Service:
        service = open_service(clock, keyring, **settings)
        opened.append(service)
        return service

    yield build
    for service in opened:
        service.app.close()


@pytest.fixture
def service(make_service: ServiceFactory) -> Service:
    """The service with the test policy: example.test protected, one global whitelist."""
    return make_service()
