"""Soak: many WebSocket clients churning against ``perps-indexer serve --demo`` for minutes.

    .venv/bin/python bench/soak.py [--clients 1000] [--duration 300] [--quick]

The server runs as a subprocess (its own temporary database, ``--log-level WARNING``, stderr
captured) while the demo venue trades. One asyncio process runs the clients. Each client, at
random: subscribes (positions, open_orders, order_history and trade_history of the demo's
addresses, orderbook of 396/397/398), unsubscribes (``{"op": "unsubscribe", ...}``, with or
without an id), disconnects and reconnects (resuming with ``since``), and, on some connections,
reads slowly (a small socket buffer and a sleep between reads, so the server's per-stream
coalescing comes into play). A fifth of the clients speak only the original protocol (one stream
per topic, no op, no id, no since). Every client stays under the per-connection rate limit and
the clients never hold more than ``--clients`` connections at once (the server's per-address cap
is 1,000 and ``serve`` has no flag to raise it).

While they run, each client checks what the protocol promises: an ack before the data of a v2
subscription, no data of a stream after its ``unsubscribed`` ack, a stream's ``seq`` never going
back (across reconnects too), no error replies. The server's resident memory (VmRSS) is sampled
every second; the warm level is taken 30 s after the last client started (less in short runs).

Before the server starts, ``--prefill`` events (80,000 by default) of demo trading are written to
its database: the server replays them at start, which fills SQLite's 64 MiB page cache, so that
the RSS comparison measures the server and its clients rather than that cache filling up (it
grows with the log at about 1.1 KB per event until it is full, some 15 minutes of the demo).

Then the churn stops, every client reconnects if it was between connections, reading goes fast,
and after ``--settle`` seconds the end RSS is taken. The check: every client still connected
must hold, for every stream, exactly the state the REST API reports (``getPositions``,
``getOpenOrders``, ``getOrderHistory``, ``getTradeHistory``, ``getOrderBook``). The demo keeps
trading, so a REST snapshot is bracketed by two ``GET /health`` calls and kept only when the
venue's seq did not move in between; a client matches when its newest message with a seq at or
below that snapshot's seq holds the same rows (a history stream resumed with ``since`` holds the
resumed rows merged into what it held before). Pairs that do not match yet are retried with new
snapshots for up to 20 s.

Exit status 0 when there is no server error in the log, no protocol anomaly, every connected
client equals REST, the server's connection and subscription gauges match the clients (and
drop to zero when they leave), and the RSS ratio end/warm is within ``--rss-limit``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from perps_indexer.markets import default_markets
from perps_indexer.sim import DemoSimulator

ADDRESS_TOPICS = ("positions", "open_orders", "order_history", "trade_history")
RESUMABLE = frozenset({"order_history", "trade_history"})
MARKETS = (396, 397, 398)
HISTORY_LIMIT = 100
API_KEY = "soak"
REST_PATHS = {
    "positions": "/getPositions?userAddress={}",
    "open_orders": "/getOpenOrders?userAddress={}",
    "order_history": "/getOrderHistory?userAddress={}",
    "trade_history": "/getTradeHistory?userAddress={}",
    "orderbook": "/getOrderBook?marketId={}",
}
PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")

Stream = tuple[str, str | int]
RequestId = int | str
State = bytes | list[Any]
"""A stream's state as a client holds it: a raw data message, or rows merged after a resume."""

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


@dataclass
class SoakOptions:
    clients: int = 1000
    duration: float = 300.0
    """Seconds from the first client's start to the end of the churn."""
    ramp: float | None = None
    """Seconds over which the clients start (default: a tenth of the duration, at most 20)."""
    warm_after: float | None = None
    """Seconds after the ramp at which the warm RSS is taken (default: a fifth of the duration,
    at most 30)."""
    action_interval: float = 5.0
    """Mean seconds between a client's actions (subscribe, unsubscribe, reconnect, idle)."""
    v1_share: float = 0.2
    slow_share: float = 0.3
    max_streams: int = 6
    settle: float = 10.0
    check_timeout: float = 20.0
    rss_limit: float | None = 1.10
    prefill: int = 0
    """Events of demo trading written to the database before the server starts (see
    :func:`prefill`); 0 starts from an empty log."""
    seed: int = 7
    quiet: bool = False


@dataclass
class SoakResult:
    figures: dict[str, Any]
    failures: list[str]
    server_log: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Stats:
    messages: int = 0
    data_messages: int = 0
    bytes: int = 0
    subscribes: int = 0
    unsubscribes: int = 0
    unsubscribe_acks: int = 0
    acks: int = 0
    reconnects: int = 0
    connects: int = 0
    connect_failures: int = 0
    resume_requests: int = 0
    resumed_rows: int = 0
    stale: int = 0
    slow_connections: int = 0
    server_closes: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    anomalies: collections.Counter[str] = field(default_factory=collections.Counter)
    anomaly_examples: list[str] = field(default_factory=list)

    def anomaly(self, kind: str, detail: str) -> None:
        self.anomalies[kind] += 1
        if len(self.anomaly_examples) < 20:
            self.anomaly_examples.append(f"{kind}: {detail}")


# ---------------------------------------------------------------------------- the server


class ServerProcess:
    """``perps-indexer serve --demo`` as a subprocess, its output kept."""

    def __init__(self, workdir: Path) -> None:
        self.db = workdir / "soak.db"
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "perps_indexer",
            "serve",
            "--demo",
            "--port",
            "0",
            "--db",
            str(self.db),
            "--api-key",
            API_KEY,
            "--history-limit",
            str(HISTORY_LIMIT),
            "--log-level",
            "WARNING",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = threading.Thread(target=_drain, args=(self.proc.stderr, self.stderr), daemon=True)
        err.start()
        self._threads.append(err)
        while not self.port:
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError("the server exited before its banner:\n" + self.log_text())
            self.stdout.append(line.rstrip("\n"))
            match = re.search(r"ws://[\d.]+:(\d+)/ws", line)
            if match:
                self.port = int(match.group(1))
        out = threading.Thread(target=_drain, args=(self.proc.stdout, self.stdout), daemon=True)
        out.start()
        self._threads.append(out)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and its parts (RssAnon, RssFile, RssShmem) from /proc, in KiB."""
        values = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    values[name] = int(rest.split()[0])
        return values

    def rss_kib(self) -> int:
        return self.memory_kib()["VmRSS"]

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        """SIGTERM, wait, and close the pipes; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = None
        for thread in self._threads:
            thread.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def problems(self) -> list[str]:
        return [line for line in self.stderr if PROBLEM.search(line)]

    def log_text(self) -> str:
        return "\n".join(self.stderr[-50:])


def _drain(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


# ---------------------------------------------------------------------------- the clients


def describe(sub: Sub, snap: tuple[int, list[Any]] | None) -> str:
    """How a client's stream differs from the last REST snapshot."""
    if sub.cur is None:
        return f"never received data (acked={sub.acked})"
    seq, state = sub.cur
    rows = rows_of(state)
    text = f"holds seq {seq}, {len(rows)} rows"
    if snap is None:
        return text + "; no stable REST snapshot"
    rest_seq, rest_rows = snap
    text += f"; REST at seq {rest_seq} has {len(rest_rows)} rows"
    first = next(
        (i for i, (a, b) in enumerate(zip(rows, rest_rows, strict=False)) if a != b),
        min(len(rows), len(rest_rows)),
    )
    text += f", first difference at row {first}"
    key = _encode
    if sorted(map(key, rows)) == sorted(map(key, rest_rows)):
        text += " (the same rows in another order)"
    return text


def rows_of(state: State) -> list[Any]:
    if isinstance(state, list):
        return state
    rows: list[Any] = _decode(state)["data"]
    return rows


def merge(topic: str, resumed: list[Any], held: list[Any]) -> list[Any]:
    """A history window after a resume: the rows changed since, then what was held before."""
    if topic == "order_history":
        changed = {row["order_id"] for row in resumed}
        held = [row for row in held if row["order_id"] not in changed]
    return (resumed + held)[:HISTORY_LIMIT]


class Sub:
    """One stream a client wants, kept across its reconnects."""

    __slots__ = ("acked", "as_text", "cur", "recent", "resume", "seq", "stream", "sub_id")

    def __init__(self, stream: Stream, as_text: bool) -> None:
        self.stream = stream
        self.as_text = as_text
        """Send a market id as a string (else as a number)."""
        self.sub_id: RequestId | None = None
        self.acked = False
        self.seq = -1
        """The newest seq received for this stream (what ``since`` sends)."""
        self.cur: tuple[int, State] | None = None
        self.resume = False
        """The next data message answers ``since`` on a history topic: merge it."""
        self.recent: collections.deque[tuple[int, State]] | None = None
        """During the final check: the last few states with their seqs."""

    def request(self, op: str | None = None) -> dict[str, Any]:
        topic, key = self.stream
        req: dict[str, Any] = {} if op is None else {"op": op}
        req["topic"] = topic
        if topic == "orderbook":
            req["market_id"] = str(key) if self.as_text else key
        else:
            req["address"] = key
        return req


class Client:
    def __init__(self, soak: Soak, idx: int, rng: random.Random) -> None:
        self.soak = soak
        self.idx = idx
        self.rng = rng
        self.v2 = rng.random() >= soak.options.v1_share
        self.subs: dict[Stream, Sub] = {}
        self.by_id: dict[RequestId, Sub] = {}
        self.retired: set[RequestId] = set()
        """Subscription ids unsubscribed on this connection (their data may still be in flight)."""
        self.unsub_pending: dict[RequestId, RequestId | None] = {}
        """Unsubscribe request id -> the subscription id it retires, until its ack."""
        self.unsub_acked: set[RequestId] = set()
        """Subscription ids whose unsubscribe was acked: no more data may come for them."""
        self.max_seq: dict[Stream, int] = {}
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.slow = False
        self.closing = False
        self.counter = 0

    # -- identity

    def new_id(self) -> RequestId:
        self.counter += 1
        if self.counter % 2:
            return f"c{self.idx}-{self.counter}"
        return self.idx * 1_000_000 + self.counter

    def connected(self) -> bool:
        return self.ws is not None and self.reader is not None and not self.reader.done()

    # -- the life of a client

    async def run(self, start_at: float) -> None:
        await asyncio.sleep(start_at)
        self.initial_streams()
        while True:
            if not await self.open():
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))
                continue
            if not await self.act():
                return  # the churn is over: stay connected
            await self.close()
            await asyncio.sleep(self.rng.uniform(0.3, 2.0))

    def initial_streams(self) -> None:
        for _ in range(self.rng.randint(1, 4)):
            stream = self.pick_stream()
            if stream is not None:
                self.subs[stream] = Sub(stream, self.rng.random() < 0.5)

    def pick_stream(self) -> Stream | None:
        soak = self.soak
        if self.v2:
            free = [s for s in soak.streams if s not in self.subs]
            return self.rng.choice(free) if free else None
        held = {topic for topic, _ in self.subs}
        topics = [t for t in (*ADDRESS_TOPICS, "orderbook") if t not in held]
        if not topics:
            return None
        topic = self.rng.choice(topics)
        if topic == "orderbook":
            return (topic, self.rng.choice(MARKETS))
        return (topic, self.rng.choice(soak.addresses))

    async def open(self) -> bool:
        soak = self.soak
        stats = soak.stats
        self.slow = soak.phase == "churn" and self.rng.random() < soak.options.slow_share
        sock = None
        try:
            if self.slow:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", soak.port))
            ws = await connect(
                soak.ws_url,
                sock=sock,
                proxy=None,
                compression=None,
                max_size=1 << 22,
                max_queue=4 if self.slow else 16,
                ping_interval=20,
                ping_timeout=60,
                close_timeout=30,
                open_timeout=60,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            stats.connect_failures += 1
            stats.anomaly("connect failed", f"client {self.idx}: {exc!r}")
            if sock is not None:
                sock.close()
            return False
        stats.connects += 1
        stats.slow_connections += self.slow
        self.ws = ws
        self.by_id = {}
        self.retired = set()
        self.unsub_pending = {}
        self.unsub_acked = set()
        self.reader = asyncio.create_task(self.read_loop(ws))
        for sub in self.subs.values():
            await self.send_subscribe(sub, resubscribe=True)
        return True

    async def close(self) -> None:
        ws, reader = self.ws, self.reader
        if ws is None or reader is None:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            await ws.close()
        with contextlib.suppress(Exception):
            await reader
        self.closing = False
        self.ws = self.reader = None

    async def act(self) -> bool:
        """Random actions until the churn ends (False) or the connection is to be replaced."""
        soak = self.soak
        assert self.reader is not None
        while True:
            wait = self.rng.expovariate(1 / soak.options.action_interval)
            await asyncio.wait(
                {self.reader, soak.churn_over}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            if self.reader.done():
                return True  # the server closed it: reconnect
            if soak.churn_over.done():
                return False
            roll = self.rng.random()
            if roll < 0.15:
                soak.stats.reconnects += 1
                return True
            if roll < 0.5 or not self.v2:
                if len(self.subs) < soak.options.max_streams:
                    await self.subscribe_new()
                elif self.v2:
                    await self.unsubscribe_one()
            elif roll < 0.8:
                if len(self.subs) > 1:
                    await self.unsubscribe_one()
                else:
                    await self.subscribe_new()

    async def send(self, request: dict[str, Any]) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(_encode(request).decode())

    async def send_subscribe(self, sub: Sub, resubscribe: bool = False) -> None:
        soak = self.soak
        if not self.v2:
            sub.resume = False
            await self.send(sub.request())
            return
        sub_id = self.new_id()
        sub.sub_id = sub_id
        sub.acked = False
        self.by_id[sub_id] = sub
        request = sub.request("subscribe" if self.rng.random() < 0.5 else None)
        request["id"] = sub_id
        sub.resume = False
        if resubscribe and sub.seq >= 0 and self.rng.random() < 0.9:
            request["since"] = sub.seq
            soak.stats.resume_requests += 1
            sub.resume = sub.stream[0] in RESUMABLE
        await self.send(request)

    async def subscribe_new(self) -> None:
        stream = self.pick_stream()
        if stream is None:
            return
        sub = self.subs[stream] = Sub(stream, self.rng.random() < 0.5)
        self.soak.stats.subscribes += 1
        await self.send_subscribe(sub)

    async def unsubscribe_one(self) -> None:
        if not self.subs:
            return
        stream = self.rng.choice(list(self.subs))
        sub = self.subs.pop(stream)
        if sub.sub_id is not None:
            self.by_id.pop(sub.sub_id, None)
            self.retired.add(sub.sub_id)
        request = sub.request("unsubscribe")
        if self.rng.random() < 0.7:
            rid = self.new_id()
            request["id"] = rid
            self.unsub_pending[rid] = sub.sub_id
        self.soak.stats.unsubscribes += 1
        await self.send(request)

    # -- reading

    async def read_loop(self, ws: ClientConnection) -> None:
        soak = self.soak
        try:
            while True:
                raw = await ws.recv(decode=False)
                self.on_message(raw)
                if self.slow and soak.phase == "churn":
                    pause = self.rng.uniform(0.0, 0.25)
                    if self.rng.random() < 0.01:
                        pause = self.rng.uniform(1.0, 4.0)  # a stall
                    await asyncio.sleep(pause)
        except ConnectionClosed as exc:
            if not self.closing:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                reason = exc.rcvd.reason if exc.rcvd is not None else "no close frame"
                soak.stats.server_closes[f"{code} {reason}"] += 1

    def on_message(self, raw: bytes) -> None:
        stats = self.soak.stats
        stats.messages += 1
        stats.bytes += len(raw)
        if raw.startswith(b'{"data":'):
            cut = raw.rfind(b',"message":"')
            tail = _decode(b"{" + raw[cut + 1 :])
            self.on_data(raw, tail["message"], tail["seq"], tail.get("id"))
            return
        msg = _decode(raw)
        kind = msg.get("message")
        if kind == "subscribed":
            sub = self.by_id.get(msg["id"])
            if sub is None:
                if msg["id"] not in self.retired:
                    stats.anomaly("ack for an unknown id", f"client {self.idx}: {msg}")
            elif sub.acked:
                stats.anomaly("second ack", f"client {self.idx}: {msg}")
            else:
                sub.acked = True
                stats.acks += 1
        elif kind == "unsubscribed":
            if msg["id"] in self.unsub_pending:
                retired = self.unsub_pending.pop(msg["id"])
                if retired is not None:
                    self.unsub_acked.add(retired)
                stats.unsubscribe_acks += 1
            else:
                stats.anomaly("unexpected unsubscribe ack", f"client {self.idx}: {msg}")
        elif kind == "error":
            stats.errors[str(msg.get("error"))[:100]] += 1
        else:
            stats.anomaly("unknown message", f"client {self.idx}: {raw[:200]!r}")

    def on_data(self, raw: bytes, topic: str, seq: int, sub_id: RequestId | None) -> None:
        stats = self.soak.stats
        stats.data_messages += 1
        sub: Sub | None
        if self.v2:
            if sub_id is None:
                stats.anomaly("v2 data without id", f"client {self.idx}: {raw[:120]!r}")
                return
            sub = self.by_id.get(sub_id)
            if sub is None:
                if sub_id in self.unsub_acked:
                    stats.anomaly(
                        "data after the unsubscribe ack", f"client {self.idx}: {sub_id!r}"
                    )
                elif sub_id in self.retired:
                    stats.stale += 1  # in flight when we unsubscribed
                else:
                    stats.anomaly("data for an unknown id", f"client {self.idx}: {sub_id!r}")
                return
            if not sub.acked:
                stats.anomaly("data before its ack", f"client {self.idx}: {sub_id!r}")
        else:
            if sub_id is not None:
                stats.anomaly("v1 data with an id", f"client {self.idx}: {raw[:120]!r}")
            sub = next((s for s in self.subs.values() if s.stream[0] == topic), None)
            if sub is None:
                stats.anomaly("v1 data for no stream", f"client {self.idx}: {topic}")
                return
        if sub.stream[0] != topic:
            stats.anomaly("data of the wrong topic", f"client {self.idx}: {topic} {sub.stream}")
            return
        stream = sub.stream
        previous = self.max_seq.get(stream, -1)
        if seq < previous:
            stats.anomaly("seq went back", f"client {self.idx} {stream}: {seq} after {previous}")
        else:
            self.max_seq[stream] = seq
        state: State = raw
        if sub.resume:
            sub.resume = False
            resumed = rows_of(raw)
            stats.resumed_rows += len(resumed)
            held = rows_of(sub.cur[1]) if sub.cur is not None else []
            state = merge(topic, resumed, held)
        sub.seq = max(sub.seq, seq)
        sub.cur = (seq, state)
        if sub.recent is not None:
            sub.recent.append(sub.cur)


# ---------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, options: SoakOptions, server: ServerProcess) -> None:
        self.options = options
        self.server = server
        self.port = server.port
        self.ws_url = f"ws://127.0.0.1:{server.port}/ws"
        self.url = f"http://127.0.0.1:{server.port}"
        self.addresses = DemoSimulator(default_markets()).addresses
        self.streams: list[Stream] = [(t, a) for a in self.addresses for t in ADDRESS_TOPICS]
        self.streams += [("orderbook", m) for m in MARKETS]
        self.stats = Stats()
        self.phase = "churn"
        self.churn_over: asyncio.Future[None]
        self.rss: list[tuple[float, int]] = []
        self.failures: list[str] = []
        self.figures: dict[str, Any] = {}
        self.http: aiohttp.ClientSession

    def say(self, text: str) -> None:
        if not self.options.quiet:
            print(text, flush=True)

    async def run(self) -> None:
        opts = self.options
        ramp = opts.ramp if opts.ramp is not None else min(20.0, opts.duration / 10)
        warm_after = (
            opts.warm_after if opts.warm_after is not None else min(30.0, opts.duration / 5)
        )
        warm_at = min(ramp + warm_after, opts.duration)
        loop = asyncio.get_running_loop()
        self.churn_over = loop.create_future()
        rng = random.Random(opts.seed)
        clients = [Client(self, i, random.Random(rng.random())) for i in range(opts.clients)]
        self.figures.update(clients=opts.clients, duration_s=opts.duration)
        self.figures["v1_clients"] = sum(not c.v2 for c in clients)
        async with aiohttp.ClientSession() as http:
            self.http = http
            t0 = time.monotonic()
            cpu0 = self.server.cpu_seconds()
            sampler = asyncio.create_task(self.sample_rss(t0))
            lag = asyncio.create_task(self.watch_lag())
            tasks = [
                asyncio.create_task(c.run(ramp * i / max(1, opts.clients)))
                for i, c in enumerate(clients)
            ]
            self.say(
                f"soak: {opts.clients} clients ({self.figures['v1_clients']} v1) for "
                f"{opts.duration:g} s; server pid {self.server.pid} on port {self.port}"
            )
            await asyncio.sleep(max(0.0, t0 + warm_at - time.monotonic()))
            warm_parts = self.server.memory_kib()
            warm = warm_parts["VmRSS"]
            connected = sum(c.connected() for c in clients)
            self.figures.update(
                rss_warm_kib=warm,
                rss_warm_anon_kib=warm_parts["RssAnon"],
                warm_at_s=round(time.monotonic() - t0, 1),
                connected_at_warm=connected,
                subscriptions_at_warm=int((await self.metrics())["subscriptions"]),
            )
            self.say(f"warm: {connected} connected, server RSS {warm / 1024:.1f} MiB")
            report = t0 + 10.0 * (1 + int((time.monotonic() - t0) // 10))
            while time.monotonic() < t0 + opts.duration:
                await asyncio.sleep(max(0.0, min(report, t0 + opts.duration) - time.monotonic()))
                if time.monotonic() >= report:
                    self.say(self.progress(clients, t0))
                    report += 10.0
            self.churn_over.set_result(None)
            self.phase = "settle"
            self.figures["client_loop_lag_churn_max_s"] = self.figures.get(
                "client_loop_lag_max_s", 0.0
            )
            churn_cpu = self.server.cpu_seconds() - cpu0
            self.figures["server_cpu_churn_pct"] = round(100 * churn_cpu / opts.duration, 1)
            _, pending = await asyncio.wait(tasks, timeout=90)
            if pending:
                self.failures.append(f"{len(pending)} clients did not settle within 90 s")
                for task in pending:
                    task.cancel()
            await asyncio.sleep(opts.settle)
            end_parts = self.server.memory_kib()
            end = end_parts["VmRSS"]
            ratio = end / warm
            self.figures.update(
                rss_end_kib=end,
                rss_end_anon_kib=end_parts["RssAnon"],
                rss_every_10s_mib=[round(r / 1024, 1) for _, r in self.rss[::10]],
                rss_ratio=round(ratio, 3),
                rss_peak_kib=max(r for _, r in self.rss),
            )
            self.say(f"end: server RSS {end / 1024:.1f} MiB, {ratio:.3f} x warm")
            if opts.rss_limit is not None and ratio > opts.rss_limit:
                self.failures.append(
                    f"server RSS {end} KiB is {ratio:.3f} x its warm level {warm} KiB "
                    f"(limit {opts.rss_limit})"
                )
            self.phase = "check"
            connected_clients = [c for c in clients if c.connected()]
            await self.check_gauges(
                len(connected_clients), sum(len(c.subs) for c in connected_clients)
            )
            await self.check_state(connected_clients)
            self.phase = "done"
            for client in clients:
                await client.close()
            await asyncio.sleep(1.0)
            await self.check_empty()
            sampler.cancel()
            lag.cancel()
            for task in (sampler, lag):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.summarise()

    def progress(self, clients: list[Client], t0: float) -> str:
        stats = self.stats
        return (
            f"  t={time.monotonic() - t0:5.0f}s connected={sum(c.connected() for c in clients)}"
            f" messages={stats.messages} reconnects={stats.reconnects}"
            f" unsubscribes={stats.unsubscribes} server_closes={sum(stats.server_closes.values())}"
            f" rss={self.rss[-1][1] / 1024 if self.rss else 0:.1f}MiB"
        )

    async def sample_rss(self, t0: float) -> None:
        while True:
            self.rss.append((time.monotonic() - t0, self.server.rss_kib()))
            await asyncio.sleep(1.0)

    async def watch_lag(self) -> None:
        worst = 0.0
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.25)
            worst = max(worst, time.monotonic() - before - 0.25)
            self.figures["client_loop_lag_max_s"] = round(worst, 3)

    async def get(self, path: str) -> Any:
        async with self.http.get(self.url + path) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status} {body}")
            return body["data"]

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(self.url + "/metrics") as resp:
            text = await resp.text()
        values = {}
        for line in text.splitlines():
            if line.startswith("perps_indexer_"):
                name, value = line.split()
                values[name.removeprefix("perps_indexer_")] = float(value)
        return values

    async def check_gauges(self, connected: int, subscriptions: int) -> None:
        metrics = await self.metrics()
        self.figures["server_metrics"] = {
            k: int(v) if v.is_integer() else v for k, v in metrics.items()
        }
        if metrics["connections"] != connected:
            self.failures.append(
                f"the server counts {metrics['connections']:g} connections, the clients hold "
                f"{connected}"
            )
        if metrics["subscriptions"] != subscriptions:
            self.failures.append(
                f"the server counts {metrics['subscriptions']:g} subscriptions, the clients hold "
                f"{subscriptions}"
            )

    async def check_empty(self) -> None:
        metrics = await self.metrics()
        for gauge in ("connections", "subscriptions", "streams"):
            if metrics[gauge] != 0:
                self.failures.append(
                    f"after every client left, the server still counts {metrics[gauge]:g} {gauge}"
                )

    async def snapshot(self, stream: Stream) -> tuple[int, list[Any]] | None:
        """The REST state of a stream at a known seq (None if the venue kept moving)."""
        topic, key = stream
        path = REST_PATHS[topic].format(key)
        for _ in range(20):
            before = (await self.get("/health"))["seq"]
            rows = await self.get(path)
            after = (await self.get("/health"))["seq"]
            if before == after:
                return before, rows
        return None

    async def check_state(self, clients: list[Client]) -> None:
        opts = self.options
        for client in clients:
            for sub in client.subs.values():
                sub.recent = collections.deque([sub.cur] if sub.cur else [], maxlen=32)
        pairs = {(c, s.stream): s for c in clients for s in c.subs.values()}
        unresolved = dict(pairs)
        dropped = 0
        rounds = 0
        started = time.monotonic()
        while unresolved and time.monotonic() - started < opts.check_timeout:
            rounds += 1
            snaps = {}
            for stream in {stream for _, stream in unresolved}:
                snaps[stream] = await self.snapshot(stream)
            await asyncio.sleep(0.3)
            for (client, stream), sub in list(unresolved.items()):
                if not client.connected():
                    dropped += 1
                    del unresolved[(client, stream)]
                    continue
                snap = snaps.get(stream)
                if snap is None or (client.v2 and not sub.acked):
                    continue
                seq, rows = snap
                held = [state for s, state in sub.recent or () if s <= seq]
                if held and rows_of(held[-1]) == rows:
                    del unresolved[(client, stream)]
        checked_clients = len({c for c, _ in pairs if c.connected()})
        self.figures.update(
            checked_clients=checked_clients,
            checked_streams=len(pairs) - dropped,
            check_rounds=rounds,
            check_seconds=round(time.monotonic() - started, 1),
            dropped_during_check=dropped,
        )
        if checked_clients < 0.9 * opts.clients:
            self.failures.append(
                f"only {checked_clients} of {opts.clients} clients were connected for the check"
            )
        for (client, stream), sub in list(unresolved.items())[:10]:
            self.failures.append(
                f"client {client.idx} (v{2 if client.v2 else 1}) {stream}: "
                + describe(sub, snaps.get(stream))
            )
        if unresolved:
            self.failures.append(
                f"{len(unresolved)} of {len(pairs)} client streams never matched the REST state"
            )
        self.figures["state_mismatches"] = len(unresolved)

    def summarise(self) -> None:
        stats = self.stats
        figures = self.figures
        figures.update(
            messages=stats.messages,
            data_messages=stats.data_messages,
            megabytes=round(stats.bytes / 1e6, 1),
            connects=stats.connects,
            slow_connections=stats.slow_connections,
            reconnects=stats.reconnects,
            server_closes=dict(stats.server_closes),
            subscribes=stats.subscribes,
            unsubscribes=stats.unsubscribes,
            acks=stats.acks,
            unsubscribe_acks=stats.unsubscribe_acks,
            resume_requests=stats.resume_requests,
            resumed_rows=stats.resumed_rows,
            stale_after_unsubscribe=stats.stale,
            error_replies=dict(stats.errors),
            anomalies=dict(stats.anomalies),
            rss_min_kib=min(r for _, r in self.rss),
        )
        if stats.errors:
            self.failures.append(f"error replies: {dict(stats.errors)}")
        if stats.anomalies:
            self.failures.append(f"protocol anomalies: {dict(stats.anomalies)}")
            self.failures.extend(stats.anomaly_examples)


def prefill(db: Path, events: int) -> float:
    """Write at least ``events`` events of demo trading (the simulator on the venue, 0.2 s
    steps ending now) into ``db``; returns the seconds it took.

    The server replays the log when it starts, which fills SQLite's page cache (the store sets
    ``cache_size`` to 64 MiB): without this, the cache fills while the soak runs (about 1.1 KB
    per event, some 70 events a second), and the server's RSS grows by up to 64 MiB whatever
    the clients do. A server that has been up for a quarter of an hour is in the same state.
    """
    from perps_indexer.errors import CommandRejected
    from perps_indexer.store import open_store
    from perps_indexer.venue import Venue

    started = time.monotonic()
    markets = default_markets()
    store = open_store(f"sqlite:///{db}?synchronous=NORMAL")
    steps = events // 15 + 1  # the demo makes about 17 events a step
    now = [time.time_ns() // 1_000_000 - steps * 200]
    venue = Venue(markets, store, clock=lambda: now[0])
    simulator = DemoSimulator(markets)
    try:
        while venue.engine.seq < events:
            now[0] += 200
            for command in simulator.step(venue.engine, now[0]):
                with contextlib.suppress(CommandRejected):
                    venue.execute(command)
    finally:
        store.close()
    return time.monotonic() - started


def source_revision() -> str:
    """The commit the server runs, and a digest of uncommitted changes under src/ if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "src"], check=False, cwd=root, capture_output=True
        ).stdout
    except OSError:
        return "unknown"
    if not diff:
        return head
    return f"{head} + uncommitted src changes (sha1 {hashlib.sha1(diff).hexdigest()[:12]})"


def raise_open_files(clients: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = clients * 2 + 1024
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def run(options: SoakOptions, workdir: Path | None = None) -> SoakResult:
    """Start the server, run the soak, stop the server; the figures and any failures."""
    raise_open_files(options.clients)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        server = ServerProcess(workdir)
        prefill_s = prefill(server.db, options.prefill) if options.prefill else 0.0
        server.start()
        soak = Soak(options, server)
        soak.figures["source"] = source_revision()
        soak.figures["prefill_events"] = options.prefill
        soak.figures["prefill_s"] = round(prefill_s, 1)
        try:
            asyncio.run(soak.run())
        finally:
            code = server.stop()
        if code != 0:
            soak.failures.append(f"the server exited with {code} on SIGTERM")
        problems = server.problems()
        soak.figures["server_log_problems"] = len(problems)
        soak.figures["server_log_lines"] = len(server.stderr)
        if problems:
            soak.failures.append(f"{len(problems)} ERROR/Traceback lines in the server log")
            soak.failures.extend(problems[:10])
        return SoakResult(soak.figures, soak.failures, server.stderr)


def _lines(figures: dict[str, Any]) -> Iterator[str]:
    for key, value in figures.items():
        yield f"  {key}: {value}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, help="clients (default 1000; --quick 100)")
    parser.add_argument("--duration", type=float, help="seconds of churn (default 300; --quick 15)")
    parser.add_argument("--quick", action="store_true", help="about 100 clients for about 15 s")
    parser.add_argument("--action-interval", type=float, help="mean seconds between actions")
    parser.add_argument("--settle", type=float, help="seconds between churn end and end RSS")
    parser.add_argument(
        "--rss-limit",
        type=float,
        help="fail when end RSS / warm RSS exceeds this (default 1.10; --quick: report only)",
    )
    parser.add_argument(
        "--prefill",
        type=int,
        help="events of demo trading in the database before the server starts, so that "
        "SQLite's 64 MiB page cache is full when the warm RSS is taken (default 80000; "
        "--quick 0)",
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    options = SoakOptions(seed=args.seed, prefill=80_000)
    if args.quick:
        options.clients, options.duration, options.prefill = 100, 15.0, 0
        options.action_interval, options.settle, options.rss_limit = 1.5, 3.0, None
    for name in ("clients", "duration", "action_interval", "settle", "rss_limit", "prefill"):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    started = time.time()
    result = run(options)
    print(f"soak finished in {time.time() - started:.0f} s")
    print("\n".join(_lines(result.figures)))
    if result.failures:
        print("FAILED:")
        print("\n".join(f"  - {failure}" for failure in result.failures))
        return 1
    print("OK: no server error, every connected client equals REST")
    return 0


if __name__ == "__main__":
    sys.exit(main())
