"""The server: WebSocket streams, the REST API, health and metrics on one aiohttp port.

This is the thin I/O shell around the pure core: it moves frames between sockets and
:class:`~perps_indexer.session.Session` objects, runs the venue's commands, drives keepalive
from a single ticker, and (with ``demo``) runs the market simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import WSCloseCode, WSMsgType, web

from perps_indexer.commands import SettleFunding
from perps_indexer.errors import CommandRejected, ConfigurationError
from perps_indexer.markets import MarketSpec, load_markets
from perps_indexer.server.batch_write import AVAILABLE as BATCH_WRITE
from perps_indexer.server.batch_write import BatchWriter
from perps_indexer.server.lane import RestLane, Routes
from perps_indexer.server.rest import RestApi, cors_middleware, error_middleware, ok
from perps_indexer.session import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    Hub,
    Limits,
    Session,
    Sink,
    SliceSizer,
    error_message,
)
from perps_indexer.store import SQLiteStore, open_store
from perps_indexer.store.sqlite import CHECKPOINT_EVERY, CHECKPOINT_RESTART_FRAMES
from perps_indexer.venue import COMMIT_BATCH, MAX_RESUME_ROWS, Venue, VenueHalted, wall_clock_ms

log = logging.getLogger(__name__)


_HEADER_16: Final = struct.Struct("!BBH")
_HEADER_64: Final = struct.Struct("!BBQ")


def text_frame_header(n: int) -> bytes:
    """The header of an unmasked, final WebSocket text frame (RFC 6455 §5.2) of ``n``
    payload bytes: FIN and opcode 1, then the length in 7 bits, or 126 and 16 bits, or 127
    and 64 bits."""
    if n < 126:
        return bytes((0x81, n))
    if n < 1 << 16:
        return _HEADER_16.pack(0x81, 126, n)
    return _HEADER_64.pack(0x81, 127, n)


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, final WebSocket text frame (RFC 6455 §5.2) around ``payload``."""
    return text_frame_header(len(payload)) + payload


def request_transport(ws: web.WebSocketResponse) -> asyncio.Transport | None:
    """The socket transport under a prepared WebSocket response (None once it is gone).

    Duck-typed: uvloop's transports do not subclass :class:`asyncio.Transport`."""
    req = getattr(ws, "_req", None)
    transport = getattr(req, "transport", None)
    needed = ("write", "is_closing", "get_write_buffer_size", "abort")
    if transport is None or not all(hasattr(transport, name) for name in needed):
        return None
    return transport  # type: ignore[no-any-return]


MAX_FRAME = 64 * 1024
MAX_BODY = 64 * 1024


class WebSocket(web.WebSocketResponse):
    """A server WebSocket whose close for an oversize message names the limit (aiohttp's own
    close for it, 1009, carries no reason)."""

    def __init__(self, max_frame: int) -> None:
        # aiohttp refuses a message of exactly max_msg_size; ours allows max_frame itself.
        super().__init__(autoping=False, max_msg_size=max_frame + 1, compress=False)
        self.too_big = f"a message is larger than {max_frame} bytes (max_frame)".encode()

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = self.too_big
        return await super().close(code=code, message=message, drain=drain)


YIELDS: Final = 4
"""Turns of the event loop the fan-out gives other work between two slices, at most."""

IDLE_TURN: Final = 40e-6
"""A turn of the loop back within this many seconds ran nothing else (between two slices with
nothing else to run, ~25 us pass on uvloop here): the fan-out goes on."""


def keepalive_plan(count: int, ticks: int, step: int) -> list[list[tuple[int, int]]]:
    """The keepalive's plan for one period over ``count`` connections: per tick, the index
    ranges it checks, in slices of at most ``step``; every index once, in ``ticks`` ticks."""
    share = -(-count // ticks)  # ceil
    plan = []
    for t in range(ticks):
        first, last = min(t * share, count), min((t + 1) * share, count)
        plan.append([(i, min(i + step, last)) for i in range(first, last, step)])
    return plan


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``perps-indexer serve`` can be told."""

    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "perps.db"
    api_key: str | None = None
    """Key for write calls; a random one is generated when None."""
    demo: bool = False
    demo_seed: int = 1
    demo_interval: float = 0.2
    markets_file: str | None = None
    history_limit: int = 100
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    max_frame: int = MAX_FRAME
    sync: str = "FULL"
    max_subscriptions: int = 256
    rate: float = 20.0
    burst: int = 50
    max_connections_per_ip: int = 1000
    max_outbox_bytes: int = 8 * 1024 * 1024
    slow_reader_timeout: float = 10.0
    """Seconds one send may wait on a peer that does not read before it is closed with 1013."""
    commit_batch: int = COMMIT_BATCH
    """Submitted commands committed and published together at most; a burst beyond it is
    committed over several event-loop turns, in order (0: everything of one turn)."""
    checkpoint_every: float = CHECKPOINT_EVERY
    """Seconds between checkpoints of a SQLite store, run on a thread of their own so that no
    command waits for one (0: SQLite's own, inside the append that fills the WAL)."""
    snapshot_interval: float = 300.0
    """Seconds between saves of the read models (also saved at a clean stop); 0: only then."""
    fanout_slice: int = 100
    """Pushes of a fan-out's first slice, and the fewest a slice makes, before yielding to the
    event loop (0: a whole round at once). Slices let new orders in between, which keeps
    updates fresh under load."""
    fanout_slice_ms: float = 1.5
    """Milliseconds a fan-out slice should last: its pushes are counted from what the slices
    before it cost (:class:`~perps_indexer.session.SliceSizer`), at least ``fanout_slice``
    (0: every slice makes exactly ``fanout_slice`` pushes)."""
    fanout_share: float = 0.0
    """Between two fan-out slices, other work (orders first) gets more turns of the loop only
    while it has taken less than this share of the time the slice took; the first turn it
    always gets. A request through the REST lane is read and run in that turn (and committed
    before the next slice), so more turns only lengthen the fan-out's cycle (paced freshness
    p99 14.0-16.5 ms at 0 against 19.2-24.3 at 0.2, three pairs of runs in turns); a request
    through aiohttp (``rest_lane`` off) takes several turns, and 0.2 then answers it sooner.
    Measured: BENCHMARKS.md."""
    keepalive_ticks: int = 20
    """Ticks per keepalive period; each checks its share of the connections, so that no tick
    holds the loop for long."""
    keepalive_slice: int = 500
    """Connections one keepalive tick checks before yielding to the event loop."""
    rest_lane: bool = True
    """Answer plain HTTP/1.1 REST reads and writes without aiohttp
    (:mod:`perps_indexer.server.lane`); any other request (the WebSocket upgrade among them)
    hands its connection to aiohttp. False: aiohttp serves every request."""
    idle_timeout: float = 75.0
    """Seconds a keep-alive HTTP connection may stay idle (aiohttp's default too)."""
    batch_write: bool = True
    """Fan-out rounds write one frame to many connections in one call into C
    (:mod:`perps_indexer.server.batch_write`), when the extension is built."""
    io_uring: bool = True
    """The batch writer submits a batch's sends through io_uring, one system call for the
    batch, where the kernel allows it (else one ``send`` each, as with False)."""
    direct_write_limit: int = 256 * 1024
    """Fan-out fast path: a push is written straight to a connection's socket while it has
    nothing queued and fewer bytes than this buffered; 0 sends everything through the outbox."""
    socket_send_buffer: int = 256 * 1024
    """Kernel send buffer of a WebSocket connection (0: the OS default). Small enough that a
    slow reader drains it within the close timeout, so it receives its close code and reason."""
    read_only: bool = False
    """Serve no write endpoints (the REST reads and the streams only)."""
    max_resume_rows: int = MAX_RESUME_ROWS
    """Rows one ``since`` answer may hold; a client further behind gets ``since_too_old``."""


@dataclass
class Metrics:
    connections_total: int = 0
    messages_sent: int = 0
    """Messages the connections' writers sent; the fan-out's direct writes are the hub's
    ``direct_writes``, and ``/metrics`` reports the sum."""
    frames_received: int = 0
    keepalive_timeouts: int = 0
    slow_readers: int = 0
    closed_by_server: int = 0
    started: float = field(default_factory=time.monotonic)


class Server:
    """A running perps-indexer: ``await start()``, then ``url``; ``await stop()`` to end."""

    def __init__(
        self,
        config: ServerConfig,
        markets: dict[int, MarketSpec] | None = None,
        *,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.config = config
        self.clock = clock
        self.markets = markets if markets is not None else load_markets(config.markets_file)
        self.api_key = config.api_key or secrets.token_urlsafe(24)
        self.metrics = Metrics()
        self.connections: dict[Session, web.WebSocketResponse] = {}
        self.per_ip: dict[str, int] = {}
        self.writing_since: dict[Session, float] = {}
        """Sessions whose writer is inside a send, and since when (a peer not reading)."""
        self.closing: set[Session] = set()
        """Sessions whose close (with the session's code and reason) has begun."""
        self.limits = Limits(
            max_subscriptions=config.max_subscriptions,
            rate=config.rate,
            burst=config.burst,
            max_outbox_bytes=config.max_outbox_bytes,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        self.venue: Venue | None = None
        self.simulator: object | None = None
        self.port = config.port
        self.batch_writer: BatchWriter | None = None
        self.slice_sizer = SliceSizer(config.fanout_slice, config.fanout_slice_ms / 1000)
        """How many pushes the fan-out's next slice makes."""
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.lanes: set[RestLane] = set()
        """Connections the REST lane serves (see :mod:`perps_indexer.server.lane`)."""
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle

    def check_config(self) -> None:
        """Refuse unsafe settings before anything listens."""
        loopback = self.config.host in ("127.0.0.1", "localhost", "::1") or (
            self.config.host.startswith("127.")
        )
        if not loopback and not self.config.read_only and self.config.api_key is None:
            raise ConfigurationError(
                f"refusing to accept writes on {self.config.host} without a key: pass "
                "--api-key KEY (or --read-only to serve reads and streams only)"
            )

    async def start(self) -> None:
        self.check_config()
        url = self.config.db
        if "://" not in url and url != ":memory:":
            url = f"sqlite:///{url}?synchronous={self.config.sync}"
        store = open_store(url)
        if isinstance(store, SQLiteStore) and self.config.checkpoint_every > 0:
            store.checkpoint_in_background(self.config.checkpoint_every)
        self.venue = Venue(
            self.markets,
            store,
            history_limit=self.config.history_limit,
            clock=self.clock,
            max_resume_rows=self.config.max_resume_rows,
            commit_batch=self.config.commit_batch,
        )
        app = web.Application(
            middlewares=[cors_middleware, error_middleware], client_max_size=MAX_BODY
        )
        app.router.add_get("/ws", self.ws_handler)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_handler)
        api = RestApi(self.venue, None if self.config.read_only else self.api_key)
        app.router.add_routes(api.routes())
        self._runner = runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=self.config.idle_timeout
        )
        await runner.setup()
        assert runner.server is not None
        factory: Callable[[], asyncio.Protocol] = runner.server
        if self.config.rest_lane:
            factory = functools.partial(
                RestLane,
                Routes.of(api, MAX_BODY),
                runner.server,
                self.lanes,
                self.config.idle_timeout,
            )

        # Listening ourselves, not through an aiohttp site: a connection starts in the REST
        # lane, which hands it to aiohttp's protocol (runner.server) at its first other request.
        self._listener = await asyncio.get_running_loop().create_server(
            factory, self.config.host, self.config.port
        )
        self.port = self._listener.sockets[0].getsockname()[1]  # the real one if given 0
        self._spawn(self._keepalive_loop())
        if self.config.snapshot_interval > 0:
            self._spawn(self._snapshot_loop())
        if self.config.direct_write_limit > 0:
            self.venue.hub.frame_header = text_frame_header
            self.venue.hub.write_limit = self.config.direct_write_limit
            if self.config.batch_write and BATCH_WRITE:
                self.batch_writer = self.venue.hub.write_each = BatchWriter(self.config.io_uring)
                log.info("fan-out batch writes: %s", self.batch_writer.mode)
            elif self.config.batch_write:
                log.warning(
                    "the C extension perps_indexer.server._sendeach is not built (no C compiler "
                    "at install time?): fan-out writes go one connection at a time"
                )
        if self.config.fanout_slice > 0:
            self.venue.hub.sliced = True
            self._spawn(self._fanout_loop(self.venue.hub))
        self._spawn(self._funding_loop())
        if self.config.demo:
            self._start_demo()
        log.info("serving on %s (ws %s)", self.url, self.ws_url)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            self._listener.close()
        for lane in list(self.lanes):
            lane.close()
        for ws in list(self.connections.values()):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
        if self.venue is not None:
            if self.venue.halted is None:
                self._snapshot()
            self.venue.store.close()

    def _snapshot(self) -> None:
        assert self.venue is not None
        started = time.monotonic()
        seq = self.venue.save_snapshot()
        log.info("read models saved at seq %d in %.2f s", seq, time.monotonic() - started)

    async def _snapshot_loop(self) -> None:
        """Save the read models now and then, so that a restart folds only the newer events."""
        assert self.venue is not None
        while True:
            await asyncio.sleep(self.config.snapshot_interval)
            venue = self.venue
            if venue.halted is None and venue.projections.seq > venue.snapshot_seq:
                self._snapshot()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/ws"

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- WebSocket

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        assert self.venue is not None
        ws = WebSocket(self.config.max_frame)
        await ws.prepare(request)
        self._cap_send_buffer(request)
        ip = request.remote or "?"
        if self.per_ip.get(ip, 0) >= self.config.max_connections_per_ip:
            limit = self.config.max_connections_per_ip
            await ws.send_frame(
                error_message(
                    f"too many connections from {ip}: the limit is {limit} per client address "
                    f"(max_connections_per_ip = {limit})"
                ),
                WSMsgType.TEXT,
            )
            await ws.close(code=CLOSE_POLICY_VIOLATION, message=b"connection limit per address")
            return ws
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        clock = asyncio.get_running_loop().time
        session = Session(self.venue.hub, self.venue, self.markets, now=clock(), limits=self.limits)
        wake = asyncio.Event()

        def notify() -> None:
            wake.set()
            if session.close_code == CLOSE_TRY_AGAIN_LATER and session in self.writing_since:
                # Too slow, and the writer is in a send to that peer: it would see the close
                # only when the send ends. Nothing more is owed to this reader: close now.
                self._close_session(session, ws)

        session.notify = notify
        transport = request_transport(ws)
        if transport is not None and self.config.direct_write_limit > 0:
            session.sink = transport
            if self.batch_writer is not None:
                session.fd = self.batch_writer.socket_of(transport)
        self.venue.hub.connect(session)
        self.connections[session] = ws
        self.metrics.connections_total += 1
        writer = asyncio.create_task(self._write_loop(ws, session, wake, session.sink))
        try:
            async for msg in ws:
                self.metrics.frames_received += 1
                if msg.type is WSMsgType.TEXT:
                    session.receive_text(msg.data, clock())
                elif msg.type is WSMsgType.BINARY:
                    session.receive_binary(clock())
                elif msg.type is WSMsgType.PING:
                    session.receive_ping(clock())
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    session.receive_pong(clock())
                elif msg.type is WSMsgType.ERROR:
                    break
                if session.close_code is not None:
                    break  # the writer flushes what is pending and closes with the reason
        finally:
            if session.close_code is not None and not writer.done():
                # Let the writer send the pending replies and the close frame, briefly.
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(writer), 2)
            session.closed()
            self.connections.pop(session, None)
            self.writing_since.pop(session, None)
            self.closing.discard(session)
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    def _cap_send_buffer(self, request: web.Request) -> None:
        size = self.config.socket_send_buffer
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if size and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    async def _write_loop(
        self, ws: web.WebSocketResponse, session: Session, wake: asyncio.Event, sink: Sink | None
    ) -> None:
        """Send what the session queued; while it sends, the fan-out's fast path is off for
        this connection (its frames would overtake the queued ones)."""
        clock = asyncio.get_running_loop().time
        try:
            while not ws.closed:
                await wake.wait()
                wake.clear()
                session.sink = None
                frames = session.take()
                code = session.close_code
                if code == CLOSE_TRY_AGAIN_LATER:
                    frames = []  # a reader that is too slow does not get the backlog first
                self.writing_since[session] = clock()
                for frame in frames:
                    await ws.send_frame(frame, WSMsgType.TEXT)
                    self.metrics.messages_sent += 1  # counted as it goes: /metrics may look now
                del self.writing_since[session]
                if session.close_code is None and not session.outbox:
                    session.sink = sink
                if code is not None:
                    if self._begin_close(session):
                        await self._close(ws, code, session.close_reason)
                    return
        except ConnectionError:
            pass  # the reader side notices the closed connection and cleans up

    def _begin_close(self, session: Session) -> bool:
        """Count a close by the server, once per session; False if it has already begun."""
        if session in self.closing:
            return False
        self.closing.add(session)
        self.metrics.closed_by_server += 1
        if session.close_code == CLOSE_TRY_AGAIN_LATER:
            self.metrics.slow_readers += 1
        return True

    def _close_session(self, session: Session, ws: web.WebSocketResponse) -> None:
        """Close with the session's code and reason, without waiting for its writer."""
        if session.close_code is not None and self._begin_close(session):
            self._spawn(self._close(ws, session.close_code, session.close_reason))

    async def _close(self, ws: web.WebSocketResponse, code: int, reason: str) -> None:
        """Close with a code and reason; a peer that does not read gets its socket aborted."""
        try:
            await asyncio.wait_for(ws.close(code=code, message=reason.encode()[:120]), 2)
        except (TimeoutError, ConnectionError):
            transport = request_transport(ws)
            if transport is not None:
                transport.abort()

    async def _fanout_loop(self, hub: Hub) -> None:
        """Deliver deferred state pushes in slices, yielding to the loop between them.

        A slice lasts about :attr:`ServerConfig.fanout_slice_ms` (:class:`SliceSizer` counts
        its pushes from what the slices before it cost), so that the order flow's share of
        the core between slices does not depend on how fast the host sends.

        The fan-out gives way to the commands it publishes, within limits. After a slice the
        loop gets one turn, in which a request through the REST lane is read and run; with a
        :attr:`ServerConfig.fanout_share` above 0 it gets more, for requests through aiohttp
        (four turns each: read, handler task, commit, reply; Python 3.11's aiohttp starts a
        task per request), until a turn comes back at once (nothing else was ready: asyncio
        cannot be asked), other work has had its share of the slice's time, or :data:`YIELDS`
        turns have passed. A commit still pending is made before the next slice
        (:meth:`Venue.flush_due`), which then carries it.

        The replies of the commands committed there leave in the turn after that slice (the
        futures' callbacks): while the fan-out runs, an acknowledgement waits for one slice.
        That is deliberate. Replying within the commit took the reply's p50 from 1.5-2.5 ms to
        1.0 ms at 1,000 orders/s, but a client that posts its next order on each reply then
        got twice the share of the core: scenario 1's four closed-loop posters changed the
        book 3,900-4,100 times a second instead of 2,000-2,800, and the fan-out at 1,000
        subscribers fell from 0.83-0.86 to 0.75-0.77 of bare picows (BENCHMARKS.md)."""
        wake = asyncio.Event()
        hub.wake = wake.set
        sizer = self.slice_sizer
        share = self.config.fanout_share
        venue = self.venue
        assert venue is not None
        clock = time.perf_counter
        while True:
            await wake.wait()
            wake.clear()
            self._flush_due(venue)
            while True:
                sliced = clock()
                pushed = hub.messages_queued
                more = hub.drain(sizer.budget)
                took = clock() - sliced
                sizer.observe(hub.messages_queued - pushed, took)
                if not more:
                    break
                allowance = took * share
                spent = 0.0
                for _ in range(YIELDS):
                    yielded = clock()
                    await asyncio.sleep(0)
                    turn = clock() - yielded
                    spent += turn
                    if turn < IDLE_TURN or spent >= allowance:
                        break
                self._flush_due(venue)

    @staticmethod
    def _flush_due(venue: Venue) -> None:
        """The venue's pending commit, made for the fan-out. An unexpected error is logged and
        the fan-out goes on, as when the commit ran in a turn of its own and the loop logged it
        (a failed store does not get here: it halts the venue and fails the waiting commands)."""
        try:
            venue.flush_due()
        except Exception:
            log.exception("a commit made before a fan-out slice failed")

    async def _ping(self, ws: web.WebSocketResponse) -> None:
        with contextlib.suppress(ConnectionError):
            await ws.ping()

    async def _keepalive_loop(self) -> None:
        """Check every connection once per period, a share of them at each tick.

        The whole pass at once, even in slices with a yield between them, came back to back:
        every fan-out round and command running meanwhile waited for all of it. Spread over
        ``keepalive_ticks`` ticks, each share is small and ticks are far apart."""
        period = max(0.05, min(1.0, self.config.ping_interval / 4, self.config.ping_timeout / 4))
        ticks = max(1, self.config.keepalive_ticks)
        step = max(1, self.config.keepalive_slice)
        clock = asyncio.get_running_loop().time
        # Sessions only, not (session, ws) pairs: 10,000 fresh tuples a second would be
        # garbage-collector work of their own. Connections opened during a period are checked
        # from the next; those closed meanwhile are skipped by _keepalive.
        while True:
            todo = list(self.connections)
            for tick in keepalive_plan(len(todo), ticks, step):
                await asyncio.sleep(period / ticks)
                for k, (start, stop) in enumerate(tick):
                    if k:
                        await asyncio.sleep(0)  # a share larger than a slice: never hold the loop
                    self._keepalive(todo[start:stop], clock())

    def _keepalive(self, sessions: list[Session], now: float) -> None:
        """Pings, ping timeouts and stuck sends of some connections."""
        for session in sessions:
            ws = self.connections.get(session)
            if ws is None:
                continue  # gone while the ticker yielded
            # A closing session's writer sends what is pending and closes, unless a send
            # to a peer that does not read holds it up for too long.
            started = self.writing_since.get(session)
            waited = now - started if started is not None else 0.0
            stuck = waited > self.config.slow_reader_timeout
            if session.close_code is not None:
                if stuck:
                    self._close_session(session, ws)
                continue
            if stuck:
                log.info("closing a connection that stopped reading for %.0f s", waited)
                session.slow("not reading: a send waited too long; reconnect and resume")
                continue
            action = session.keepalive(now)
            if action == "ping":
                # Not awaited: a peer that does not read must not stall the ticker.
                self._spawn(self._ping(ws))
            elif action == "timeout":
                self.metrics.keepalive_timeouts += 1
                log.info("closing a connection that stopped answering pings")
                self._close_session(session, ws)  # a silent peer is owed nothing more

    async def _funding_loop(self) -> None:
        """Settle each market's funding on time: every second, the markets now due."""
        assert self.venue is not None
        venue = self.venue
        while True:
            await asyncio.sleep(1.0)
            for market_id in venue.engine.funding_ready(self.clock()):
                try:
                    venue.execute(SettleFunding(market_id=market_id))
                except CommandRejected as exc:
                    log.warning("funding settlement of market %s rejected: %s", market_id, exc)
                except VenueHalted:
                    return

    # -- demo

    def _start_demo(self) -> None:
        from perps_indexer.sim import DemoSimulator  # noqa: PLC0415 - only the demo needs it

        assert self.venue is not None
        simulator = DemoSimulator(self.markets, seed=self.config.demo_seed)
        self.simulator = simulator
        self._spawn(self._demo_loop(simulator))

    async def _demo_loop(self, simulator: object) -> None:
        from perps_indexer.sim import DemoSimulator  # noqa: PLC0415

        assert self.venue is not None and isinstance(simulator, DemoSimulator)
        venue = self.venue
        pending = simulator.bootstrap(venue.engine, self.clock())
        while True:
            submitted = []
            for command in pending:
                try:
                    submitted.append(venue.submit(command))  # committed in groups (commit_batch)
                except CommandRejected as exc:
                    log.debug("demo command rejected: %s", exc)
                except VenueHalted:
                    return
            results = await asyncio.gather(*submitted, return_exceptions=True)
            if any(isinstance(r, VenueHalted) for r in results):
                return
            await asyncio.sleep(self.config.demo_interval)
            pending = simulator.step(venue.engine, self.clock())

    # -- health & metrics

    async def health(self, request: web.Request) -> web.Response:
        assert self.venue is not None
        if self.venue.halted:
            return web.json_response(
                {"success": False, "message": self.venue.halted, "code": "venue_halted"},
                status=503,
            )
        return ok("serving", {"seq": self.venue.engine.seq})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        assert self.venue is not None
        venue = self.venue
        hub = venue.hub
        age = max(0.0, (wall_clock_ms() - venue.last_event_ms) / 1000) if venue.last_event_ms else 0
        stored = venue.store.last_seq()
        sqlite = venue.store if isinstance(venue.store, SQLiteStore) else None
        rows = [
            ("connections", "gauge", "Open WebSocket connections.", len(self.connections)),
            (
                "connections_total",
                "counter",
                "WebSocket connections accepted.",
                self.metrics.connections_total,
            ),
            ("subscriptions", "gauge", "Active subscriptions.", hub.subscription_count),
            (
                "streams",
                "gauge",
                "Distinct streams with at least one subscriber.",
                len(hub.streams),
            ),
            (
                "messages_sent_total",
                "counter",
                "Messages written to WebSocket clients.",
                self.metrics.messages_sent + hub.direct_writes,
            ),
            (
                "frames_received_total",
                "counter",
                "Frames received from WebSocket clients.",
                self.metrics.frames_received,
            ),
            (
                "keepalive_timeouts_total",
                "counter",
                "Connections closed for not answering pings.",
                self.metrics.keepalive_timeouts,
            ),
            (
                "direct_writes_total",
                "counter",
                "Messages written straight to the socket (the fan-out fast path).",
                hub.direct_writes,
            ),
            (
                "fanout_batches_total",
                "counter",
                "Calls of the fan-out's batch writer, each one frame to many connections.",
                self.batch_writer.batches if self.batch_writer is not None else 0,
            ),
            (
                "fanout_io_uring",
                "gauge",
                "1 when the batch writer submits its sends through io_uring, 0 otherwise.",
                int(self.batch_writer is not None and self.batch_writer.mode == "io_uring"),
            ),
            (
                "fanout_short_writes_total",
                "counter",
                "Batch writes a socket did not take whole (its transport buffered the rest).",
                self.batch_writer.short_writes if self.batch_writer is not None else 0,
            ),
            (
                "fanout_slice_pushes",
                "gauge",
                "Pushes the fan-out's next slice makes before other work gets a turn, sized "
                "for --fanout-slice-ms from what the slices before it cost.",
                self.slice_sizer.budget,
            ),
            (
                "store_checkpoints_total",
                "counter",
                "Checkpoints of the SQLite file made by the background checkpointer.",
                sqlite.checkpoints if sqlite is not None else 0,
            ),
            (
                "store_wal_frames",
                "gauge",
                "Pages in the SQLite WAL at the background checkpointer's last pass; it stays "
                f"near {CHECKPOINT_RESTART_FRAMES:,} or below while the WAL's restarts keep up.",
                sqlite.wal_frames if sqlite is not None else 0,
            ),
            (
                "slow_readers_total",
                "counter",
                "Connections closed with 1013 for not reading.",
                self.metrics.slow_readers,
            ),
            (
                "closed_by_server_total",
                "counter",
                "Connections the server closed with a code and reason.",
                self.metrics.closed_by_server,
            ),
            (
                "events_applied_total",
                "counter",
                "Events folded into the read models.",
                venue.events_applied,
            ),
            (
                "event_seq",
                "gauge",
                "Sequence number of the newest applied event.",
                venue.projections.seq,
            ),
            (
                "lag_events",
                "gauge",
                "Stored events not yet applied to the read models.",
                stored - venue.projections.seq,
            ),
            (
                "last_event_age_seconds",
                "gauge",
                "Seconds since the newest event's timestamp.",
                round(age, 3),
            ),
            (
                "commands_accepted_total",
                "counter",
                "Commands the engine accepted.",
                venue.commands_accepted,
            ),
            (
                "store_commits_total",
                "counter",
                "Store transactions committed; commands_accepted_total over this is how many "
                "commands a group commit carries.",
                venue.commits,
            ),
            (
                "commands_rejected_total",
                "counter",
                "Commands the engine rejected.",
                venue.commands_rejected,
            ),
        ]
        lines = []
        for name, kind, help_text, value in rows:
            full = f"perps_indexer_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {value}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
