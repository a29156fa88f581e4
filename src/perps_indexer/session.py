"""The WebSocket protocol core, sans I/O: requests, subscriptions, limits, keepalive, outbox.

A :class:`Session` is one connection's state. The transport feeds it what arrived
(``receive_text``, ``receive_binary``, ``receive_pong``), asks it what to send (``take``), what
keepalive needs (``keepalive``) and whether to close (``close_code``), and tells it the time; the
session never reads a clock or a socket. A :class:`Hub` maps each stream (topic and key) to the
sessions that watch it and hands every published message to them. ``docs/protocol.md`` is the
specification this module implements.

Ordering and delivery: a subscription is answered with the current state, taken in the same step
that registers it, so every later change reaches the subscriber after that snapshot and nothing
is missed in between. Every message is a full state (or newest-N window), so while a connection
is busy writing, a newer message for a stream replaces a pending older one: a slow reader gets
the latest state, never a stale one, and the ``seq`` of one stream's messages only increases.
The exceptions: the answer to ``"since"`` (the rows changed after it, not a full state) is never
replaced, and later messages of its stream queue behind it; the live topics
(``live_trade_history``, ``live_order_history``) are event streams, each message one new row, so
none of their messages is ever replaced: a reader too slow for them is closed by the outbox bound
(1013) and resumes with ``since``. Replies (acks, errors) are never replaced either; everything
pending counts toward ``max_outbox_bytes``.

Protocol v2 is opt-in per request: ``"op"`` (subscribe or unsubscribe), a client-chosen ``"id"``
(then acks, and errors and data messages carry the id) and ``"since"`` (resume). A client that
sends only the original requests gets only the original replies, plus ``"seq"``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Protocol

import msgspec

from perps_indexer.errors import InvalidAddress
from perps_indexer.units import normalize_address
from perps_indexer.wire import (
    ALL_TOPICS,
    DEPOSIT_WITHDRAW_HISTORY,
    LIVE_ORDER_HISTORY,
    LIVE_TOPICS,
    LIVE_TRADE_HISTORY,
    MARKET_TOPICS,
    ORDER_HISTORY,
    TRADE_HISTORY,
)

Key = str | int
Stream = tuple[str, Key]
RequestId = str | int

SMALL_STREAM = 8
"""Watchers up to which a state change is pushed at once instead of in a sliced round."""

RESUMABLE_TOPICS = frozenset(
    {TRADE_HISTORY, ORDER_HISTORY, LIVE_TRADE_HISTORY, LIVE_ORDER_HISTORY, DEPOSIT_WITHDRAW_HISTORY}
)
"""Topics whose ``since`` answer is the rows changed after that seq (others: a fresh snapshot)."""

# Close codes (RFC 6455 §7.4.1).
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_KEEPALIVE_TIMEOUT = 1011
CLOSE_TRY_AGAIN_LATER = 1013

MAX_ID_LENGTH = 128
_DECIMAL = re.compile(r"[0-9]{1,20}")
"""A market id as a string: ASCII digits only (``str.isdigit`` also takes "²", which ``int``
refuses, and a long run of digits makes ``int`` raise)."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-connection limits, each published in docs/protocol.md."""

    max_subscriptions: int = 256
    """Subscriptions one connection may hold."""
    rate: float = 20.0
    """Inbound messages per second a connection may send, on average..."""
    burst: int = 50
    """...with bursts up to this many. A client that keeps exceeding the rate is closed."""
    max_outbox_bytes: int = 8 * 1024 * 1024
    """Bytes waiting for a slow reader (data after coalescing, and replies) before it is closed
    with 1013."""
    ping_interval: float = 20.0
    ping_timeout: float = 20.0


class Sink(Protocol):
    """A connection's byte stream, as the transport lends it to the fan-out (an asyncio
    transport has this shape): frames written to it go out in order, after what it holds."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def is_closing(self) -> bool: ...


class MessageSource(Protocol):
    """Where the current encoded state of a stream comes from (the projections)."""

    def message(self, topic: str, key: Key) -> bytes: ...

    def resume(self, topic: str, key: Key, since: int) -> bytes:
        """The rows of a history stream changed after ``since``, as one data message; raises
        :class:`RequestError` when ``since`` is older than what is kept."""
        ...


class RequestError(Exception):
    """A request that cannot be served: ``code`` is stable, the text is for a person."""

    def __init__(self, code: str, text: str, request_id: RequestId | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.request_id = request_id


class Request(msgspec.Struct, frozen=True):
    op: str
    topic: str
    key: Key
    id: RequestId | None = None
    since: int | None = None


_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def error_message(text: str, request_id: RequestId | None = None, code: str = "") -> bytes:
    """The error reply: ``{"message": "error", "error": text}``, plus ``"id"`` and ``"code"``
    when the request carried an id (v2)."""
    if request_id is None:
        return _encoder.encode({"message": "error", "error": text})
    return _encoder.encode({"message": "error", "error": text, "id": request_id, "code": code})


def _request_id(request: dict[str, object]) -> RequestId | None:
    if "id" not in request:
        return None
    value = request["id"]
    if type(value) is int or (isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH):
        return value
    raise RequestError(
        "invalid_id", f'"id" must be an integer or a string of 1 to {MAX_ID_LENGTH} characters'
    )


def parse_request(text: str | bytes, markets: Collection[int]) -> Request:
    """Validate one client frame; raise :class:`RequestError` with a sentence for a person."""
    try:
        request = _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise RequestError("invalid_json", f"the message is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError("invalid_json", "the message is nested too deeply") from None
    except UnicodeEncodeError:  # a str holding lone surrogates (never from a socket)
        raise RequestError("invalid_json", "the message is not valid UTF-8") from None
    if not isinstance(request, dict):
        raise RequestError(
            "invalid_request",
            'a request must be a JSON object such as {"topic": "positions", "address": "0x..."}',
        )
    request_id = _request_id(request)
    try:
        return _parse_fields(request, markets, request_id)
    except RequestError as exc:
        exc.request_id = request_id
        raise


def _parse_fields(
    request: dict[str, object], markets: Collection[int], request_id: RequestId | None
) -> Request:
    op = request.get("op", "subscribe")
    if op not in ("subscribe", "unsubscribe"):
        raise RequestError("invalid_op", f'unknown op {op!r}; use "subscribe" or "unsubscribe"')
    topic = request.get("topic")
    if topic is None:
        raise RequestError(
            "invalid_request", f'the request has no "topic"; topics are {", ".join(ALL_TOPICS)}'
        )
    if not isinstance(topic, str) or topic not in ALL_TOPICS:
        raise RequestError(
            "unknown_topic", f"unknown topic {topic!r}; topics are {', '.join(ALL_TOPICS)}"
        )
    since = request.get("since")
    if since is not None and (type(since) is not int or since < 0):
        raise RequestError(
            "invalid_since", f'"since" must be a non-negative integer seq, got {since!r}'
        )
    key: Key
    if topic in MARKET_TOPICS:
        key = parse_market_id(request.get("market_id"), markets)
    elif "address" not in request:
        raise RequestError("invalid_address", f'topic {topic!r} needs an "address"')
    else:
        try:
            key = normalize_address(request["address"])
        except InvalidAddress as exc:
            raise RequestError("invalid_address", str(exc)) from None
    return Request(str(op), topic, key, request_id, since)


def parse_market_id(value: object, markets: Collection[int], field: str = "market_id") -> int:
    """A market id given as a JSON number or a decimal string, and known to the venue."""
    market: int | None = None
    if type(value) is int:
        market = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        market = int(value.strip())
    if market is not None and market in markets:
        return market
    # Only now: every order names its market, and the list is for the error alone.
    known = ", ".join(str(m) for m in sorted(markets))
    if value is None:
        raise RequestError("unknown_market", f'the request needs a "{field}"; markets are {known}')
    raise RequestError("unknown_market", f"unknown {field} {value!r}; markets are {known}")


def _ack(message: str, request_id: RequestId, topic: str, key: Key) -> bytes:
    """``{"message": "subscribed" | "unsubscribed", "id": ..., "topic": ..., <key field>}``."""
    if topic in MARKET_TOPICS:
        return _encoder.encode(
            {"message": message, "id": request_id, "topic": topic, "market_id": str(key)}
        )
    return _encoder.encode({"message": message, "id": request_id, "topic": topic, "address": key})


def _with_id(message: bytes, request_id: RequestId) -> bytes:
    """Append ``"id"`` to an encoded data message (a byte splice: no re-encoding per subscriber)."""
    return b'%b,"id":%b}' % (message[:-1], _encoder.encode(request_id))


class Session:
    """One connection's protocol state (no I/O)."""

    __slots__ = (
        "_live",
        "_replies",
        "_strikes",
        "_tokens",
        "_updated",
        "close_code",
        "close_reason",
        "fd",
        "hub",
        "last_received",
        "limits",
        "markets",
        "notify",
        "outbox",
        "outbox_bytes",
        "ping_sent",
        "sink",
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
        limits: Limits | None = None,
    ) -> None:
        self.hub = hub
        self.source = source
        self.markets = markets
        self.limits = limits if limits is not None else Limits()
        self.subscriptions: dict[Stream, RequestId | None] = {}
        """Stream -> the id it was subscribed with (None: an original, v1 subscription)."""
        self.outbox: dict[object, bytes] = {}
        """Pending frames: one per stream (newest wins) plus one per reply."""
        self.outbox_bytes = 0
        self.sink: Sink | None = None
        """The fast path, set by the transport while nothing of its own is in flight: a data
        message with nothing queued ahead of it is framed (:attr:`Hub.frame_header`) and written
        straight to it if it holds at most :attr:`Hub.write_limit` bytes; else the message
        goes through the outbox and the transport's writer."""
        self.fd = -1
        """The connection's socket as :attr:`Hub.write_each` knows it (the transport sets it),
        or -1: the fast path then writes to :attr:`sink` itself."""
        self.notify: Callable[[], None] | None = None
        """Called when the outbox goes from empty to non-empty (the transport's wake-up)."""
        self.last_received = now
        self.ping_sent: float | None = None
        self.close_code: int | None = None
        """Set when the session wants the connection closed (with ``close_reason``)."""
        self.close_reason = ""
        self._replies = 0
        self._live = 0
        self._tokens = float(self.limits.burst)
        self._updated = now
        self._strikes = 0

    # -- input

    def receive_text(self, text: str | bytes, now: float) -> None:
        """A text frame arrived: subscribe, unsubscribe, or queue an error reply."""
        if not self._admit(now):
            return
        try:
            request = parse_request(text, self.markets)
        except RequestError as exc:
            self._queue(error_message(exc.text, exc.request_id, exc.code))
            return
        try:
            if request.op == "unsubscribe":
                self.unsubscribe(request)
            else:
                self.subscribe(request.topic, request.key, request.id, request.since)
        except RequestError as exc:  # raised without the id: the request has it
            self._queue(error_message(exc.text, request.id, exc.code))

    def receive_binary(self, now: float) -> None:
        if self._admit(now):
            self._queue(error_message("binary frames are not supported; send JSON text frames"))

    def receive_pong(self, now: float) -> None:
        self.last_received = now
        self.ping_sent = None

    def receive_ping(self, now: float) -> None:
        self.last_received = now

    def _admit(self, now: float) -> bool:
        """Token bucket: ``rate`` per second, ``burst`` deep. A refused message gets one error
        per run of refusals; a client refused more than ``burst`` times in a row is closed."""
        self.last_received = now
        limits = self.limits
        self._tokens = min(limits.burst, self._tokens + (now - self._updated) * limits.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            self._strikes = 0
            return True
        self._strikes += 1
        if self._strikes == 1:
            self._queue(
                error_message(
                    f"rate limit: at most {limits.rate:g} messages per second, in bursts of up "
                    f"to {limits.burst} (rate = {limits.rate:g}, burst = {limits.burst}); this "
                    "message was dropped",
                )
            )
        elif self._strikes > limits.burst:
            self._close(
                CLOSE_POLICY_VIOLATION,
                f"inbound rate limit of {limits.rate:g}/s exceeded repeatedly",
            )
        return False

    def subscribe(
        self, topic: str, key: Key, request_id: RequestId | None = None, since: int | None = None
    ) -> None:
        """Register the stream and queue its current state, in one step (no gap, no race)."""
        stream = (topic, key)
        if stream not in self.subscriptions and (
            len(self.subscriptions) >= self.limits.max_subscriptions
        ):
            raise RequestError(
                "too_many_subscriptions",
                f"this connection holds {len(self.subscriptions)} subscriptions, the limit "
                f"(max_subscriptions = {self.limits.max_subscriptions}); unsubscribe first",
            )
        resuming = since is not None and topic in RESUMABLE_TOPICS
        first = (
            self.source.resume(topic, key, since)
            if resuming and since is not None
            else self.source.message(topic, key)
        )
        if stream not in self.subscriptions:
            self.hub.add(self, stream)
        elif self.subscriptions[stream] != request_id:
            self.hub.membership += 1  # the same watcher, another id: rounds must see it
        self.subscriptions[stream] = request_id
        self._drop_pending(stream)  # the ack must go before this stream's data
        if request_id is not None:
            self._queue(_ack("subscribed", request_id, topic, key))
        if resuming:
            # The rows changed after "since" are not a full state: a later push of the stream
            # must not replace them, so they wait under a key of their own, ahead of it.
            self._put(
                ("resume", stream),
                _with_id(first, request_id) if request_id is not None else first,
            )
        else:
            self.push(stream, first)

    def unsubscribe(self, request: Request) -> None:
        stream = (request.topic, request.key)
        if stream not in self.subscriptions:
            raise RequestError(
                "not_subscribed",
                f"not subscribed to {request.topic} for {request.key!r}",
            )
        del self.subscriptions[stream]
        self.hub.remove(self, stream)
        self._drop_pending(stream)
        if request.topic in LIVE_TOPICS:
            for key in [k for k in self.outbox if type(k) is tuple and k[:2] == ("live", stream)]:
                self.outbox_bytes -= len(self.outbox.pop(key))
        if request.id is not None:
            self._queue(_ack("unsubscribed", request.id, request.topic, request.key))

    def _drop_pending(self, stream: Stream) -> None:
        for key in (stream, ("resume", stream)):
            dropped = self.outbox.pop(key, None)
            if dropped is not None:
                self.outbox_bytes -= len(dropped)

    # -- output

    def push(self, stream: Stream, message: bytes) -> None:
        """Queue a stream's newest state; replaces a pending older one of the same stream.
        A live topic's message is an event: it is queued after the pending ones, never
        replacing any."""
        request_id = self.subscriptions.get(stream)
        if request_id is not None:
            message = _with_id(message, request_id)
        sink = self.sink
        if sink is not None and not self.outbox and self.hub.write_now(sink, message):
            return  # nothing pending and the transport took it at once: no queue, no wake-up
        if stream[0] in LIVE_TOPICS:
            self._live += 1
            self._put(("live", stream, self._live), message)
        else:
            self._put(stream, message)

    def _queue(self, frame: bytes) -> None:
        """Queue a reply (never replaced)."""
        self._replies += 1
        self._put(("reply", self._replies), frame)

    def _put(self, key: object, frame: bytes) -> None:
        """Queue ``frame`` under ``key`` (replacing a pending one), within the outbox bound."""
        if self.close_code is not None:
            return  # closing: nothing more will be sent, so nothing more is kept
        outbox = self.outbox
        was_empty = not outbox
        old = outbox.get(key)
        outbox[key] = frame
        self.outbox_bytes += len(frame) - (len(old) if old is not None else 0)
        if self.outbox_bytes > self.limits.max_outbox_bytes:
            self.slow(
                "reading too slowly: the outbound buffer is full; reconnect and resume with since"
            )
        elif was_empty and self.notify is not None:
            self.notify()

    def take(self) -> list[bytes]:
        """Everything pending, in order; the outbox is empty afterwards."""
        if not self.outbox:
            return []
        frames = list(self.outbox.values())
        self.outbox.clear()
        self.outbox_bytes = 0
        return frames

    def _close(self, code: int, reason: str) -> None:
        self.sink = None  # closing: everything goes through the writer, which ends with the close
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            if self.notify is not None:
                self.notify()

    def slow(self, reason: str) -> None:
        """This reader is too slow (the outbox overflowed, or the transport says a send waited
        too long): drop what is pending, it will not be sent, and close with 1013."""
        if self.close_code is None:
            self.outbox.clear()
            self.outbox_bytes = 0
        self._close(CLOSE_TRY_AGAIN_LATER, reason)

    # -- keepalive

    def keepalive(self, now: float) -> str | None:
        """``"ping"`` when a ping should go out, ``"timeout"`` when the peer stopped answering."""
        if self.ping_sent is not None:
            if now - self.ping_sent >= self.limits.ping_timeout:
                self._close(CLOSE_KEEPALIVE_TIMEOUT, "keepalive ping timeout")
                return "timeout"
            return None
        if now - self.last_received >= self.limits.ping_interval:
            self.ping_sent = now
            return "ping"
        return None

    def closed(self) -> None:
        """The connection is gone: forget its subscriptions."""
        self.hub.drop(self)
        self.subscriptions.clear()
        self.outbox.clear()
        self.outbox_bytes = 0
        self.notify = None
        self.sink = None
        self.fd = -1


class Hub:
    """Which sessions watch which stream; fans a published message out to them."""

    __slots__ = (
        "_frame",
        "_framed",
        "_held",
        "_orders",
        "_rounds",
        "_turns",
        "direct_writes",
        "frame_header",
        "live_streams",
        "membership",
        "messages_queued",
        "sessions",
        "sliced",
        "small_stream",
        "streams",
        "wake",
        "write_each",
        "write_limit",
    )

    def __init__(self) -> None:
        self.streams: dict[Stream, dict[Session, None]] = {}
        self.sessions: dict[Session, None] = {}
        self.live_streams = 0
        """How many live-topic streams have watchers: with none, a batch's live rows are not
        even looked up (each would be a miss in :attr:`streams`)."""
        self.messages_queued = 0
        """Pushes handed to sessions (written at once or queued)."""
        self.membership = 0
        """Bumped by every subscribe and unsubscribe: a round renewed with the same count
        keeps its list of watchers instead of copying the stream's again."""
        self.direct_writes = 0
        """Of those, the messages written straight to a session's :attr:`Session.sink`."""
        self.sliced = False
        """When True, :meth:`publish_state` defers the fan-out to :meth:`drain`, which the
        transport calls in slices so that a round of pushes never holds the loop for long."""
        self.wake: Callable[[], None] | None = None
        """Called when deferred pushes are waiting for :meth:`drain`."""
        self.frame_header: Callable[[int], bytes] | None = None
        """The transport's frame header for a message of so many bytes; the fast path is off
        while it is None. Server frames are unmasked (RFC 6455 §5.1), so one frame serves
        every subscriber of a fan-out (:meth:`frame`); the frames :meth:`hold` collects for
        one connection are kept as header and message and joined once at :meth:`release`
        (each is for that connection alone: building it whole first would copy the message
        once more)."""
        self.write_limit = 0
        """Bytes a sink may hold for the fast path to add to it (a reader falling behind gets
        its messages coalesced in the outbox instead)."""
        self.write_each: Callable[[list[int], list[Sink], bytes], None] | None = None
        """Writes one frame to many connections in one call (the transport's batch writer):
        a fan-out round gives it the sockets (:attr:`Session.fd`) of the sinks that hold
        nothing unsent, and those sinks, for what a socket does not take. None: one write
        each."""
        self.small_stream = SMALL_STREAM
        """Watchers up to which a sliced state change is pushed at once."""
        self._rounds: dict[Stream, _Round] = {}
        self._orders: dict[Stream, tuple[int, list[tuple[Session, bool]]]] = {}
        """Each sliced stream's last round order and the :attr:`membership` it was taken at:
        the next round of a stream nobody (un)subscribed from meanwhile starts from it."""
        self._turns: deque[Stream] = deque()  # the streams of _rounds, in the order they run
        self._framed: bytes | None = None  # one-entry cache: the last message and its frame
        self._frame = b""
        self._held: dict[Sink, list[bytes]] | None = None  # see hold()

    def frame(self, message: bytes) -> bytes:
        """``message``'s frame, built once however many sinks it is written to."""
        if message is not self._framed:
            assert self.frame_header is not None
            self._frame = self.frame_header(len(message)) + message
            self._framed = message
        return self._frame

    def write_now(self, sink: Sink, message: bytes) -> bool:
        """Write ``message`` to ``sink`` if the fast path is on and the sink keeps up (while
        :meth:`hold` is in effect, the frame waits for :meth:`release`)."""
        header = self.frame_header
        if header is None:
            return False
        held = self._held
        if held is not None:
            frames = held.get(sink)
            if frames is not None:
                # The sink passed the checks below for its first frame of this hold, and
                # nothing was written to it since: a batch's pushes to one connection are
                # checked once.
                frames += (header(len(message)), message)
                return True
        if sink.is_closing() or sink.get_write_buffer_size() > self.write_limit:
            return False
        if held is None:
            sink.write(self.frame(message))
            self.direct_writes += 1
        else:
            held[sink] = [header(len(message)), message]  # counted when written
        return True

    def hold(self) -> None:
        """Collect the direct writes from now until :meth:`release`, per sink.

        One command changes several streams of the same connection (an address's positions,
        open orders, order and trade history): held, they leave in one write, one system call
        and one wake-up of the reader instead of one each. The bytes and their order are the
        same. Nothing else may write to a held sink meanwhile; the venue holds only while it
        publishes one batch, which runs without yielding to the event loop."""
        if self._held is None:
            self._held = {}

    def release(self) -> None:
        """Write what :meth:`hold` collected: each sink's frames in one write, in order."""
        held, self._held = self._held, None
        if not held:
            return
        for sink, frames in held.items():
            if sink.is_closing():
                continue  # the connection went away meanwhile; its writer forgets it
            sink.write(b"".join(frames))
            self.direct_writes += len(frames) // 2  # a header and a message each

    def connect(self, session: Session) -> None:
        self.sessions[session] = None

    def add(self, session: Session, stream: Stream) -> None:
        watchers = self.streams.get(stream)
        if watchers is None:
            watchers = self.streams[stream] = {}
            if stream[0] in LIVE_TOPICS:
                self.live_streams += 1
        watchers[session] = None
        self.membership += 1  # the stream's remembered order is out of date now

    def remove(self, session: Session, stream: Stream) -> None:
        watchers = self.streams.get(stream)
        if watchers is not None:
            watchers.pop(session, None)
            self.membership += 1
            self._orders.pop(stream, None)  # it must not keep a session that has gone
            if not watchers:
                del self.streams[stream]
                if stream[0] in LIVE_TOPICS:
                    self.live_streams -= 1
                # Nobody is owed its round now, and while nobody watches, changes are not
                # published: a round kept would give a newcomer an older state after the
                # newest, which its subscription brought.
                if self._rounds.pop(stream, None) is not None:
                    self._turns.remove(stream)

    def drop(self, session: Session) -> None:
        self.sessions.pop(session, None)
        for stream in session.subscriptions:
            self.remove(session, stream)

    def watched(self, stream: Stream) -> bool:
        return stream in self.streams

    def watchers(self, stream: Stream) -> dict[Session, None] | None:
        """The sessions watching ``stream`` (None or empty: nobody), for
        :meth:`publish_state`, so that a publisher that builds the message only for a watched
        stream looks the stream up once (the map holds every subscribed stream: most lookups
        in it miss the CPU's caches)."""
        return self.streams.get(stream)

    def publish(self, stream: Stream, message: bytes) -> int:
        """Queue ``message`` for every session watching ``stream``; returns how many."""
        watchers = self.streams.get(stream)
        return self._publish(stream, message, watchers) if watchers else 0

    def _publish(self, stream: Stream, message: bytes, watchers: dict[Session, None]) -> int:
        for session in watchers:
            session.push(stream, message)
        self.messages_queued += len(watchers)
        return len(watchers)

    def publish_state(
        self, stream: Stream, message: bytes, watchers: dict[Session, None] | None = None
    ) -> None:
        """Publish a stream's newest state: at once, or (``sliced``) in rounds that give every
        watcher the newest state at its turn, each watcher at most once per round.
        ``watchers``: what :meth:`watchers` just gave for the stream, if the caller has it.

        A stream with at most :attr:`small_stream` watchers and no round in progress is
        pushed at once even when sliced: a round would cost more than the pushes."""
        if watchers is None:
            watchers = self.streams.get(stream)
        if not watchers:
            return
        pending = self._rounds.get(stream)
        if pending is not None:
            pending.renew(message, self)  # at once would overtake it
        elif not self.sliced or len(watchers) <= self.small_stream:
            self._publish(stream, message, watchers)  # the stream is looked up once
            return
        else:
            self._rounds[stream] = _Round(message, self, stream)
            self._turns.append(stream)
        if self.wake is not None:
            self.wake()

    def drain(self, budget: int) -> bool:
        """Make up to ``budget`` deferred pushes; True while more are waiting.

        Streams take turns: one whose round is not finished goes behind the others, so a
        stream that never stops changing (a busy order book) cannot starve the rest."""
        rounds, turns = self._rounds, self._turns
        done = 0
        while turns and done < budget:
            stream = turns.popleft()
            pending = rounds[stream]
            done += pending.run(self, stream, budget - done)
            if pending.finished:
                del rounds[stream]
            else:
                turns.append(stream)
        self.messages_queued += done
        return bool(turns)

    @property
    def subscription_count(self) -> int:
        return sum(len(w) for w in self.streams.values())


class SliceSizer:
    """How many pushes a slice of a fan-out makes, so that the slice lasts about ``target``
    seconds before other work (new orders) gets a turn of the event loop.

    What a push costs is mostly the host's: a loopback send took 5-7 us on one of this
    project's machines and about 3 us on another, so a fixed count of pushes held the loop
    twice as long on one as on the other. On the faster, slices of 100 let the order flow take
    about 40 % of the core and the fan-out at 1,000 subscribers fell to 0.6 of a bare
    broadcast loop; slices of 1.5 ms (about 450 pushes there) kept it at 0.9, with freshness
    no worse (BENCHMARKS.md, "The fan-out's slice in time"). The cost is learned from the
    slices themselves (:meth:`observe`), so the sizer reads no clock; with ``target`` 0 every
    slice makes ``least`` pushes."""

    __slots__ = ("cost", "least", "target")

    WEIGHT = 0.25
    """How much one slice moves the learned cost (an exponentially weighted mean)."""
    SAMPLE = 16
    """Slices of fewer pushes (a round's tail) teach nothing: their fixed costs dominate."""
    MOST = 4096
    """The most pushes a slice makes, however cheap they were measured."""

    def __init__(self, least: int, target: float) -> None:
        self.least = least
        """The pushes of the first slice, and the fewest any slice makes."""
        self.target = target
        """Seconds a slice should last (0: every slice makes :attr:`least` pushes)."""
        self.cost: float | None = None
        """Seconds a push has cost, by the recent slices (None until one is observed)."""

    @property
    def budget(self) -> int:
        """Pushes for the next slice."""
        cost = self.cost
        if not self.target or not cost:
            return self.least
        return max(self.least, int(min(self.MOST, self.target / cost)))  # no int(inf)

    def observe(self, pushes: int, seconds: float) -> None:
        """A slice made ``pushes`` pushes in ``seconds``."""
        if pushes < self.SAMPLE or seconds <= 0:
            return
        cost = seconds / pushes
        self.cost = cost if self.cost is None else self.cost + self.WEIGHT * (cost - self.cost)


class _Round:
    """The deferred fan-out of one stream: its newest message and who still has to get it.

    The watchers are served in a cycle. A newer message restarts the count from wherever the
    cycle stands: everyone gets the message current at their turn (always the newest), at most
    once per cycle, and a stream that changes faster than a cycle completes still reaches every
    watcher, in turn. Renewing costs the same whatever the number of watchers.

    Who watches is taken from the hub when the round starts and again whenever the hub's
    :attr:`Hub.membership` has moved (a subscribe, an unsubscribe, a session gone), with each
    watcher's kind of subscription: a slice then asks a watcher nothing about its
    subscriptions."""

    __slots__ = ("cursor", "membership", "message", "order", "remaining", "stream")

    def __init__(self, message: bytes, hub: Hub, stream: Stream) -> None:
        self.message = message
        self.stream = stream
        taken = hub._orders.get(stream)
        if taken is not None and taken[0] == hub.membership:
            self.order = taken[1]  # never changed in place: a change makes a new list
        else:
            self.order = self._entries(hub.streams.get(stream, {}))
            hub._orders[stream] = (hub.membership, self.order)
        """The watchers, each with True for an original (v1) subscription: no request id to
        splice into its pushes, so the shared frame serves it."""
        self.membership = hub.membership
        self.cursor = 0
        self.remaining = len(self.order)

    def _entries(self, sessions: Iterable[Session]) -> list[tuple[Session, bool]]:
        stream = self.stream
        return [(s, s.subscriptions.get(stream, 0) is None) for s in sessions]

    def _refresh(self, hub: Hub) -> None:
        """Take who watches now, if that may have changed, keeping the cycle: those still owed
        the message come first, in their order, then those already served, then newcomers
        (whose subscription brought them the current state)."""
        if hub.membership == self.membership:
            return
        watchers = hub.streams.get(self.stream, {})
        cursor = self.cursor
        cycle = [s for s, _ in self.order[cursor:]] + [s for s, _ in self.order[:cursor]]
        owed = [s for s in cycle[: self.remaining] if s in watchers]
        served = [s for s in cycle[self.remaining :] if s in watchers]
        known = set(cycle)
        self.order = self._entries([*owed, *served, *(s for s in watchers if s not in known)])
        self.cursor = 0
        self.remaining = len(owed)
        self.membership = hub.membership

    def renew(self, message: bytes, hub: Hub) -> None:
        self.message = message
        self._refresh(hub)
        self.remaining = len(self.order)  # the cycle goes on from the cursor

    @property
    def finished(self) -> bool:
        return self.remaining <= 0

    def run(self, hub: Hub, stream: Stream, budget: int) -> int:
        self._refresh(hub)  # before the count: who left meanwhile gets nothing
        order, message = self.order, self.message
        start = self.cursor
        count = min(budget, self.remaining)
        turn = order[start : start + count]
        if len(turn) < count:
            turn += order[: count - len(turn)]  # wrap around
        # The hot loop of a fan-out: a v1 watcher with a sink and nothing queued gets the
        # shared frame written straight away (with write_each, in one call for the slice, if
        # its sink holds nothing unsent and the writer knows its socket); everyone else goes
        # through push() and the outbox. These are push()'s and write_now()'s checks inlined:
        # two calls per watcher would be most of the Python work left beside the send.
        wrote = 0  # one at a time
        fds: list[int] = []  # for write_each: sockets holding nothing unsent, and their sinks
        sinks: list[Sink] = []
        if hub.frame_header is None:
            turn = [(session, False) for session, _ in turn]  # no frames: all through push()
            frame = b""
        else:
            frame = hub.frame(message)
        limit = hub.write_limit
        batching = hub.write_each is not None
        for session, plain in turn:
            sink = session.sink
            if plain and sink is not None and not session.outbox and not sink.is_closing():
                buffered = sink.get_write_buffer_size()
                if buffered == 0 and batching and session.fd >= 0:
                    fds.append(session.fd)
                    sinks.append(sink)
                    continue
                if buffered <= limit:
                    sink.write(frame)
                    wrote += 1
                    continue
            if stream in session.subscriptions:  # not if it has just been closed
                session.push(stream, message)
        if fds:
            assert hub.write_each is not None
            hub.write_each(fds, sinks, frame)
        hub.direct_writes += wrote + len(fds)
        self.remaining -= count
        self.cursor = (start + count) % len(order) if order else 0
        return count
