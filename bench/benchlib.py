"""Helpers shared by the benchmark suite's processes: pinning, process stats, spawning servers,
percentiles, the benchmark's addresses and a prefilled event log.

Nothing here talks to anything but 127.0.0.0/8. Every process started through :func:`spawn` is
its own process group, so :func:`stop` ends it and its children (kill the group, never by name).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = [ROOT / "src"]
GC_PROBE = [False]
"""Run the real server under bench/gc_probe.py (suite.py ``--gc-probe``)."""
"""Where the servers and load generators import ``perps_indexer`` from (suite.py ``--src``)."""
PYTHON = sys.executable
SERVER_CPU = 0
LOAD_CPU = 1
API_KEY = "k"
MARKET = 396
PER_IP = 900
"""Client connections per source address (the server allows 1,000 per client address)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def interpreter() -> dict[str, Any]:
    """How the running Python was built, as far as it bears on speed: its version and
    installation, the ``configure`` options that make it faster (``--enable-optimizations``:
    profile-guided; ``--with-lto``), and whether this executable loads ``libpython`` as a
    shared library (calls inside the interpreter then go through the PLT and, without
    ``-fno-semantic-interposition``, are not inlined) or has it linked in (BENCHMARKS.md,
    "Which interpreter", compares two such builds)."""
    import platform
    import sysconfig

    args = sysconfig.get_config_var("CONFIG_ARGS") or ""
    shared = False
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        shared = any("libpython" in line for line in maps)
    return {
        "version": platform.python_version(),
        "base": sys.base_prefix,
        "options": [o for o in ("--enable-optimizations", "--with-lto") if o in args],
        "libpython": "shared" if shared else "linked in",
    }


def describe_interpreter(about: dict[str, Any]) -> str:
    """:func:`interpreter`'s answer for people: ``3.11.7 (/usr; libpython linked in)``."""
    build = "; ".join([about["base"], *about["options"], f"libpython {about['libpython']}"])
    return f"{about['version']} ({build})"


def address(i: int) -> str:
    """The benchmark's i-th account address (its own range, never a real one)."""
    return f"0x{0xBE0000000 + i:064x}"


def source_ip(i: int) -> str:
    """The loopback source address of client ``i`` (any 127.0.0.0/8 address is local)."""
    return f"127.0.0.{2 + i // PER_IP}"


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(cpu: int) -> None:
    """Run the calling process (and what it starts) on one CPU only, if the machine has it."""
    if cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def run_pinned(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to its end on the servers' CPU (as :func:`spawn` pins them), its output
    captured as text; the caller reads the return code."""
    return subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        preexec_fn=lambda: pin(SERVER_CPU),  # affinity only: safe before exec
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_ticks(cpu: int) -> tuple[int, int]:
    """(stolen, total) clock ticks of one CPU since boot, from /proc/stat; (0, 0) where the
    system has no such file. Stolen: time the hypervisor ran something else while this guest
    CPU wanted to run, which no figure of ours can tell from our own slowness."""
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(x) for x in line.split()[1:]]
                return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])
    return 0, 0


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of a CPU's ticks between two :func:`cpu_ticks` readings that was stolen."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100, nearest rank) of ``values``; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99 and max of nanosecond latencies, in milliseconds, and the count."""
    values = sorted(values_ns)
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {
        "n": len(values),
        "p50": percentile(values, 50) / 1e6,
        "p99": percentile(values, 99) / 1e6,
        "max": values[-1] / 1e6,
    }


def wal_restarts(db: Path) -> int:
    """The checkpoint sequence number in the header of ``db``'s WAL: SQLite adds one at every
    restart of the WAL (https://sqlite.org/fileformat2.html, 4.1)."""
    with open(db.with_name(db.name + "-wal"), "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


@dataclass
class Proc:
    """A process started by :func:`spawn`, in its own process group, output collected."""

    popen: subprocess.Popen[str]
    name: str
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _read_all: bool = False  # the stdout pump has seen the end of the stream
    _exit_seen: float | None = None  # when wait_line first found the process exited

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line (from the start) matching ``pattern``; raises on timeout or
        when the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                # Exited, and every line it wrote read: a process that prints its last line
                # and exits at once (bench/fleet.c) must not lose the race with the pump. (A
                # child holding its stdout open would keep the pump going: 2 s at most.)
                if self.popen.poll() is not None and self._exit_seen is None:
                    self._exit_seen = time.monotonic()
                if self._exit_seen is not None and (
                    self._read_all or time.monotonic() - self._exit_seen > 2
                ):
                    raise RuntimeError(
                        f"{self.name} exited ({self.popen.returncode}) before printing "
                        f"{pattern!r}: {self.tail()}"
                    )
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no {pattern!r} in {timeout} s: {self.tail()}")
                self._cond.wait(min(left, 0.2))

    def tail(self) -> str:
        return " | ".join((self.lines + self.errors)[-12:])

    def _pump(self, stream: IO[str], sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._read_all = self._read_all or sink is self.lines
            self._cond.notify_all()


def spawn(name: str, cmd: Sequence[str], cpu: int, *, stdin: bool = False) -> Proc:
    """Start ``cmd`` pinned to ``cpu`` in a new process group, with the raised fd limit."""

    def setup() -> None:
        pin(cpu)
        raise_nofile()

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCH), str(SRC[0]), env.get("PYTHONPATH", "")) if p
    )
    popen = subprocess.Popen(
        list(cmd),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(ROOT),
        start_new_session=True,
        preexec_fn=setup,  # noqa: PLW1509 - affinity and rlimit only, no locks taken
    )
    proc = Proc(popen, name)
    assert popen.stdout is not None and popen.stderr is not None
    for stream, sink in ((popen.stdout, proc.lines), (popen.stderr, proc.errors)):
        threading.Thread(target=proc._pump, args=(stream, sink), daemon=True).start()
    return proc


def stop(proc: Proc | None, timeout: float = 10.0) -> int | None:
    """End a process group: SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc is None:
        return None
    popen = proc.popen
    with contextlib.suppress(OSError):
        if popen.stdin is not None:
            popen.stdin.close()
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(10)
    else:
        # The leader is gone; make sure nothing it started is left either.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
    return popen.returncode


@dataclass
class Server:
    """A server subprocess and where it listens."""

    proc: Proc
    port: int
    kind: str

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


SERVER_ARGS: list[str] = []
"""Extra ``serve`` arguments for every run of the real server (suite.py ``--server-args``)."""


def start_server(kind: str, db: Path | None = None, *extra: str, timeout: float = 120) -> Server:
    """Start a server pinned to the server CPU and parse its port from its banner.

    ``kind``: "ours" (``python -m perps_indexer serve``), "naive" (bench/naive_server.py),
    "bare-picows", "bare-picows-asyncio", "bare-aiohttp", "bare-aiohttp-direct" or
    "bare-aiohttp-batch"
    (bench/bare_broadcast.py) or "bare-fresh" (bench/bare_fresh.py)."""
    if kind == "ours":
        assert db is not None
        # bench/gc_probe.py runs the same cli.main and times the garbage collections.
        runner = [str(BENCH / "gc_probe.py")] if GC_PROBE[0] else ["-m", "perps_indexer"]
        cmd = [
            PYTHON,
            *runner,
            "serve",
            "--port",
            "0",
            "--db",
            str(db),
            "--api-key",
            API_KEY,
            "--sync",
            "NORMAL",
            "--log-level",
            "WARNING",
            *SERVER_ARGS,
            *extra,
        ]
    elif kind == "naive":
        cmd = [PYTHON, str(BENCH / "naive_server.py"), "--port", "0", "--api-key", API_KEY, *extra]
    elif kind == "bare-fresh":
        cmd = [PYTHON, str(BENCH / "bare_fresh.py"), "--port", "0", *extra]
    elif kind.startswith("bare-"):
        cmd = [PYTHON, str(BENCH / "bare_broadcast.py"), kind[5:], "--port", "0", *extra]
    else:
        raise ValueError(kind)
    proc = spawn(kind, cmd, SERVER_CPU)
    try:
        match = proc.wait_line(r"ws://[\d.]+:(\d+)/ws", timeout)
    except BaseException:
        stop(proc)
        raise
    return Server(proc, int(match.group(1)), kind)


def gc_report(proc: Proc, since_ns: int = 0) -> dict[str, Any] | None:
    """The ``gcprobe`` line of a stopped server run under gc_probe.py (None without one);
    ``since_ns`` (a ``time.monotonic_ns()``) makes the pause times relative to it, in s."""
    import json

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in proc.errors:
            if line.startswith("gcprobe "):
                data: dict[str, Any] = json.loads(line[len("gcprobe ") :])
                if since_ns:
                    for pause in (*data["longest"], *data["over_1ms"]):
                        pause["at"] = round(pause["at"] - since_ns / 1e9, 2)
                return data
        if proc.popen.poll() is not None and not GC_PROBE[0]:
            return None
        time.sleep(0.05)
    return None


def prefill(
    db: Path,
    *,
    accounts: int,
    asks_per_account: int = 0,
    history_address: str | None = None,
    history_fills: int = 0,
    spare_asks: int = 0,
    ts_ms: int | None = None,
) -> int:
    """Write an event log for the server to replay at start (faster than REST for setup).

    Every account gets a deposit. ``asks_per_account`` rounds of one resting ask of 500 lots per
    account, at rising prices from 6001 (100 orders a level), supply the fills of scenario 2:
    a market buy of ``k`` x 500 lots fills the next ``k`` orders, which belong to ``k``
    consecutive accounts. ``history_address`` is given ``history_fills`` fills (each a market
    buy against a maker's ask, so as many trade rows and order rows), and ``spare_asks`` more
    asks of the maker are left resting for later fills. Every event is stamped ``ts_ms``
    (default: a minute ago, for a server whose clock is the real one); with it given, the log
    is the same byte for byte however often it is built. Returns the events written."""
    from perps_indexer.engine import Engine
    from perps_indexer.markets import default_markets
    from perps_indexer.store.sqlite import SQLiteStore

    engine = Engine(default_markets())
    ts = time.time_ns() // 1_000_000 - 60_000 if ts_ms is None else ts_ms
    batch: list[Any] = []
    written = 0
    with SQLiteStore(db, synchronous="NORMAL") as store:

        def flush(force: bool = False) -> None:
            nonlocal written
            if batch and (force or len(batch) >= 20_000):
                store.append(batch)
                written += len(batch)
                batch.clear()

        for i in range(accounts):
            batch += engine.deposit(address(i), 10**13, ts=ts)
            flush()

        def ask(who: str, price: int) -> None:
            """A resting ask of 500 lots that opens a short."""
            batch.extend(
                engine.place_limit_order(
                    who,
                    MARKET,
                    is_long=False,
                    is_close=False,
                    size=500,
                    price=price,
                    leverage=10,
                    ts=ts,
                ).events
            )
            flush()

        for r in range(asks_per_account):
            for i in range(accounts):
                ask(address(i), 6001 + (r * accounts + i) // 100)
        if history_address is not None:
            maker = address(10**6)
            batch += engine.deposit(maker, 10**15, ts=ts)
            batch += engine.deposit(history_address, 10**15, ts=ts)
            for n in range(history_fills + spare_asks):
                ask(maker, 5001 + n // 100)
            for _ in range(history_fills):
                ts += 1
                batch += engine.place_market_order(
                    history_address,
                    MARKET,
                    is_long=True,
                    is_close=False,
                    size=500,
                    leverage=10,
                    ts=ts,
                ).events
                flush()
        flush(force=True)
    return written
