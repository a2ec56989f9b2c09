"""One benchmark's outcome: figures measured in one run, and the bar they are held to."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BenchResult:
    """A named measurement; `ratio` is against the baseline measured in the same run."""

    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float = 0.0
    ratio: float = 0.0
    target: str = ""
    passed: bool = True
    details: dict[str, float | int | str] = field(default_factory=dict)
