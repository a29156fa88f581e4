"""The server: WebSocket streams, the REST API, health and metrics on one aiohttp port.

This is the thin I/O shell around the pure core: it moves frames between sockets and
:class:`~perps_indexer.session.Session` objects, runs the venue's commands, drives keepalive
from a single ticker, and (with ``demo``) runs the market simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from perps_indexer.errors import CommandRejected
from perps_indexer.markets import MarketSpec, load_markets
from perps_indexer.server.rest import RestApi, error_middleware, ok
from perps_indexer.session import Session
from perps_indexer.store import open_store
from perps_indexer.venue import Venue, VenueHalted, wall_clock_ms

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024
MAX_BODY = 64 * 1024


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


@dataclass
class Metrics:
    connections_total: int = 0
    messages_sent: int = 0
    frames_received: int = 0
    keepalive_timeouts: int = 0
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
        self.venue: Venue | None = None
        self.simulator: object | None = None
        self.port = config.port
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle

    async def start(self) -> None:
        url = self.config.db
        if "://" not in url and url != ":memory:":
            url = f"sqlite:///{url}?synchronous={self.config.sync}"
        store = open_store(url)
        self.venue = Venue(
            self.markets, store, history_limit=self.config.history_limit, clock=self.clock
        )
        app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
        app.router.add_get("/ws", self.ws_handler)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_routes(RestApi(self.venue, self.api_key).routes())
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # the real port when given port 0
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._spawn(self._keepalive_loop())
        if self.config.demo:
            self._start_demo()
        log.info("serving on %s (ws %s)", self.url, self.ws_url)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ws in list(self.connections.values()):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
        if self.venue is not None:
            self.venue.store.close()

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
        ws = web.WebSocketResponse(
            # aiohttp refuses a message of exactly max_msg_size; ours allows max_frame itself.
            autoping=False,
            max_msg_size=self.config.max_frame + 1,
            compress=False,
        )
        await ws.prepare(request)
        clock = asyncio.get_running_loop().time
        session = Session(
            self.venue.hub,
            self.venue.projections,
            self.markets,
            now=clock(),
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_timeout,
        )
        wake = asyncio.Event()
        session.notify = wake.set
        self.venue.hub.connect(session)
        self.connections[session] = ws
        self.metrics.connections_total += 1
        writer = asyncio.create_task(self._write_loop(ws, session, wake))
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
        finally:
            session.closed()
            self.connections.pop(session, None)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    async def _write_loop(
        self, ws: web.WebSocketResponse, session: Session, wake: asyncio.Event
    ) -> None:
        try:
            while not ws.closed:
                await wake.wait()
                wake.clear()
                frames = session.take()
                for frame in frames:
                    await ws.send_frame(frame, WSMsgType.TEXT)
                self.metrics.messages_sent += len(frames)
        except ConnectionError:
            pass  # the reader side notices the closed connection and cleans up

    async def _keepalive_loop(self) -> None:
        period = max(0.05, min(1.0, self.config.ping_interval / 4, self.config.ping_timeout / 4))
        clock = asyncio.get_running_loop().time
        while True:
            await asyncio.sleep(period)
            now = clock()
            for session, ws in list(self.connections.items()):
                action = session.keepalive(now)
                if action == "ping":
                    with contextlib.suppress(ConnectionError):
                        await ws.ping()
                elif action == "timeout":
                    self.metrics.keepalive_timeouts += 1
                    log.info("closing a connection that stopped answering pings")
                    self._spawn(
                        ws.close(
                            code=session.close_code or 1011, message=session.close_reason.encode()
                        )
                    )

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
            for command in pending:
                try:
                    venue.execute(command)
                except CommandRejected as exc:
                    log.debug("demo command rejected: %s", exc)
                except VenueHalted:
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
                self.metrics.messages_sent,
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
