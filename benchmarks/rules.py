"""What operator rules cost on the hot path (docs/rules.md).

rules.route: the pure routing of one message (plan + route) against 300 compiled rules
(100 exact, 100 domain, 60 wildcard, 40 regex; the sender matches none, so every level is
tried in both scopes), against the same message with no rule.

rules.engine: `receive_many` of mail whose senders an `allow` wildcard rule among those 300
lets through, against the same mail from a sender on the whitelist with no rule at all.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.engine import (
    FRIEND,
    RECIPIENT,
    _timed,
    batches,
    bench_settings,
    make_incoming,
    open_bench_engine,
    quiet_production_logging,
)
from benchmarks.result import BenchResult
from sourceauth.engine.api import Decision
from sourceauth.engine.rules import EMPTY_BOOK, RuleBook, RuleView
from sourceauth.engine.service.routing import plan, route
from sourceauth.engine.statemachine import SENDER

RULE_COUNT = 300


def _rules() -> list[tuple[str, str, str]]:
    rules: list[tuple[str, str, str]] = []
    for i in range(100):
        rules.append(("block" if i % 2 else "allow", f"person{i}@exact{i}.example", "global"))
        rules.append(("discard" if i % 3 else "allow", f"*@domain{i}.example", "global"))
    for i in range(60):
        rules.append(("block", f"news{i}-*@*.wild{i}.example", "global"))
    for i in range(40):
        rules.append(("allow", rf"re:[a-z]+\.{i}[0-9]*@regex{i}\.example", "global"))
    assert len(rules) == RULE_COUNT
    return rules


def _book(rules: list[tuple[str, str, str]]) -> RuleBook:
    from sourceauth.engine.rules import parse_pattern

    views = []
    for n, (action, pattern, scope) in enumerate(rules):
        parsed = parse_pattern(pattern)
        views.append(
            RuleView(
                f"{n:032x}", action, parsed.text, scope, parsed.kind, "active", "", "", 0.0, 0.0
            )
        )
    return RuleBook(views)


def route_cost(n: int) -> BenchResult:
    settings = bench_settings()
    incoming = make_incoming("stranger@nowhere.example", 0)
    states = {"global": SENDER.initial}
    book = _book(_rules())
    exact = _book([("block", f"person{i}@exact{i}.example", "global") for i in range(RULE_COUNT)])

    def per_message(rules: RuleBook) -> float:
        started = time.perf_counter()
        for _ in range(n):
            route(plan(incoming, settings, rules), incoming, settings, states, rules)
        return (time.perf_counter() - started) / n

    per_message(book)  # warm the caches (address normalization, compiled patterns)
    per_message(exact)
    baseline = with_rules = exact_only = float("inf")
    for _ in range(3):  # interleaved: load hits all three alike
        baseline = min(baseline, per_message(EMPTY_BOOK))
        with_rules = min(with_rules, per_message(book))
        exact_only = min(exact_only, per_message(exact))
    return BenchResult(
        name="rules.route[300 rules]",
        value=with_rules * 1e6,
        unit="us/msg",
        baseline_name="the same plan + route with no rule",
        baseline_value=baseline * 1e6,
        ratio=with_rules / baseline,
        details={
            "messages": n,
            "rules": RULE_COUNT,
            "sender_matches": "none (every level)",
            "exact_300_us": round(exact_only * 1e6, 2),
            "exact_300_ratio": round(exact_only / baseline, 3),
        },
    )


def engine_cost(n: int) -> BenchResult:
    rules = [*_rules(), ("allow", "*@*.partner.example.net", "global")]
    with tempfile.TemporaryDirectory(prefix="sa-bench-rules-") as tmp:
        app = open_bench_engine(Path(tmp) / "rules")
        try:
            app.add_rules(rules, actor="benchmark", reason="benchmark")
            senders = [f"s{i}@eu.partner.example.net" for i in range(n)]
            load = [make_incoming(s, i, RECIPIENT) for i, s in enumerate(senders)]
            app.receive_many(load[:200])
            receipts: list[object] = []
            wall, _ = _timed(lambda: [receipts.extend(app.receive_many(b)) for b in batches(load)])
            assert all(r.decisions[0].decision is Decision.DELIVER for r in receipts)  # type: ignore[attr-defined]
        finally:
            app.close()
        plain = open_bench_engine(Path(tmp) / "plain")
        try:
            plain.authorize(FRIEND, actor="benchmark", reason="pre-authorized")
            load = [make_incoming(FRIEND, i) for i in range(n)]
            plain.receive_many(load[:200])
            base_wall, _ = _timed(lambda: [plain.receive_many(b) for b in batches(load)])
        finally:
            plain.close()
    rate, base_rate = n / wall, n / base_wall
    return BenchResult(
        name="rules.engine[allow by wildcard, 301 rules]",
        value=rate,
        unit="msgs/s",
        baseline_name="the same mail from a whitelisted sender, no rule",
        baseline_value=base_rate,
        ratio=rate / base_rate,
        details={"messages": n, "rules": RULE_COUNT + 1},
    )


def run(scale: float = 1.0) -> list[BenchResult]:
    quiet_production_logging()
    return [route_cost(max(1000, int(20_000 * scale))), engine_cost(max(400, int(4000 * scale)))]
