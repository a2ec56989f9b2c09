"""`python -m benchmarks [--quick] [--only NAME ...] [--json FILE]`: run every benchmark,
print one table against the quality bars (DESIGN.md section 9), optionally write JSON.

A measurement, not a test: the exit status is 0 even when a bar is missed (it says MISSED).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from benchmarks.result import BenchResult

MODULES = (
    "transcoder",
    "engine",
    "rebuild",
    "smtp",
    "delivery",
    "memory",
    "nodes",
    "rules",
    "postfix",
)
FULL_SCALE = 1.0
QUICK_SCALE = 0.1


def _number(value: float) -> str:
    if value == 0:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _verdict(result: BenchResult) -> str:
    if not result.target:
        return "info"
    return "PASS" if result.passed else "FAIL"


def print_table(results: list[BenchResult]) -> None:
    headers = ("benchmark", "value", "unit", "baseline", "ratio", "target", "verdict")
    rows = [
        (
            r.name,
            _number(r.value),
            r.unit,
            _number(r.baseline_value),
            f"{r.ratio:.3f}x" if r.ratio else "-",
            r.target or "(informative)",
            _verdict(r),
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    for r in results:
        if r.baseline_name or r.details:
            print(f"{r.name}: baseline = {r.baseline_name or '-'}")
            detail = ", ".join(f"{k}={v}" for k, v in r.details.items())
            if detail:
                print(f"    {detail}")


def run_module(name: str, scale: float) -> list[BenchResult]:
    """One benchmark module's results; a module that fails is reported, not fatal."""
    started = time.perf_counter()
    print(f"# {name} (scale {scale:g}) ...", file=sys.stderr, flush=True)
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        results = list(module.run(scale))
    except Exception as exc:  # one broken benchmark must not hide the others
        traceback.print_exc()
        results = [
            BenchResult(
                name=f"{name}.ERROR",
                value=0.0,
                unit="",
                target="runs",
                passed=False,
                details={"error": f"{type(exc).__name__}: {exc}"[:300]},
            )
        ]
    gc.collect()
    print(f"# {name} done in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small scale, for a CI smoke run")
    parser.add_argument(
        "--only", nargs="+", choices=MODULES, metavar="NAME", help=f"some of {MODULES}"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    scale = QUICK_SCALE if args.quick else FULL_SCALE
    started = time.perf_counter()
    results: list[BenchResult] = []
    for name in args.only or MODULES:
        results.extend(run_module(name, scale))
    elapsed = time.perf_counter() - started
    print()
    print_table(results)
    missed = [r.name for r in results if r.target and not r.passed]
    print()
    if missed:
        print(f"MISSED {len(missed)} bar(s): {', '.join(missed)}")
    else:
        print("every bar met")
    python = platform.python_version()
    print(f"({elapsed:.0f}s, scale {scale:g}, {os.cpu_count()} CPUs, Python {python})")
    if args.json:
        report: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
            "scale": scale,
            "seconds": round(elapsed, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "missed": missed,
            "results": [dataclasses.asdict(r) for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
