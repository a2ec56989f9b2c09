"""What the web pages cost the SMTP path: the real filter as `sourceauth serve` runs it (outbound
workers and web pages in processes of their own) under the SMTP benchmark's load (benchmarks/
smtp.py: 10 sessions, 2 KB messages, half known senders, half strangers), three ways in
interleaved rounds, best of each kept: the web off; on and idle; on and busy (a client in its
own process fetching a confirmation page and a review page back to back, as fast as it can).

    python -m benchmarks.web_cost [--count 2000] [--seconds 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.smtp import (
    FILTER_CONFIG,
    HOST,
    KNOWN_SENDERS,
    PROTECTED,
    _free_port,
    _rate,
    client,
    known_sender,
)

WEB_CONFIG = '\n[web]\nlisten = "{host}:{port}"\nrequests_per_minute = 100000000\n'


def fetch_pages(port: int, paths: list[str], until: float, progress: list[int]) -> int:
    """Fetch `paths` round-robin over one keep-alive connection until `until`; returns the
    count (also kept in progress[0], for a fetcher stopped early)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    while time.time() < until:
        conn.request("GET", paths[progress[0] % len(paths)])
        conn.getresponse().read()
        progress[0] += 1
    conn.close()
    return progress[0]


def run_variant(directory: Path, web: str, count: int, seconds: float) -> dict[str, Any]:
    from sourceauth.adapters.config import load_config
    from sourceauth.adapters.runtime import Filter
    from sourceauth.engine.tokens import sign_review_link

    var, path, web_port = directory / "var", directory / "sourceauth.toml", _free_port()
    text = FILTER_CONFIG.format(host=HOST, port=_free_port(), domain=PROTECTED, var=var)
    if web != "off":
        text += WEB_CONFIG.format(host=HOST, port=web_port)
    path.write_text(text)
    flt = Filter(load_config(path), workers="process")
    for i in range(KNOWN_SENDERS):
        flt.app.authorize(known_sender(i), actor="benchmark", reason="known correspondent")
    review = "/review/" + sign_review_link(flt.app.keyring, f"user0@{PROTECTED}", 2**31)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fetcher = None
    try:
        asyncio.run_coroutine_threadsafe(flt.start(), loop).result(60)
        if web == "busy":
            _wait_listening(web_port)
            args = [str(web_port), str(time.time() + seconds + 5), "/confirm/" + "a" * 40, review]
            fetcher = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.web_cost", "--fetch", *args],
                stdout=subprocess.PIPE,
                text=True,
            )
        result = client(flt.port, count, seconds, web)
    finally:
        if fetcher is not None:
            fetcher.terminate()
            result["pages_fetched"] = (fetcher.communicate(timeout=60)[0] or "0").strip() or "?"
        asyncio.run_coroutine_threadsafe(flt.stop(), loop).result(300)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
    return result


def _wait_listening(port: int) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"web pages did not listen on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fetch", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fetch:  # the page fetcher's own process
        port, until, *paths = args.fetch
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # report the count when stopped
        count = 0
        try:
            count = fetch_pages(int(port), paths, float(until), progress := [0])
        except SystemExit:
            count = progress[0]
        finally:
            print(count, flush=True)
        return
    from benchmarks.engine import quiet_production_logging

    quiet_production_logging()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "idle": [], "busy": []}
    for _ in range(args.rounds):
        for web in runs:
            with tempfile.TemporaryDirectory(prefix="sa-bench-web-") as tmp:
                runs[web].append(run_variant(Path(tmp), web, args.count, args.seconds))
    best = {web: max(results, key=_rate) for web, results in runs.items()}
    report = {
        "msgs_per_s": {web: round(_rate(r), 1) for web, r in best.items()},
        "vs_off": {web: round(_rate(r) / _rate(best["off"]), 3) for web, r in best.items()},
        "runs_msgs_per_s": {web: [round(_rate(r), 1) for r in rs] for web, rs in runs.items()},
        "failed": {web: sum(r["failed"] for r in rs) for web, rs in runs.items()},
        "pages_fetched_busy": [r.get("pages_fetched") for r in runs["busy"]],
        "count": args.count,
        "rounds": args.rounds,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
