"""The REST lane: plain HTTP/1.1 REST requests, answered without aiohttp.

Every connection to the server starts here. A request the lane takes is a plain one: HTTP/1.1,
a ``GET`` of a read path (with a query or not, no body) or a ``POST`` to a write path with a
``Content-Length`` body of at most ``max_body`` bytes; no ``Transfer-Encoding``, ``Expect`` or
``Upgrade``, and a head of clean CRLF-separated lines (RFC 9112 §2-§6). A read is answered at
once (after the writes before it on the connection are answered, as aiohttp would); a write is
submitted and answered once durable. Replies leave in the order of the requests, as many as the
client pipelines.

The first request that is anything else (a WebSocket upgrade, ``/health``, a ``HEAD``, a
request the lane does not fully understand) hands the connection, with every byte not yet
answered, to aiohttp's protocol for good: aiohttp then answers it exactly as when it owns the
connection from the start, including every error of HTTP itself. The lane calls the same
handlers (:class:`~perps_indexer.server.rest.RestApi`) and answers what aiohttp answers, except
that its replies carry no ``Server`` field.

Why: aiohttp's machinery per request (its request and response objects, a task per request on
Python 3.11, the router and the middlewares) costs about as much as everything the venue does
for an order: a deposit costs the server 197 µs through aiohttp and 102 µs through the lane
(``bench/http_cost.py``), and every order taken while the fan-out runs takes the core from it
(BENCHMARKS.md, issue 7).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Collection
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, NamedTuple, cast

from aiohttp import http_parser
from yarl import URL

from perps_indexer import commands
from perps_indexer.server.rest import REFUSED, Parser, Read, RestApi, fail_body, refusal

log = logging.getLogger(__name__)

MAX_HEAD: Final = 8_190
"""Bytes of a request head the lane reads before it leaves the request to aiohttp (aiohttp's
own limit for a line; aiohttp then answers a head that is too large)."""

MAX_QUEUE: Final = 64
"""Replies a connection may have outstanding before the lane stops reading from it."""

MAX_FIELDS: Final = 128
"""Field lines in a head, at most (aiohttp's limit: it refuses more)."""

HEADS: Final = 1_024
"""Heads :meth:`Routes.head` remembers, at most."""

TURN: Final = 8
"""Requests of one connection answered in one turn of the event loop: a client pipelining
thousands must not hold the loop (the rest wait for the next turn)."""

# Field lines (RFC 9112 §5): a token, a colon, then HTAB, SP, visible characters or obs-text,
# each line ending in CRLF. No folding (a line starting with whitespace), no other control.
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# A query as aiohttp's router would take it: visible ASCII, no fragment (RFC 9112 §3.2.1).
_QUERY = re.compile(rb"[!-\x22$-~]*")
# Fields the lane reads, or hands over at: framing and encodings it does not do (aiohttp
# decodes a Content-Encoding, llhttp takes Proxy-Connection as Connection, aiohttp refuses
# Sec-WebSocket-Key1).
_INTERPRETED = frozenset(
    (
        b"host",
        b"content-length",
        b"x-api-key",
        b"connection",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"content-encoding",
        b"proxy-connection",
        b"sec-websocket-key1",
    )
)
# Fields a head may hold once: those aiohttp refuses to see twice
# (aiohttp.http_parser.SINGLETON_HEADERS), and the API key, which the lane does not choose from.
_ONCE = frozenset(
    name.encode() for name in getattr(http_parser, "SINGLETON_HEADERS", ("host", "content-length"))
) | {b"x-api-key"}


class Head(NamedTuple):
    """A request head the lane takes."""

    method: bytes
    """``GET`` (a read) or ``POST`` (a write)."""
    path: bytes
    query: bytes
    """A read's query string (after ``?``), or empty."""
    body_start: int
    """Offset of the body in the buffer the head was parsed from."""
    length: int
    """The body's length (``Content-Length``)."""
    api_key: bytes
    """The ``x-api-key`` field's value, or empty."""
    close: bool
    """The client asked to close the connection after the reply (``Connection: close``)."""


class Handover:
    """:func:`parse_head`'s answer for a request the lane leaves to aiohttp."""


HANDOVER: Final = Handover()


def parse_head(
    buffer: bytes | bytearray,
    writes: Collection[bytes],
    max_body: int,
    reads: Collection[bytes] = (),
) -> Head | Handover | None:
    """The head at the start of ``buffer``: a :class:`Head` the lane takes, :data:`HANDOVER`
    for any other request, or None while the head is incomplete.

    The lane takes a ``POST`` to a path of ``writes`` with a body of ``Content-Length`` (at
    most ``max_body``) and a ``GET`` of a path of ``reads``, with a query or not, and no body.

    Pure and strict: a field the lane would have to interpret in any way but the plain one
    (repeated, folded, with control characters or a bare LF) is a handover, never an error:
    aiohttp decides what to answer."""
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end < 0:
        scanned = min(len(buffer), MAX_HEAD + 4)
        if buffer.count(b"\n", 0, scanned) != buffer.count(b"\r\n", 0, scanned):
            return HANDOVER  # a bare LF: leave the framing to aiohttp's parser
        return HANDOVER if len(buffer) > MAX_HEAD else None
    first = buffer.find(b"\r\n")
    line = bytes(buffer[:first])
    if line[-9:] != b" HTTP/1.1":
        return HANDOVER
    query = b""
    if line[:5] == b"POST ":
        method, path = b"POST", line[5:-9]
        if path not in writes:
            return HANDOVER  # also any bare LF or CR in the request line
    elif line[:4] == b"GET ":
        method, path = b"GET", line[4:-9]
        path, _, query = path.partition(b"?")
        if path not in reads or not _QUERY.fullmatch(query):
            return HANDOVER
    else:
        return HANDOVER
    fields = bytes(buffer[first + 2 : end + 2])
    if not _FIELDS.fullmatch(fields):
        return HANDOVER  # a bad name, a fold, a control character, a bare LF or CR
    lines = fields.split(b"\r\n")[:-1]
    if len(lines) > MAX_FIELDS:
        return HANDOVER
    length = -1
    api_key = b""
    close = False
    seen: set[bytes] = set()
    for field in lines:
        name, _, value = field.partition(b":")
        name = name.lower()
        if name in _ONCE:
            if name in seen:
                return HANDOVER
            seen.add(name)
        if name not in _INTERPRETED:
            continue
        value = value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 10:
                return HANDOVER
            length = int(value)
        elif name == b"x-api-key":
            api_key = value
        elif name == b"connection":
            tokens = {token.strip(b" \t").lower() for token in value.split(b",")}
            if b"upgrade" in tokens:
                return HANDOVER
            close = close or b"close" in tokens
        elif name != b"host":  # transfer-encoding, expect, upgrade, content-encoding, ...
            return HANDOVER
    if b"host" not in seen:
        return HANDOVER  # HTTP/1.1 requires it; aiohttp refuses a request without one
    if method == b"GET":
        if length > 0:
            return HANDOVER  # a read with a body: aiohttp's to judge
        length = 0
    elif length < 0 or length > max_body:
        return HANDOVER
    return Head(method, path, query, end + 4, length, api_key, close)


_date_second = -1
_date = b""


def http_date() -> bytes:
    """The ``Date`` field's value, formatted once a second (RFC 9110 §6.6.1)."""
    global _date_second, _date
    now = int(time.time())
    if now != _date_second:
        _date_second, _date = now, formatdate(now, usegmt=True).encode()
    return _date


@functools.cache
def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())


def response(status: int, body: bytes, close: bool, cors: bool = False) -> bytes:
    """An HTTP/1.1 reply carrying a JSON body (``cors``: readable from any origin, as the
    reads are)."""
    return b"".join(
        (
            _status_line(status),
            b"Content-Type: application/json\r\n",
            b"Access-Control-Allow-Origin: *\r\n" if cors else b"",
            b"Content-Length: %d\r\n" % len(body),
            b"Date: " + http_date() + b"\r\n",
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )


class _Reply:
    """A reply in a connection's queue: ready (``data``), or waiting for its command to be
    durable (None)."""

    __slots__ = ("close", "data")

    def __init__(self, data: bytes | None, close: bool) -> None:
        self.data = data
        self.close = close


class Routes(NamedTuple):
    """What the lane serves, made once per server: the write and read paths (as bytes), the
    handlers of ``api`` for them (no writes without an API key, as on aiohttp's router), the
    largest body it takes, and the heads it has parsed."""

    api: RestApi
    writes: dict[bytes, Parser]
    reads: dict[bytes, Read]
    max_body: int
    heads: dict[bytes, Head]
    """The heads taken so far, by their bytes (at most :data:`HEADS`): see :meth:`head`."""

    @classmethod
    def of(cls, api: RestApi, max_body: int) -> Routes:
        writes = api.writes if api.api_key is not None else {}
        return cls(
            api,
            {path.encode(): parse for path, parse in writes.items()},
            {path.encode(): read for path, read in api.reads.items()},
            max_body,
            {},
        )

    def head(self, buffer: bytearray) -> Head | Handover | None:
        """:func:`parse_head` of ``buffer`` for these routes, remembered.

        A client sends the same head again and again (its path, its fields, often the same
        length), and parsing one costs about as much as the rest of a read: a head seen
        before is looked up by its bytes instead. :func:`parse_head` is a function of those
        bytes alone (for given routes), so the answer is the same."""
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            return parse_head(buffer, self.writes, self.max_body, self.reads)
        key = bytes(buffer[: end + 4])
        heads = self.heads
        head = heads.get(key)
        if head is not None:
            return head
        parsed = parse_head(key, self.writes, self.max_body, self.reads)
        if isinstance(parsed, Head):
            if len(heads) >= HEADS:
                heads.clear()  # many clients or odd ones: start again, it is only a memo
            heads[key] = parsed
        return parsed


class RestLane(asyncio.Protocol):
    """One connection, served by the lane until a request needs aiohttp (see the module)."""

    def __init__(
        self,
        routes: Routes,
        fallback: Callable[[], asyncio.Protocol],
        lanes: set[RestLane],
        idle_timeout: float,
    ) -> None:
        self.routes = routes
        self.fallback = fallback
        self.lanes = lanes
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.replies: deque[_Reply] = deque()
        self.handing_over = False
        self.closing = False  # no more requests: Connection: close, an EOF, or lost
        self.eof = False
        self.taking = False  # in _take: a reply written meanwhile must not start another
        self.reading = True
        self.writing = True
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()  # the factory runs in the server's loop

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and awaited: send each at once (aiohttp does the same).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lanes.add(self)
        self.last_active = self.loop.time()
        self.timer = self.loop.call_later(self.idle_timeout, self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active = self.loop.time()
        self._take()

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.handing_over:
            return True  # aiohttp gets the EOF with the connection (see _handover)
        if not self.replies:
            return None  # close: at most an incomplete request is left
        return True  # answer what was asked, held-back requests too, then close (_flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None
        self.lanes.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.replies.clear()

    def pause_writing(self) -> None:
        self.writing = False
        self._pause()

    def resume_writing(self) -> None:
        self.writing = True
        self._flush()  # takes what waited, hands over or closes, as due

    # -- the lane

    def _take(self) -> None:
        """Answer every whole request in the buffer, in order, or hand over at one the lane
        does not take."""
        self.taking = True
        try:
            self._take_all()
        finally:
            self.taking = False

    def _take_all(self) -> None:
        routes = self.routes
        taken = 0
        while self.buffer and self.writing and not self.closing and not self.handing_over:
            if len(self.replies) >= MAX_QUEUE:
                self._pause()
                return
            if taken == TURN:
                self._pause()  # the rest in a later turn, after other connections' work
                self.loop.call_soon(self._flush)
                return
            head = routes.head(self.buffer)
            if head is None:
                return
            if isinstance(head, Handover):
                self.handing_over = True
                self._pause()
                self._flush()  # hands over now if nothing is outstanding
                return
            end = head.body_start + head.length
            if len(self.buffer) < end:
                return
            if head.method == b"GET" and self.replies:
                # A read sees the writes sent before it (aiohttp answers one request at a
                # time): it waits until they are answered (_flush takes it then).
                self._pause()
                return
            body = bytes(self.buffer[head.body_start : end])
            del self.buffer[:end]
            taken += 1
            reply = self._read(head) if head.method == b"GET" else self._write(head, body)
            self._queue(reply)  # written at once if ready and first
            if reply.close:
                self.closing = True
                self._pause()

    def _read(self, head: Head) -> _Reply:
        close = head.close
        try:
            # The query as aiohttp makes it (http_parser.py: URL.build, encoded) for its
            # handlers' request.query: the same decoding of escapes and "+".
            url = URL.build(path=head.path.decode(), query_string=head.query.decode(), encoded=True)
            status, data = self.routes.reads[head.path](url.query)
        except REFUSED as exc:
            status, data = refusal(exc)
        except Exception:
            log.exception("a REST read failed in the server")
            status, data, close = 500, _INTERNAL_BODY, True
        return _Reply(response(status, data, close, cors=True), close)

    def _write(self, head: Head, body: bytes) -> _Reply:
        routes, close = self.routes, head.close
        try:
            future, answer = routes.api.submit(routes.writes[head.path], head.api_key, body)
        except REFUSED as exc:
            status, data = refusal(exc)
            return _Reply(response(status, data, close), close)
        except Exception:
            log.exception("a REST write failed in the server")
            close = True  # what follows on this connection is not read
            return _Reply(response(500, _INTERNAL_BODY, close), close)
        reply = _Reply(None, close)
        future.add_done_callback(self._durable(answer, reply))
        return reply

    def _durable(
        self, answer: Callable[[commands.Outcome], bytes], reply: _Reply
    ) -> Callable[[asyncio.Future[commands.Outcome]], None]:
        def done(future: asyncio.Future[commands.Outcome]) -> None:
            if self.transport is None or future.cancelled():
                return  # the command stands; there is no one to tell
            exc = future.exception()
            if exc is None:
                status, body = 200, answer(future.result())
            elif isinstance(exc, REFUSED):
                status, body = refusal(exc)
            else:
                log.error("a REST write failed in the server", exc_info=exc)
                status, body, reply.close = 500, _INTERNAL_BODY, True
            reply.data = response(status, body, reply.close)
            self._flush()

        return done

    def _queue(self, reply: _Reply) -> None:
        self.replies.append(reply)
        if reply.data is not None and len(self.replies) == 1:
            self._flush()

    def _flush(self) -> None:
        """Write the replies that are ready, in order; then close or hand over if asked."""
        transport, replies = self.transport, self.replies
        if transport is None or transport.is_closing():
            return
        while replies and (data := replies[0].data) is not None:
            close = replies.popleft().close
            transport.write(data)
            self.last_active = self.loop.time()
            if close:
                transport.close()
                return
        if replies:
            return
        if self.handing_over:
            if self.writing:
                self._handover()
        elif self.closing:
            transport.close()
        elif self.writing and not self.taking:
            if not self.reading:
                self._resume()
            self._take()  # what was held back (a full queue, a paused socket, a turn's cap)
            if self.eof and not self.replies and not self.handing_over:
                transport.close()  # the client sent its last request; all answered

    def _handover(self) -> None:
        """Give the connection, and the bytes not yet answered, to aiohttp for good."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # closed meanwhile (idle, or the server stopping): nothing to hand
        self.lanes.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        protocol = self.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        if self.buffer:
            data, self.buffer = bytes(self.buffer), bytearray()
            protocol.data_received(data)
        if self.eof and isinstance(protocol, asyncio.Protocol) and not protocol.eof_received():
            transport.close()  # what the transport does when the protocol has it closed

    def _pause(self) -> None:
        if self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if (
            not self.reading
            and not self.closing
            and not self.handing_over
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.reading = True
            self.transport.resume_reading()

    def _idle_check(self) -> None:
        """Close a connection idle for ``idle_timeout`` between requests, as aiohttp closes an
        idle keep-alive connection: never with a request in progress (bytes of one read,
        replies outstanding, or a client slow to read them)."""
        loop = self.loop
        idle = loop.time() - self.last_active
        if self.transport is None or self.transport.is_closing():
            return
        busy = self.buffer or self.replies or not self.writing or not self.reading
        if busy or idle < self.idle_timeout:
            self.timer = loop.call_later(max(self.idle_timeout - idle, 1.0), self._idle_check)
            return
        self.transport.close()

    def close(self) -> None:
        """Close at once (the server is stopping)."""
        if self.transport is not None:
            self.transport.close()


_INTERNAL_BODY: Final = fail_body(
    "internal_error", "the server failed to handle the request; its log says why"
)
