"""The asyncio client.

One :class:`Client` holds one WebSocket connection and any number of subscriptions, each its own
async iterator of :class:`~perps_indexer.client.rows.Message`::

    async with Client("ws://127.0.0.1:8080/ws") as client:
        async for message in client.subscribe("positions", address="0x..."):
            print(message.rows)

The connection is kept alive with protocol pings, reconnected with backoff when it drops, and
every subscription is sent again after a reconnect; the first message after it is marked
``snapshot=True``.

Protocol versions. Every request carries ``op``, ``id`` (and, for history topics after a
reconnect, ``since``). A v2 server acknowledges it with ``{"message": "subscribed", "id": ...}``
and tags errors and data with the id; a v1 server ignores the extra fields and answers with the
data (or an error) alone. The first reply on each connection tells which one is speaking.

Until the server is known to speak v2, requests go out one at a time and each waits for its
reply, so that a v1 error reply (which carries no id) belongs to the one request in flight.
v1 data messages carry no key either: they are routed by their rows' ``address`` or
``market_id``. An empty ``data`` list names no key: it goes to the oldest subscription of that
topic still waiting for its reply (the v1 rule), and since it might instead have been an update
of another subscription of the same topic whose list just emptied, every such subscription that
last showed rows is asked for its state again (a resubscribe on the same connection). Two local
subscriptions to the same stream share one subscription on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import logging
import ssl as _ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, overload

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from perps_indexer.client.backoff import Backoff
from perps_indexer.client.errors import ClientClosed, ConnectFailed, SubscriptionRejected
from perps_indexer.client.rows import (
    BestPrice,
    BookLevel,
    DepositWithdraw,
    FundingRate,
    Message,
    OpenOrder,
    OrderHistory,
    Position,
    R,
    RecentTrade,
    Trade,
    decode_rows,
)
from perps_indexer.wire import (
    DEPOSIT_WITHDRAW_HISTORY,
    LIVE_ORDER_HISTORY,
    LIVE_TOPICS,
    LIVE_TRADE_HISTORY,
    ORDER_HISTORY,
    TRADE_HISTORY,
)

log = logging.getLogger(__name__)

HISTORY_TOPICS = frozenset(
    {TRADE_HISTORY, ORDER_HISTORY, DEPOSIT_WITHDRAW_HISTORY, LIVE_TRADE_HISTORY, LIVE_ORDER_HISTORY}
)
"""Topics whose resubscribe carries ``since`` (protocol v2)."""

FATAL_CODES = frozenset(
    {
        "invalid_address",
        "unknown_market",
        "unknown_topic",
        "invalid_request",
        "invalid_json",
        "invalid_op",
        "invalid_id",
        "invalid_since",
        "too_many_subscriptions",
    }
)
"""Error codes of requests that can never succeed as sent: they end the subscription. Any
other error (rate limit, overload, an internal error) is retried with backoff."""

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    """Lost or failed; the next attempt is ``delay`` seconds away."""
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StateChange:
    """A connection state change, as given to ``on_state``."""

    state: ConnectionState
    reason: str = ""
    delay: float | None = None
    """DISCONNECTED: seconds until the next attempt."""
    attempt: int = 0
    """Consecutive failures so far."""


# -- mailboxes: where a subscription's messages wait for its consumer


class Sink(Protocol):
    """Receives one subscription's messages (on the client's event loop)."""

    def put(self, message: Message[Any]) -> None: ...
    def end(self, error: BaseException | None) -> None: ...


class Mailbox:
    """A bounded FIFO of messages. When it is full the oldest message goes: every message is a
    full state (or newest-N window), so the newer one supersedes it; a dropped snapshot mark
    moves to the next message. The live topics are the exception: each of their messages is an
    event, so a consumer that lets ``max_queue`` of them pile up loses the oldest (logged)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, maxsize)
        self.items: deque[Message[Any]] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.dropped = 0

    def _push(self, message: Message[Any]) -> None:
        if len(self.items) >= self.maxsize:
            old = self.items.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("a slow consumer: %d message(s) dropped so far", self.dropped)
            if old.snapshot:
                if self.items:
                    self.items[0] = dataclasses.replace(self.items[0], snapshot=True)
                else:
                    message = dataclasses.replace(message, snapshot=True)
        self.items.append(message)

    def _finish(self, error: BaseException | None) -> bool:
        """Mark the mailbox ended (once); True if this call ended it."""
        if self.ended:
            return False
        self.ended, self.error = True, error
        return True

    def _take(self, stop: type[Exception]) -> Message[Any] | None:
        """The oldest message; once ended and empty, raises the error or ``stop``; None when
        the consumer must wait."""
        if self.items:
            return self.items.popleft()
        if self.ended:
            if self.error is not None:
                raise self.error
            raise stop
        return None


class AsyncMailbox(Mailbox):
    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self._ready = asyncio.Event()

    def put(self, message: Message[Any]) -> None:
        self._push(message)
        self._ready.set()

    def end(self, error: BaseException | None) -> None:
        if self._finish(error):
            self._ready.set()

    async def get(self) -> Message[Any]:
        while True:
            message = self._take(StopAsyncIteration)
            if message is not None:
                return message
            self._ready.clear()
            await self._ready.wait()


# -- subscriptions


class Subscription(Generic[R]):
    """One subscription: an async iterator of its messages.

    The iterator ends when the subscription is unsubscribed or the client closes, and raises
    :class:`SubscriptionRejected` if the server refused it for good, or
    :class:`ConnectFailed` if the server cannot be reached and retrying will not help.
    ``async with`` unsubscribes on exit.
    """

    def __init__(
        self,
        client: Client,
        stream: _Stream,
        sink: Sink,
        address: str | None,
        market_id: str | int | None,
    ) -> None:
        self._client = client
        self._stream = stream
        self._sink = sink
        self.topic = stream.topic
        self.address = address
        self.market_id = market_id
        self.closed = False
        self.error: BaseException | None = None

    @property
    def id(self) -> int:
        """The request id sent to the server (shared by subscriptions to the same stream)."""
        return self._stream.id

    @property
    def last_seq(self) -> int | None:
        return self._stream.last_seq

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message[R]:
        if not isinstance(self._sink, AsyncMailbox):
            raise TypeError("this subscription delivers to a callback, not an iterator")
        return await self._sink.get()

    def unsubscribe(self) -> None:
        """Stop this subscription (see :meth:`Client.unsubscribe`)."""
        self._client.unsubscribe(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.unsubscribe()

    def _put(self, message: Message[Any]) -> None:
        if not self.closed:
            self._sink.put(message)

    def _end(self, error: BaseException | None) -> None:
        if not self.closed:
            self.closed, self.error = True, error
            self._sink.end(error)

    def __repr__(self) -> str:
        key = (
            f"address={self.address}" if self.address is not None else f"market_id={self.market_id}"
        )
        return f"<Subscription {self.topic} {key} id={self.id}>"


def canonical_key(field: str, value: object) -> str:
    """The form two keys are compared in: addresses without case or leading zeros, market ids
    as decimal integers."""
    text = str(value).strip().lower()
    if field == "address" and text.startswith("0x"):
        return "0x" + (text[2:].lstrip("0") or "0")
    if field == "market_id" and text.isdigit():
        return str(int(text))
    return text


class _Stream:
    """One subscription on the wire; the local :class:`Subscription` objects that share it."""

    def __init__(self, topic: str, field: str, value: str | int, sid: int, since: int | None):
        self.topic = topic
        self.field = field
        self.value = value
        self.canon = (topic, canonical_key(field, value))
        self.id = sid
        self.subs: list[Subscription[Any]] = []
        self.awaiting = False
        """A subscribe request is out and its reply has not been routed yet."""
        self.sent_at = 0.0
        self.fresh = True
        """The next data message is the first after a (re)subscribe: a snapshot."""
        self.resync = False
        """The request out only re-reads the state (v1 ambiguity): deliver it if it changed."""
        self.nonempty = False
        self.last: Message[Any] | None = None
        self.last_seq = since
        self.sent_since: int | None = None
        """The ``since`` of the request out: its answer is a resume delta (v2)."""
        self.window = 0
        """The longest full history window seen: the server's newest-N size, once reached."""
        self.retry: asyncio.TimerHandle | None = None
        self.backoff: Backoff | None = None

    def request(self, op: str, extended: bool, resume: bool = False) -> str:
        """The request frame; ``op`` "refresh" is a subscribe that asks for the full state.
        ``since`` goes with a history subscribe when resuming, or when the caller gave it and
        nothing has been delivered yet."""
        body: dict[str, Any] = {"topic": self.topic, self.field: self.value}
        self.sent_since = None
        if extended:
            body["op"] = "unsubscribe" if op == "unsubscribe" else "subscribe"
            body["id"] = self.id
            if (
                op == "subscribe"
                and self.topic in HISTORY_TOPICS
                and self.last_seq is not None
                and (resume or self.last is None)
            ):
                body["since"] = self.sent_since = self.last_seq
        return _encoder.encode(body).decode()

    def cancel_retry(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None

    def describe(self) -> str:
        return f"{self.topic} {self.field}={self.value}"


class _Conn:
    """One live connection's protocol state."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.protocol: int | None = None
        self.extended = True
        """Requests carry op/id/since (off if the server objected to them)."""
        self.outbox: deque[tuple[str, _Stream]] = deque()
        self.inflight: _Stream | None = None
        """The one request awaiting its reply while the server is not known to speak v2."""
        self.changed = asyncio.Event()
        self.tokens = 0.0
        self.tokens_at = 0.0


def _int_id(value: object) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def infer_code(text: str) -> str:
    """A stable code for a v1 error sentence (which carries none)."""
    lowered = text.lower()
    if "rate limit" in lowered or "too many" in lowered:
        return "rate_limited"
    if "address" in lowered:
        return "invalid_address"
    if "market" in lowered:
        return "unknown_market"
    if "topic" in lowered:
        return "unknown_topic"
    if "json" in lowered or "request" in lowered:
        return "invalid_request"
    return "error"


def _fatal_reason(exc: Exception) -> str | None:
    """Why a failed connection attempt is not worth repeating, or None if it is."""
    if isinstance(exc, _ssl.SSLCertVerificationError):
        return f"the server's certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in (408, 425, 429) or status >= 500:
            return None
        return f"the server refused the WebSocket upgrade with HTTP {status}"
    if isinstance(exc, OSError | TimeoutError):
        return None  # network trouble: the server may be restarting
    if isinstance(exc, InvalidMessage) and isinstance(exc.__cause__, EOFError):
        return None  # the server dropped the connection during the handshake
    return f"{type(exc).__name__}: {exc}"


def _close_reason(exc: ConnectionClosed) -> str:
    if exc.sent is not None and exc.sent.code == 1011:
        return exc.sent.reason or "keepalive ping timeout"
    if exc.rcvd is not None:
        return f"the server closed the connection ({exc.rcvd.code} {exc.rcvd.reason})".rstrip()
    return "the connection dropped"


def merge_history(
    topic: str, delta: tuple[Any, ...], base: tuple[Any, ...], window: int
) -> tuple[Any, ...]:
    """The window after a resume: the changed rows (newest first) before the older ones they
    do not replace, cut to ``window`` rows when that is known (0: not known)."""
    if topic == ORDER_HISTORY:
        changed = {row.order_id for row in delta}
        merged = [*delta, *(row for row in base if row.order_id not in changed)]
    else:
        merged = [*delta, *base]
    return tuple(merged[:window] if window else merged)


class Client:
    """A WebSocket client for perps-indexer and servers speaking the same protocol.

    Use ``async with Client(url) as client`` (or ``await start()`` / ``await close()``). All
    methods must be called from the event loop the client was started on.

    - ``ping_interval`` / ``ping_timeout``: protocol pings; no pong in time means the
      connection is dead (None disables).
    - ``idle_timeout``: a connection that delivers nothing (no frame at all) for this long is
      dead (default None: quiet streams are normal).
    - ``reply_timeout``: how long a request may wait for its reply: a v1 request then lets the
      next one go, a v2 request is sent again.
    - ``send_rate`` / ``send_burst``: requests per second (token bucket), below the inbound
      limit perps-indexer publishes (20/s, bursts of 50), so resubscribing many streams after
      a reconnect is not refused.
    - ``backoff``: reconnect delays (default :class:`Backoff` with its defaults).
    - ``max_retries``: consecutive failed connection attempts before giving up (None: never).
    - ``max_queue``: messages kept per subscription for a slow consumer (oldest dropped; for
      the live topics, whose messages are events, that loses events: consume them promptly).
    - ``on_state``: called with every :class:`StateChange`.
    - ``ssl``: an ``ssl.SSLContext`` for ``wss://`` (default: the system's trust store).
    - ``v2``: send the protocol v2 fields (``op``, ``id``, ``since``); False speaks only the
      original protocol, for servers that refuse unknown fields.
    - ``resume``: after a reconnect, ask history topics only for the rows changed since the
      last seq (v2); the snapshot then has them in ``resumed`` and the merged window in
      ``rows``. False asks for the full window again. For the live topics ``resumed`` holds
      every row pushed while disconnected (newest first) and ``rows`` the newest one.
    """

    def __init__(
        self,
        url: str,
        *,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        idle_timeout: float | None = None,
        reply_timeout: float = 10.0,
        send_rate: float = 15.0,
        send_burst: int = 40,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        backoff: Backoff | None = None,
        max_retries: int | None = None,
        max_queue: int = 1000,
        max_size: int | None = 16 * 1024 * 1024,
        on_state: Callable[[StateChange], None] | None = None,
        ssl: _ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
        v2: bool = True,
        resume: bool = True,
    ) -> None:
        self.url = url
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.idle_timeout = idle_timeout
        self.reply_timeout = reply_timeout
        self.send_rate = send_rate
        self.send_burst = send_burst
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.backoff = backoff or Backoff()
        self.max_retries = max_retries
        self.max_queue = max_queue
        self.max_size = max_size
        self.on_state = on_state
        self.ssl = ssl
        self.headers = dict(headers or {})
        self.v2 = v2
        self.resume = resume
        self.state = ConnectionState.CLOSED
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._by_id: dict[int, _Stream] = {}
        self._fields: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._conn: _Conn | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: ConnectFailed | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Start connecting (returns at once; subscriptions wait for the connection)."""
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="perps-client")

    async def close(self) -> None:
        """Close the connection; every subscription's iterator ends."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._end_all(None)
        self._set_state(ConnectionState.CLOSED, "closed by the client")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def protocol_version(self) -> int | None:
        """1 or 2 once the server's first reply on the current connection told; else None."""
        return self._conn.protocol if self._conn is not None else None

    # -- subscriptions

    @overload
    def subscribe(
        self, topic: Literal["positions"], *, address: str, since: int | None = None
    ) -> Subscription[Position]: ...
    @overload
    def subscribe(
        self,
        topic: Literal["trade_history", "live_trade_history"],
        *,
        address: str,
        since: int | None = None,
    ) -> Subscription[Trade]: ...
    @overload
    def subscribe(
        self, topic: Literal["open_orders"], *, address: str, since: int | None = None
    ) -> Subscription[OpenOrder]: ...
    @overload
    def subscribe(
        self,
        topic: Literal["order_history", "live_order_history"],
        *,
        address: str,
        since: int | None = None,
    ) -> Subscription[OrderHistory]: ...
    @overload
    def subscribe(
        self, topic: Literal["orderbook"], *, market_id: int | str, since: int | None = None
    ) -> Subscription[BookLevel]: ...
    @overload
    def subscribe(
        self, topic: Literal["recent_trades"], *, market_id: int | str, since: int | None = None
    ) -> Subscription[RecentTrade]: ...
    @overload
    def subscribe(
        self, topic: Literal["best_price"], *, market_id: int | str, since: int | None = None
    ) -> Subscription[BestPrice]: ...
    @overload
    def subscribe(
        self,
        topic: Literal["deposit_withdraw_history"],
        *,
        address: str,
        since: int | None = None,
    ) -> Subscription[DepositWithdraw]: ...
    @overload
    def subscribe(
        self, topic: Literal["live_funding_rate"], *, market_id: int | str, since: int | None = None
    ) -> Subscription[FundingRate]: ...
    @overload
    def subscribe(
        self,
        topic: str,
        *,
        address: str | None = None,
        market_id: int | str | None = None,
        since: int | None = None,
    ) -> Subscription[Any]: ...

    def subscribe(
        self,
        topic: str,
        *,
        address: str | None = None,
        market_id: int | str | None = None,
        since: int | None = None,
    ) -> Subscription[Any]:
        """Subscribe to ``topic`` for an ``address`` or a ``market_id`` (exactly one).

        Returns at once; the request is sent when the connection is up. ``since`` (protocol
        v2, history topics) asks only for what came after that sequence number.
        """
        return self.add_subscription(topic, address, market_id, since, AsyncMailbox(self.max_queue))

    def add_subscription(
        self,
        topic: str,
        address: str | None,
        market_id: int | str | None,
        since: int | None,
        sink: Sink,
    ) -> Subscription[Any]:
        """:meth:`subscribe` delivering to any :class:`Sink` (used by the sync client)."""
        if self._closed:
            raise ClientClosed("the client is closed")
        if (address is None) == (market_id is None):
            raise ValueError("give exactly one of address= or market_id=")
        field, value = ("address", address) if address is not None else ("market_id", market_id)
        assert value is not None
        canon = (topic, canonical_key(field, value))
        stream = self._streams.get(canon)
        if stream is None:
            stream = _Stream(topic, field, value, next(self._ids), since)
        sub: Subscription[Any] = Subscription(self, stream, sink, address, market_id)
        if self._failure is not None:
            sub._end(self._failure)
            return sub
        self._fields[topic] = field
        self._streams[canon] = stream
        self._by_id[stream.id] = stream
        if not stream.subs:
            # New, or a v1 leftover the server still feeds: its next message is a snapshot.
            stream.subs.append(sub)
            stream.fresh = True
            if not stream.awaiting:
                self._enqueue("subscribe", stream)
            return sub
        stream.subs.append(sub)
        if stream.last is not None and not stream.fresh:
            # Shared stream already live: its last message is the current state.
            sub._put(
                dataclasses.replace(stream.last, snapshot=True, subscription=sub, resumed=None)
            )
        return sub

    def unsubscribe(self, sub: Subscription[Any]) -> None:
        """End ``sub``'s iterator. The server is told when it speaks protocol v2 and no other
        local subscription shares the stream; a v1 server cannot unsubscribe and keeps
        sending that stream on this connection (the client discards it)."""
        stream = sub._stream
        if sub in stream.subs:
            stream.subs.remove(sub)
        sub._end(None)
        if stream.subs or self._streams.get(stream.canon) is not stream:
            return
        stream.cancel_retry()
        conn = self._conn
        if conn is None or (("subscribe", stream) in conn.outbox and not stream.awaiting):
            self._forget(stream)  # the server never heard of it
        elif conn.protocol != 1:
            self._enqueue("unsubscribe", stream)
        # v1: kept as a leftover so that its messages are recognised and dropped.

    def _enqueue(self, op: str, stream: _Stream) -> None:
        conn = self._conn
        if conn is not None and (op, stream) not in conn.outbox:
            conn.outbox.append((op, stream))
            conn.changed.set()

    def _forget(self, stream: _Stream) -> None:
        if self._streams.get(stream.canon) is stream:
            del self._streams[stream.canon]
        self._by_id.pop(stream.id, None)
        stream.cancel_retry()
        conn = self._conn
        if conn is not None:
            conn.outbox = deque(
                item for item in conn.outbox if item[1] is not stream or item[0] == "unsubscribe"
            )
            if conn.inflight is stream:
                conn.inflight = None
                conn.changed.set()

    def _end_all(self, error: BaseException | None) -> None:
        for stream in list(self._streams.values()):
            for sub in list(stream.subs):
                sub._end(error)
            self._forget(stream)

    # -- connection loop

    def _set_state(
        self, state: ConnectionState, reason: str = "", delay: float | None = None
    ) -> None:
        if state is self.state and state is ConnectionState.CLOSED:
            return
        self.state = state
        change = StateChange(state, reason, delay, self.backoff.attempts)
        log.info("%s %s%s", self.url, state.value, f": {reason}" if reason else "")
        if self.on_state is not None:
            try:
                self.on_state(change)
            except Exception:
                log.exception("on_state callback failed")

    async def _run(self) -> None:
        failures = 0
        while True:
            self._set_state(ConnectionState.CONNECTING)
            try:
                # ssl only when given: websockets refuses ssl=None for wss:// URLs.
                tls: dict[str, Any] = {} if self.ssl is None else {"ssl": self.ssl}
                ws = await connect(
                    self.url,
                    **tls,
                    additional_headers=self.headers or None,
                    open_timeout=self.open_timeout,
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_timeout,
                    close_timeout=self.close_timeout,
                    max_size=self.max_size,
                )
            except Exception as exc:
                failures += 1
                fatal = _fatal_reason(exc)
                if fatal is None and self.max_retries is not None and failures > self.max_retries:
                    fatal = f"gave up after {failures} attempts ({exc})"
                if fatal is not None:
                    self._failure = ConnectFailed(f"cannot connect to {self.url}: {fatal}")
                    self._end_all(self._failure)
                    self._set_state(ConnectionState.CLOSED, fatal)
                    return
                await self._pause(f"cannot connect ({type(exc).__name__}: {exc})")
                continue
            failures = 0
            self.backoff.succeeded()
            self._set_state(ConnectionState.CONNECTED)
            try:
                reason = await self._serve(ws)
            except Exception as exc:
                # A bug must cost a reconnect, not the client: iterators would wait forever.
                log.exception("the connection loop failed")
                reason = f"client error ({type(exc).__name__}: {exc})"
            finally:
                await ws.close()
            await self._pause(reason)

    async def _pause(self, reason: str) -> None:
        delay = self.backoff.next_delay()
        self._set_state(ConnectionState.DISCONNECTED, reason, delay)
        await asyncio.sleep(delay)

    async def _serve(self, ws: ClientConnection) -> str:
        """Resubscribe everything, then read until the connection dies; returns why it did."""
        conn = _Conn(ws)
        conn.extended = self.v2
        self._conn = conn
        for stream in list(self._streams.values()):
            if not stream.subs:
                self._forget(stream)  # a v1 leftover: the new connection does not carry it
                continue
            stream.cancel_retry()
            stream.fresh, stream.awaiting, stream.resync = True, False, False
            conn.outbox.append(("subscribe", stream))
        conn.changed.set()
        sender = asyncio.get_running_loop().create_task(self._send_loop(conn))
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        frame = await ws.recv()
                except TimeoutError:
                    return f"nothing received for {self.idle_timeout} s"
                text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                try:
                    self._received(conn, text)
                except Exception:
                    # A bug in handling one frame must not take the connection loop down.
                    log.exception("failed to handle a frame: %.300s", text)
        except ConnectionClosed as exc:
            return _close_reason(exc)
        finally:
            self._conn = None
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _send_loop(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn.tokens, conn.tokens_at = float(self.send_burst), loop.time()
        try:
            while True:
                conn.changed.clear()
                wait = self._overdue(conn, loop.time())
                blocked = conn.inflight is not None and conn.protocol != 2
                if blocked or not conn.outbox:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await conn.changed.wait()
                    continue
                now = loop.time()
                conn.tokens = min(
                    self.send_burst, conn.tokens + (now - conn.tokens_at) * self.send_rate
                )
                conn.tokens_at = now
                if conn.tokens < 1:
                    await asyncio.sleep((1 - conn.tokens) / self.send_rate)
                    continue
                op, stream = conn.outbox.popleft()
                if op == "unsubscribe":
                    if conn.protocol == 2 and not stream.subs:
                        conn.tokens -= 1
                        await conn.ws.send(stream.request(op, True))
                        self._forget(stream)
                    continue  # v1 cannot unsubscribe: it stays a leftover (see unsubscribe)
                conn.tokens -= 1
                stream.awaiting, stream.sent_at = True, now
                if conn.protocol != 2:
                    conn.inflight = stream
                await conn.ws.send(stream.request(op, conn.extended, self.resume))
        except ConnectionClosed:
            pass  # the reader sees it too and reports why
        except Exception:
            log.exception("sending a request failed")
            await conn.ws.close(1011, "client error")  # the reader then reconnects

    def _overdue(self, conn: _Conn, now: float) -> float | None:
        """Deal with requests whose reply is late; returns seconds until the next is due."""
        if conn.protocol != 2:
            inflight = conn.inflight
            if inflight is None:
                return None
            left = inflight.sent_at + self.reply_timeout - now
            if left > 0:
                return left
            # Some servers only answer on change: stop waiting; its rows are still routed.
            log.warning(
                "no reply to %s in %.1f s; going on", inflight.describe(), self.reply_timeout
            )
            conn.inflight = None
            return None
        wait: float | None = None
        for stream in self._streams.values():
            if stream.awaiting:
                left = stream.sent_at + self.reply_timeout - now
                if left <= 0:
                    # e.g. dropped by a server's rate limit, whose error names no request
                    log.warning("no reply to %s; asking again", stream.describe())
                    stream.awaiting = False
                    self._enqueue("subscribe", stream)
                else:
                    wait = left if wait is None else min(wait, left)
        return wait

    # -- incoming frames

    def _received(self, conn: _Conn, text: str) -> None:
        received_at = time.time()
        try:
            msg = _decoder.decode(text)
        except msgspec.DecodeError:
            log.warning("ignoring a frame that is not JSON: %.200s", text)
            return
        if not isinstance(msg, dict):
            log.warning("ignoring a frame that is not a JSON object: %.200s", text)
            return
        kind = msg.get("message")
        mid = _int_id(msg.get("id"))
        by_id = self._by_id.get(mid) if mid is not None else None
        if kind in ("subscribed", "unsubscribed"):
            conn.protocol = 2
            if by_id is not None and kind == "subscribed":
                self._replied(conn, by_id)
            conn.changed.set()
            return
        if kind == "error":
            self._error_reply(conn, msg, text, by_id)
            return
        data = msg.get("data")
        if not isinstance(kind, str) or not isinstance(data, list):
            log.debug("ignoring a frame of unknown shape: %.200s", text)
            return
        if by_id is not None and by_id.topic == kind:
            conn.protocol = 2
            stream: _Stream | None = by_id
        else:
            if conn.protocol is None and mid is None:
                conn.protocol = 1
            stream = self._route_v1(conn, kind, data)
        if stream is not None:
            self._data(conn, stream, msg, data, text, received_at)

    def _route_v1(self, conn: _Conn, topic: str, data: list[Any]) -> _Stream | None:
        """The stream a message without an id belongs to (see the module docstring)."""
        field = self._fields.get(topic)
        if data:
            row = data[0]
            if field is None or not isinstance(row, dict) or row.get(field) is None:
                return None
            return self._streams.get((topic, canonical_key(field, row[field])))
        same_topic = [s for s in self._streams.values() if s.topic == topic]
        waiting = [s for s in same_topic if s.awaiting]
        target = min(waiting, key=lambda s: s.sent_at) if waiting else None
        others = [s for s in same_topic if s.nonempty and s is not target and not s.awaiting]
        if target is None and len(others) == 1:
            return others[0]
        for stream in others:
            stream.resync = True
            self._enqueue("refresh", stream)
        return target

    def _replied(self, conn: _Conn, stream: _Stream) -> None:
        stream.awaiting = False
        if conn.inflight is stream:
            conn.inflight = None
            conn.changed.set()

    def _data(
        self,
        conn: _Conn,
        stream: _Stream,
        msg: dict[str, Any],
        data: list[Any],
        text: str,
        received_at: float,
    ) -> None:
        self._replied(conn, stream)
        resync, stream.resync = stream.resync, False
        since, stream.sent_since = stream.sent_since, None
        stream.nonempty = bool(data)
        snapshot = stream.fresh
        raw_seq = msg.get("seq")
        seq = raw_seq if type(raw_seq) is int else None
        if seq is not None and stream.last_seq is not None and seq < stream.last_seq:
            if not snapshot:
                log.debug("dropping a stale %s message (seq %d)", stream.describe(), seq)
                return
            log.warning("%s: seq went back to %d (a new server?)", stream.describe(), seq)
        try:
            rows = decode_rows(stream.topic, data)
        except msgspec.ValidationError as exc:
            log.error("cannot decode a %s message (%s): %.300s", stream.topic, exc, text)
            return
        if seq is not None:
            stream.last_seq = seq
        resumed = None
        live = stream.topic in LIVE_TOPICS
        if since is not None and conn.protocol == 2:
            # The answer to "since" holds only the rows changed after it: merge them into the
            # last window, and ask for the full window too, which corrects the merge if the
            # window moved in ways the delta cannot show. A live topic's "window" is its newest
            # row, which the delta (or the last message) has: nothing to correct.
            resumed = rows
            base = stream.last.rows if stream.last is not None else ()
            rows = merge_history(stream.topic, rows, base, 1 if live else stream.window)
            if not live:
                stream.resync = True
                self._enqueue("refresh", stream)
        elif stream.topic in HISTORY_TOPICS and not live:
            stream.window = max(stream.window, len(rows))
        if not stream.subs:
            return  # a v1 leftover
        if resync and not snapshot and stream.last is not None and stream.last.rows == rows:
            return  # a re-read that changed nothing
        stream.fresh = False
        if stream.backoff is not None:
            stream.backoff.reset()
        first = stream.subs[0]
        message: Message[Any] = Message(
            stream.topic, rows, text, seq, snapshot, first, received_at, resumed
        )
        stream.last = message
        for sub in list(stream.subs):
            sub._put(message if sub is first else dataclasses.replace(message, subscription=sub))

    def _error_reply(
        self, conn: _Conn, msg: dict[str, Any], text: str, stream: _Stream | None
    ) -> None:
        if stream is not None:
            conn.protocol = 2
        elif conn.protocol != 2 and conn.inflight is not None:
            stream = conn.inflight
            if conn.protocol is None and conn.extended:
                # A strict server may object to op/id/since themselves: ask once more plainly.
                log.info("the server refused an extended request; retrying as protocol v1")
                conn.extended = False
                self._replied(conn, stream)
                conn.outbox.appendleft(("subscribe", stream))
                conn.changed.set()
                return
            conn.protocol = conn.protocol or 1
        else:
            # e.g. a rate-limit notice (its request is sent again when its reply is overdue),
            # or the answer to an unsubscribe already forgotten.
            log.info("an error from the server that no live request explains: %.300s", text)
            return
        self._replied(conn, stream)
        sentence = msg.get("error")
        sentence = sentence if isinstance(sentence, str) else text
        raw_code = msg.get("code")
        code = raw_code if isinstance(raw_code, str) else infer_code(sentence)
        if code == "since_too_old":
            # The server no longer keeps what came after our seq: take its full window instead.
            log.info("%s: %s; subscribing afresh", stream.describe(), sentence)
            stream.last_seq = None
            stream.last = None
            self._enqueue("subscribe", stream)
            return
        if code not in FATAL_CODES and stream.subs:
            if stream.backoff is None:
                stream.backoff = self.backoff.clone()
            delay = stream.backoff.next_delay()
            log.warning("%s: %s; asking again in %.1f s", stream.describe(), sentence, delay)
            stream.retry = asyncio.get_running_loop().call_later(
                delay, self._enqueue, "subscribe", stream
            )
            return
        log.info("%s refused: %s", stream.describe(), sentence)
        subs = list(stream.subs)
        self._forget(stream)
        for sub in subs:
            sub._end(SubscriptionRejected(sentence, code=code, subscription=sub, raw=text))


__all__ = [
    "AsyncMailbox",
    "Client",
    "ConnectionState",
    "Mailbox",
    "Sink",
    "StateChange",
    "Subscription",
]
