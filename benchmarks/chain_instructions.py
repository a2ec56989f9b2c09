"""The audit hash chain's cost in instructions, which a loaded machine does not move: the
`engine.hash_chain` load (half authorized mail, half first mail from strangers, batches of 200,
SQLite FULL) run under callgrind with the chain attached and detached, instructions counted
only while the load runs (counters zeroed on entering os.getppid, called just before the load,
and dumped on entering os.getpgrp, called just after).

    python -m benchmarks.chain_instructions --messages 2000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.engine import BATCH, FRIEND, batches, make_incoming, open_bench_engine


def inner(chained: bool, messages: int, directory: Path) -> None:
    """The load, in this process, with collection on around it (run under callgrind)."""
    from benchmarks.engine import quiet_production_logging

    quiet_production_logging()
    app = open_bench_engine(directory)
    try:
        if not chained:
            app.recorder.chain_key = None  # type: ignore[attr-defined]
        app.authorize(FRIEND, actor="benchmark", reason="pre-authorized")
        app.receive_many([make_incoming(FRIEND, i) for i in range(BATCH)])  # warm
        load = [
            make_incoming(FRIEND if i % 2 else f"s{i}@d{i % 500}.example.org", i)
            for i in range(messages)
        ]
        os.getppid()  # callgrind --zero-before=os_getppid: counting starts here
        for batch in batches(load):
            app.receive_many(batch)
        os.getpgrp()  # callgrind --dump-before=os_getpgrp: and is written out here
    finally:
        app.close()


def instructions(chained: bool, messages: int, tmp: Path) -> int:
    out = tmp / f"callgrind.{'on' if chained else 'off'}"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--zero-before=os_getppid",
            "--dump-before=os_getpgrp",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "benchmarks.chain_instructions",
            "--inner",
            "on" if chained else "off",
            "--messages",
            str(messages),
            "--dir",
            str(tmp / ("on" if chained else "off")),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    dumped = sorted(tmp.glob(f"{out.name}.*"))  # the dump taken at os_getpgrp: the load alone
    assert dumped, f"callgrind wrote no dump at os_getpgrp in {tmp}"
    found = re.search(r"^(?:summary|totals): (\d+)", dumped[0].read_text(), re.M)
    assert found, f"no instruction total in {out}"
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chain_instructions")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--inner", choices=["on", "off"], default=None)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if args.inner:
        inner(args.inner == "on", args.messages, args.dir)
        return
    with tempfile.TemporaryDirectory(prefix="sa-chain-ir-") as tmp:
        chained = instructions(True, args.messages, Path(tmp))
        detached = instructions(False, args.messages, Path(tmp))
    print(
        f"messages={args.messages} instructions_per_msg chained={chained / args.messages:,.0f} "
        f"detached={detached / args.messages:,.0f} cost={chained / detached - 1:+.1%}"
    )


if __name__ == "__main__":
    main()
