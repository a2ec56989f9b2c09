"""Through the real Postfix of .ci/postfix-setup.sh, same load, same run: Postfix's own
`smtp-source` (10 sessions, 2 KB messages, one authorized sender, one protected recipient)
into Postfix, which delivers into the recipient's virtual Maildir. Four paths:

(a) Postfix alone: the smtpd on 10031 (no content_filter, no milter), straight to the Maildir;
(b) content_filter: the smtpd on 10025 -> scan transport -> `sourceauth serve` (10030) ->
    next hop 10031 -> Maildir (the after-queue filter);
(c) milter: the smtpd on 10026 with `smtpd_milters` -> `sourceauth serve`'s milter (10032)
    -> Postfix's queue -> Maildir (the before-queue filter);
(d) a no-op pymilter milter on 10032 (collects the message, changes nothing): the floor
    of milter mode, the cost of libmilter and pymilter alone;
(e) when `purepythonmilter` is installed (not a dependency), the same no-op milter in pure
    Python on asyncio: what the other kind of milter library costs, for the choice;
(f) milter mode over a UNIX socket: the smtpd on 10028 -> `serve`'s milter on
    unix:/run/sourceauth-milter.sock (a second `serve`, as libmilter listens once a process).

Each path: acceptance (messages / time until smtp-source has every 250) and end to end
(messages / time until the last one is in the Maildir). Ratios are against (a) measured in
the same round; rounds are interleaved and the best round of each path kept.

Postfix is shared: the run holds /tmp/sourceauth-e2e.lock (do NOT wrap it in `flock`: the
lock would be taken twice). It changes no Postfix setting; it empties the queue and the
benchmark mailbox before each path and leaves both empty.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.result import BenchResult

HOST = "127.0.0.1"
ALONE, CONTENT_FILTER, MILTER_SMTPD = 10031, 10025, 10026  # Postfix's smtpd listeners
MILTER_UNIX_SMTPD = 10028  # smtpd_milters = unix:MILTER_SOCKET
MILTER_SOCKET = Path("/run/sourceauth-milter.sock")
FILTER, MILTER = 10030, 10032  # sourceauth's SMTP and milter listeners
RECIPIENT = "bob@example.test"
SENDER = "bench@partner.example.net"
MAILDIR = Path("/var/mail/vhosts/example.test/bob")
LOCK = Path("/tmp/sourceauth-e2e.lock")
SESSIONS = 10
MESSAGE_SIZE = 2048
SETUP = "sudo bash .ci/postfix-setup.sh"

CONFIG = """
[server]
listen = "{host}:{filter}"
hostname = "mx.example.test"
data_dir = "{var}"

[milter]
listen = "{milter}"

[policy]
protected = ["{rcpt}"]

[challenge]
relay = "smtp://{host}:{alone}"
confirm_address = "confirm@example.test"
bounce_address = "bounces@example.test"

[delivery]
next_hop = "smtp://{host}:{alone}"

[logging]
format = "json"
level = "info"
file = "{var}/serve.log"
"""

# The no-op milter of path (d): every callback the sourceauth milter uses, nothing decided.
NOOP_MILTER = """
import sys, Milter
@Milter.header_leading_space
class Noop(Milter.Base):
    def envfrom(self, f, *p): self.parts = []; return Milter.CONTINUE
    def envrcpt(self, t, *p): return Milter.CONTINUE
    def data(self): return Milter.CONTINUE
    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, k, v): self.parts.append(v); return Milter.CONTINUE
    @Milter.noreply
    def eoh(self): return Milter.CONTINUE
    @Milter.noreply
    def body(self, chunk): self.parts.append(chunk); return Milter.CONTINUE
    def eom(self): b"".join(self.parts); return Milter.CONTINUE
Milter.factory = Noop
Milter.runmilter("noop", sys.argv[1], timeout=120)
"""


# Path (e), when `purepythonmilter` (0.0.1, asyncio, pure Python) is installed (it is not a
# dependency: `pip install purepythonmilter`): the same no-op milter, to weigh the choice.
NOOP_PURE_PYTHON = """
import sys
from purepythonmilter import Continue, PurePythonMilter
async def on_mail_from(cmd) -> Continue: return Continue()
async def on_rcpt_to(cmd) -> Continue: return Continue()
async def on_header(cmd) -> None: return None
async def on_end_of_headers(cmd) -> None: return None
async def on_body_chunk(cmd) -> None: return None
async def on_end_of_message(cmd) -> Continue: return Continue()
PurePythonMilter(
    name="noop", hook_on_mail_from=on_mail_from, hook_on_rcpt_to=on_rcpt_to,
    hook_on_header=on_header, hook_on_end_of_headers=on_end_of_headers,
    hook_on_body_chunk=on_body_chunk, hook_on_end_of_message=on_end_of_message,
    headers_with_leading_space=True,
).run_server(host=sys.argv[1], port=int(sys.argv[2]))
"""


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _postconf(*args: str) -> str:
    out = subprocess.run(["postconf", *args], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def problem() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists():
        return "smtp-source not found: Postfix is not installed"
    if shutil.which("postconf") is None and not Path("/usr/sbin/postconf").exists():
        return "postconf not found: Postfix is not installed"
    if os.geteuid() != 0:
        return "needs root (Postfix's queue and the virtual Maildirs)"
    if _postconf("-h", "content_filter") != f"scan:[{HOST}]:{FILTER}":
        return f"Postfix is not set up for sourceauth: run {SETUP}"
    if f"smtpd_milters=inet:{HOST}:{MILTER}" not in _postconf("-P").replace(" ", ""):
        return f"no milter-mode smtpd on {MILTER_SMTPD}: run {SETUP}"
    for port in (ALONE, CONTENT_FILTER, MILTER_SMTPD):
        if not _accepts(port):
            return f"nothing accepts on {HOST}:{port}: is Postfix running? ({SETUP})"
    if not _has("Milter"):
        return "pymilter missing (pip install -e '.[milter]', needs libmilter-dev)"
    return None


@contextmanager
def _locked(timeout: float = 900.0) -> Iterator[None]:
    with LOCK.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{LOCK} held for {timeout:.0f} s by someone else") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _in_maildir() -> int:
    total = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(MAILDIR / sub) as entries:
                total += sum(1 for _ in entries)
        except FileNotFoundError:
            pass
    return total


def _queue_empty() -> bool:
    out = subprocess.run(["postqueue", "-j"], capture_output=True, text=True, check=False)
    return not out.stdout.strip()


def _clean() -> None:
    """An empty queue and an empty benchmark mailbox."""
    subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
    for sub in ("new", "cur", "tmp"):
        folder = MAILDIR / sub
        if folder.is_dir():
            for entry in folder.iterdir():
                entry.unlink(missing_ok=True)


def _wait_for(what: str, ready: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> int:
    """CPU time spent by the whole machine (every core), in clock ticks, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait


def _tree_cpu(root_pid: int) -> int:
    """CPU time of a process and its descendants still alive (their exited threads count), in
    clock ticks."""
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
                todo.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def measure(port: int, count: int, filter_pid: int | None = None) -> dict[str, float]:
    """smtp-source into `port`; acceptance and end-to-end rates (messages per second), the
    machine's CPU time per message (every process: Postfix, smtp-source, the filter) and the
    filter's own (filter_pid and its children), in milliseconds."""
    _clean()
    busy = _machine_busy()
    filter_cpu = _tree_cpu(filter_pid) if filter_pid else 0
    load = f"-s {SESSIONS} -l {MESSAGE_SIZE} -m {count} -f {SENDER} -t {RECIPIENT}".split()
    started = time.perf_counter()
    sent = subprocess.run(
        ["smtp-source", *load, f"{HOST}:{port}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    accepted = time.perf_counter()
    if sent.returncode != 0:
        raise RuntimeError(f"smtp-source into {port}: {sent.stderr.strip()[-300:]}")
    deadline = accepted + 600
    while _in_maildir() < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{_in_maildir()} of {count} in the Maildir after 600 s")
        time.sleep(0.01)
    done = time.perf_counter()
    busy = _machine_busy() - busy
    filter_cpu = (_tree_cpu(filter_pid) - filter_cpu) if filter_pid else 0
    return {
        "accept": count / (accepted - started),
        "e2e": count / (done - started),
        "in_maildir": _in_maildir(),
        "cpu_ms": busy * _TICK_MS / count,
        "filter_cpu_ms": filter_cpu * _TICK_MS / count,
    }


@contextmanager
def _process(args: list[str], ports: tuple[int, ...], log: Path) -> Iterator[int]:
    for port in ports:
        if _accepts(port):
            raise RuntimeError(f"{HOST}:{port} is taken: stop what listens there first")
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(f"{args[:4]} on {ports}", lambda: all(_accepts(p) for p in ports))
            yield proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _sourceauth(root: Path, milter: str = f"{HOST}:{MILTER}") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    var = root / "var"
    config = root / "sourceauth.toml"
    config.write_text(
        CONFIG.format(
            host=HOST, filter=FILTER, milter=milter, alone=ALONE, rcpt=RECIPIENT, var=var
        ),
        encoding="utf-8",
    )
    cli = [sys.executable, "-m", "sourceauth.adapters.cli"]
    allowed = subprocess.run(
        [*cli, "senders", "allow", SENDER, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if allowed.returncode != 0:
        raise RuntimeError(f"senders allow: {allowed.stderr.strip()[-300:]}")
    return [*cli, "serve", "--config", str(config)]


def _started(root: Path, timeout: float = 120.0) -> None:
    """Wait until `serve` under root is all up: its worker process and every further acceptor
    process have logged their start. Its first acceptor answers on the port seconds before
    (spawned processes import everything again: 6 s seen under load), and mail measured
    then would time the start-up, not the filter (Postfix alone is running already)."""
    log = root / "var" / "serve.log"
    acceptors = os.cpu_count() or 1  # [server] processes is not set: one per CPU

    def up() -> bool:
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        return "workers_started" in text and text.count("acceptor_started") >= acceptors - 1

    _wait_for(f"serve under {root} to start its worker and acceptors", up, timeout)


def one_round(root: Path, count: int) -> dict[str, dict[str, float]]:
    got: dict[str, dict[str, float]] = {"alone": measure(ALONE, count)}
    noop = [sys.executable, "-c", NOOP_MILTER, f"inet:{MILTER}@{HOST}"]
    with _process(noop, (MILTER,), root / "noop.log") as pid:
        got["noop_milter"] = measure(MILTER_SMTPD, count, pid)
    if _has("purepythonmilter"):
        pure = [sys.executable, "-c", NOOP_PURE_PYTHON, HOST, str(MILTER)]
        with _process(pure, (MILTER,), root / "noop_pure_python.log") as pid:
            got["noop_pure_python"] = measure(MILTER_SMTPD, count, pid)
    serve = _sourceauth(root)
    with _process(serve, (FILTER, MILTER), root / "serve.out") as pid:
        _started(root)
        got["content_filter"] = measure(CONTENT_FILTER, count, pid)
        got["milter"] = measure(MILTER_SMTPD, count, pid)
        _wait_for("the filter's delivery queue to drain", _queue_empty, 120)
    if _has_unix_path():
        serve = _sourceauth(root / "unix", milter=f"unix:{MILTER_SOCKET}")
        with _process(serve, (FILTER,), root / "serve-unix.out") as pid:
            _wait_for("the milter's UNIX socket", MILTER_SOCKET.exists)
            _started(root / "unix")
            got["milter_unix"] = measure(MILTER_UNIX_SMTPD, count, pid)
    return got


def _has_unix_path() -> bool:
    """Postfix has the milter-mode smtpd on 10028 that talks over MILTER_SOCKET."""
    return f"smtpd_milters=unix:{MILTER_SOCKET}" in _postconf("-P").replace(" ", "")


def run(scale: float = 1.0) -> list[BenchResult]:
    why = problem()
    if why is not None:
        print(f"# postfix: skipped: {why}", file=sys.stderr, flush=True)
        return [BenchResult(name="postfix.skipped", value=0.0, unit="", details={"why": why})]
    quick = scale < 1
    count = 200 if quick else int(1000 * scale)
    rounds = 1 if quick else 2
    runs: list[dict[str, dict[str, float]]] = []
    with _locked(), tempfile.TemporaryDirectory(prefix="sa-bench-postfix-") as tmp:
        try:
            for n in range(rounds):
                root = Path(tmp) / f"round{n}"
                root.mkdir()
                runs.append(one_round(root, count))
        finally:
            _clean()
    # alone, noop_milter, [noop_pure_python,] content_filter, milter, [milter_unix]
    paths = tuple(runs[0])
    best = {p: {k: max(r[p][k] for r in runs) for k in ("accept", "e2e")} for p in paths}
    common: dict[str, float | int | str] = {
        "messages": count,
        "sessions": SESSIONS,
        "message_bytes": MESSAGE_SIZE,
        "rounds": rounds,
        "sender": "authorized; recipient protected",
        "runs_e2e_msgs_per_s": "; ".join(
            f"{p}=" + "/".join(f"{r[p]['e2e']:.0f}" for r in runs) for p in paths
        ),
        "runs_accept_msgs_per_s": "; ".join(
            f"{p}=" + "/".join(f"{r[p]['accept']:.0f}" for r in runs) for p in paths
        ),
        # CPU time per message, every round: the whole machine's, then (in brackets) the
        # filter process tree's own; the rest is Postfix's and smtp-source's.
        "runs_cpu_ms_per_msg": "; ".join(
            f"{p}=" + "/".join(f"{r[p]['cpu_ms']:.2f}({r[p]['filter_cpu_ms']:.2f})" for r in runs)
            for p in paths
        ),
    }
    results = [
        BenchResult(
            name=f"postfix.alone.{kind}",
            value=best["alone"][kind],
            unit="msgs/s",
            details=common if kind == "e2e" else {},
        )
        for kind in ("accept", "e2e")
    ]
    targets = {("content_filter", "e2e"): 0.5, ("milter", "e2e"): 0.7, ("milter_unix", "e2e"): 0.7}
    for path in paths[1:]:
        for kind in ("accept", "e2e"):
            base = best["alone"][kind]
            ratio = best[path][kind] / base if base else 0.0
            target = targets.get((path, kind))
            results.append(
                BenchResult(
                    name=f"postfix.{path}.{kind}",
                    value=best[path][kind],
                    unit="msgs/s",
                    baseline_name=f"Postfix alone, {kind}",
                    baseline_value=base,
                    ratio=ratio,
                    target=f">= {target:g}x" if target else "",
                    passed=target is None or ratio >= target,
                )
            )
    return results
