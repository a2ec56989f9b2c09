"""pymilter (the `milter` extra) for the tests that need it: skipped with the reason where it
is not installed, a failure in CI (`.ci/run` installs libmilter-dev and the extra)."""

from __future__ import annotations

import os

import pytest


def need_pymilter() -> None:
    try:
        import Milter  # noqa: F401
    except ImportError:
        why = "pymilter missing: apt-get install libmilter-dev, then pip install -e '.[milter]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why} (.ci/run installs both)", pytrace=False)
        pytest.skip(why)
