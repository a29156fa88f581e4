"""The WebSocket protocol core, sans I/O: request parsing, subscriptions, keepalive, outbox.

A :class:`Session` is one connection's state. The transport feeds it what arrived
(``receive_text``, ``receive_binary``, ``receive_pong``), asks it what to send (``take``) and
what keepalive needs (``keepalive``), and tells it the time; the session never reads a clock or
a socket. A :class:`Hub` maps each stream (topic and key) to the sessions that watch it and
hands every published message to them.

Ordering and delivery (the protocol's guarantee): a subscription is answered with the current
state, taken in the same step that registers the subscription, so every later change reaches
the subscriber after that snapshot and nothing is missed in between. Every message is a full
state (or newest-N window), so while a connection is busy writing, a newer message for the same
stream replaces a pending older one: a slow reader gets the latest state, never a stale one, and
messages of one stream never go backwards.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

import msgspec

from perps_indexer.errors import InvalidAddress
from perps_indexer.units import normalize_address
from perps_indexer.wire import (
    MARKET_TOPICS,
    OPEN_ORDERS,
    ORDER_HISTORY,
    ORDERBOOK,
    POSITIONS,
    TRADE_HISTORY,
)

Key = str | int
Stream = tuple[str, Key]

ALL_TOPICS = (POSITIONS, TRADE_HISTORY, OPEN_ORDERS, ORDER_HISTORY, ORDERBOOK)
"""Every topic, in the order error messages list them."""

# Close codes (RFC 6455 §7.4.1).
CLOSE_KEEPALIVE_TIMEOUT = 1011


class MessageSource(Protocol):
    """Where the current encoded state of a stream comes from (the projections)."""

    def message(self, topic: str, key: Key) -> bytes: ...


class RequestError(Exception):
    """A client request that cannot be served; the text is sent back to the client."""


class Subscribe(msgspec.Struct, frozen=True):
    topic: str
    key: Key


_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def error_message(text: str) -> bytes:
    """The error reply ``{"message": "error", "error": text}``."""
    return _encoder.encode({"message": "error", "error": text})


def parse_request(text: str | bytes, markets: Collection[int]) -> Subscribe:
    """Validate one client frame; raise :class:`RequestError` with a sentence for a person."""
    try:
        request = _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise RequestError(f"the message is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise RequestError(
            'a request must be a JSON object such as {"topic": "positions", "address": "0x..."}'
        )
    topic = request.get("topic")
    if topic is None:
        raise RequestError(f'the request has no "topic"; topics are {", ".join(ALL_TOPICS)}')
    if not isinstance(topic, str) or topic not in ALL_TOPICS:
        raise RequestError(f"unknown topic {topic!r}; topics are {', '.join(ALL_TOPICS)}")
    if topic in MARKET_TOPICS:
        return Subscribe(topic, parse_market_id(request.get("market_id"), markets))
    if "address" not in request:
        raise RequestError(f'topic {topic!r} needs an "address"')
    try:
        return Subscribe(topic, normalize_address(request["address"]))
    except InvalidAddress as exc:
        raise RequestError(str(exc)) from None


def parse_market_id(value: object, markets: Collection[int], field: str = "market_id") -> int:
    """A market id given as a JSON number or a decimal string, and known to the venue."""
    known = ", ".join(str(m) for m in sorted(markets))
    if value is None:
        raise RequestError(f'the request needs a "{field}"; markets are {known}')
    market: int | None = None
    if type(value) is int:
        market = value
    elif isinstance(value, str) and value.strip().isdigit():
        market = int(value.strip())
    if market is None or market not in markets:
        raise RequestError(f"unknown {field} {value!r}; markets are {known}")
    return market


class Session:
    """One connection's protocol state (no I/O)."""

    __slots__ = (
        "_error_seq",
        "close_code",
        "close_reason",
        "hub",
        "last_received",
        "markets",
        "notify",
        "outbox",
        "ping_interval",
        "ping_sent",
        "ping_timeout",
        "source",
        "subscriptions",
    )

    def __init__(
        self,
        hub: Hub,
        source: MessageSource,
        markets: Collection[int],
        *,
        now: float,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
    ) -> None:
        self.hub = hub
        self.source = source
        self.markets = markets
        self.subscriptions: set[Stream] = set()
        self.outbox: dict[object, bytes] = {}
        """Pending frames: one per stream (newest wins) plus one per error reply."""
        self.notify: Callable[[], None] | None = None
        """Called when the outbox goes from empty to non-empty (the transport's wake-up)."""
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.last_received = now
        self.ping_sent: float | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._error_seq = 0

    # -- input

    def receive_text(self, text: str | bytes, now: float) -> None:
        """A text frame arrived: subscribe, or queue an error reply."""
        self.last_received = now
        try:
            request = parse_request(text, self.markets)
        except RequestError as exc:
            self._queue_error(str(exc))
            return
        self.subscribe(request.topic, request.key)

    def receive_binary(self, now: float) -> None:
        self.last_received = now
        self._queue_error("binary frames are not supported; send JSON text frames")

    def receive_pong(self, now: float) -> None:
        self.last_received = now
        self.ping_sent = None

    def receive_ping(self, now: float) -> None:
        self.last_received = now

    def subscribe(self, topic: str, key: Key) -> None:
        """Register the stream and queue its current state, in one step (no gap, no race)."""
        stream = (topic, key)
        if stream not in self.subscriptions:
            self.subscriptions.add(stream)
            self.hub.add(self, stream)
        self.push(stream, self.source.message(topic, key))

    # -- output

    def push(self, stream: Stream, message: bytes) -> None:
        """Queue a stream's newest state; replaces a pending older one of the same stream."""
        was_empty = not self.outbox
        self.outbox[stream] = message
        if was_empty and self.notify is not None:
            self.notify()

    def _queue_error(self, text: str) -> None:
        self._error_seq += 1
        was_empty = not self.outbox
        self.outbox[("error", self._error_seq)] = error_message(text)
        if was_empty and self.notify is not None:
            self.notify()

    def take(self) -> list[bytes]:
        """Everything pending, in order; the outbox is empty afterwards."""
        if not self.outbox:
            return []
        frames = list(self.outbox.values())
        self.outbox.clear()
        return frames

    # -- keepalive

    def keepalive(self, now: float) -> str | None:
        """``"ping"`` when a ping should go out, ``"timeout"`` when the peer stopped answering."""
        if self.ping_sent is not None:
            if now - self.ping_sent >= self.ping_timeout:
                self.close_code = CLOSE_KEEPALIVE_TIMEOUT
                self.close_reason = "keepalive ping timeout"
                return "timeout"
            return None
        if now - self.last_received >= self.ping_interval:
            self.ping_sent = now
            return "ping"
        return None

    def closed(self) -> None:
        """The connection is gone: forget its subscriptions."""
        self.hub.drop(self)
        self.subscriptions.clear()
        self.outbox.clear()
        self.notify = None


class Hub:
    """Which sessions watch which stream; fans a published message out to them."""

    __slots__ = ("messages_queued", "sessions", "streams")

    def __init__(self) -> None:
        self.streams: dict[Stream, dict[Session, None]] = {}
        self.sessions: dict[Session, None] = {}
        self.messages_queued = 0

    def connect(self, session: Session) -> None:
        self.sessions[session] = None

    def add(self, session: Session, stream: Stream) -> None:
        self.streams.setdefault(stream, {})[session] = None

    def drop(self, session: Session) -> None:
        self.sessions.pop(session, None)
        for stream in session.subscriptions:
            watchers = self.streams.get(stream)
            if watchers is not None:
                watchers.pop(session, None)
                if not watchers:
                    del self.streams[stream]

    def watched(self, stream: Stream) -> bool:
        return stream in self.streams

    def publish(self, stream: Stream, message: bytes) -> int:
        """Queue ``message`` for every session watching ``stream``; returns how many."""
        watchers = self.streams.get(stream)
        if not watchers:
            return 0
        for session in watchers:
            session.push(stream, message)
        self.messages_queued += len(watchers)
        return len(watchers)

    @property
    def subscription_count(self) -> int:
        return sum(len(w) for w in self.streams.values())
