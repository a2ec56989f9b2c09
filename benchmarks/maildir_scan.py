"""`python -m benchmarks.maildir_scan`: one Maildir delivery into a mailbox that already holds
N files (half in new/, half in cur/), `deliver()` in a loop, 4 rounds of 50, best kept, thread
CPU and wall time per delivery. A first attempt (maybe_written=False) looks up new/<name>
alone; a retry (maybe_written=True) scans new/ and cur/ for the id, as every delivery did
before the `maildir` branch. Run another tree with PYTHONPATH=<tree> to compare (a tree
whose `deliver` has no maybe_written scans every time)."""

from __future__ import annotations

import inspect
import tempfile
import time
from pathlib import Path

from sourceauth.adapters.smtp import delivery

RAW = b"From: a@r.test\r\nSubject: x\r\n\r\n" + b"x" * 2000 + b"\r\n"
LABELS = {None: "scan every time", True: "retry (scans)", False: "first attempt"}


def measure(files: int, modes: tuple[bool | None, ...]) -> dict[bool | None, tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="sa-maildir-scan-") as tmp:
        mail = Path(tmp) / "mail"
        hop = delivery.parse_next_hop(f"maildir:{mail}")
        box = mail / "bob@example.test"
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True)
        for i in range(files):
            (box / ("cur" if i % 2 else "new") / f"{i:040x}.mx{':2,S' if i % 2 else ''}").touch()
        runs: dict[bool | None, list[tuple[float, float]]] = {m: [] for m in modes}
        k = 0
        for _ in range(4):
            for mode in modes:
                kw = {} if mode is None else {"maybe_written": mode}
                cpu, wall = time.thread_time(), time.perf_counter()
                for _ in range(50):
                    k += 1
                    delivery.deliver(
                        hop,
                        mail_from="a@r.test",
                        recipients=["bob@example.test"],
                        raw=RAW,
                        sourceauth_id=f"id{k}",
                        **kw,  # type: ignore[arg-type]
                    )
                runs[mode].append(
                    ((time.thread_time() - cpu) / 50e-6, (time.perf_counter() - wall) / 50e-6)
                )
        return {m: (min(r[0] for r in v), min(r[1] for r in v)) for m, v in runs.items()}


def main() -> None:
    has = "maybe_written" in inspect.signature(delivery.deliver).parameters
    modes: tuple[bool | None, ...] = (True, False) if has else (None,)
    for files in (0, 1000, 10000):
        for mode, (cpu, wall) in measure(files, modes).items():
            print(f"files={files:6d} {LABELS[mode]:16s} cpu {cpu:6.0f} us  wall {wall:6.0f} us")


if __name__ == "__main__":
    main()
