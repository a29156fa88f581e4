"""The freshness limit beside us (scenario 6): the bare loop of a coalescing order-book feed.

    python bench/bare_fresh.py [--message FILE] [--slice 100] [--port 0]

What is left of the real server when everything but the transport and the coalescing is taken
away: no engine, no store, no projections, no routing, no JSON encoding. One port takes both:

* ``POST <any path>`` (HTTP/1.1 keep-alive, ``Content-Length``): the "order" is taken at once,
  the feed's sequence number moves on, and the reply is ``{"data": {"seq": N, "status":
  "Open", "order_id": "N"}}``, as the load generator's book driver reads it. The new state is
  the message from ``--message`` (scenario 1's real orderbook message) ending in ``"seq":N}``.
* A WebSocket upgrade: every text frame the client sends (a subscription) is answered with the
  current state, and the client joins the feed.

The feed is the server's: every subscriber gets the newest state at its turn in a cycle, at
most once per cycle, and a change arriving mid-cycle restarts the count from where the cycle
stands; slices of ``--slice`` sends with one turn of the event loop between them, the sends
of a slice made by the server's batch writer (one call into C, one ``send`` each) to sockets
holding nothing unsent. A subscriber whose transport holds more than the server's
direct-write limit (256 KiB) is skipped for that turn (the server would queue the newest state
for it instead). So its freshness is what any server built this way can reach on this
machine, with this load generator, at the order rate the suite drives.

It prints ``ws://127.0.0.1:PORT/ws`` when it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Generator
from typing import Any

from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.streams import StreamReader
from websockets.utils import accept_key

from bare_broadcast import message_of, stop_on_signals
from perps_indexer.server.app import ServerConfig, text_frame
from perps_indexer.server.batch_write import AVAILABLE as BATCH_WRITE
from perps_indexer.server.batch_write import BatchWriter

HIGH_WATER = ServerConfig().direct_write_limit
"""Bytes a transport may hold for a send to be added to it, as in the server; past it a
subscriber is skipped for that turn (the server queues the newest state in its outbox instead,
and writes it when the transport has drained)."""


class Feed:
    """The newest state and the cycle of subscribers that still have to get it."""

    def __init__(self, template: bytes, slice_: int) -> None:
        cut = template.rfind(b'"seq":')
        if cut < 0 or not template.endswith(b"}"):
            raise SystemExit('the message must end in "seq":N}, as the server\'s pushes do')
        self.prefix = template[: cut + 6]
        self.seq = 0
        self.frame = text_frame(self.prefix + b"0}")
        self.peers: list[Peer] = []
        self.cursor = 0
        self.remaining = 0
        self.slice = slice_
        self.wake = asyncio.Event()
        self.writer = BatchWriter()

    def join(self, peer: Peer) -> None:
        """A subscriber in, just behind the cursor: its subscription brought it the current
        state, and those still owed it keep their turns (as ``_Round._refresh`` orders them)."""
        self.peers.insert(self.cursor, peer)
        self.cursor = (self.cursor + 1) % len(self.peers)

    def leave(self, peer: Peer) -> None:
        """A subscriber gone: out of the cycle, and out of the count if it was still owed."""
        i = self.peers.index(peer)
        if (i - self.cursor) % len(self.peers) < self.remaining:
            self.remaining -= 1
        del self.peers[i]
        if i < self.cursor:
            self.cursor -= 1
        self.cursor = self.cursor % len(self.peers) if self.peers else 0

    def change(self) -> int:
        """A new state: everyone is owed it, from where the cycle stands."""
        self.seq += 1
        self.frame = text_frame(self.prefix + b"%d}" % self.seq)
        self.remaining = len(self.peers)
        self.wake.set()
        return self.seq

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.remaining > 0:
                self.one_slice()
                await asyncio.sleep(0)  # the orders, the subscriptions, the sockets

    def one_slice(self) -> None:
        peers, frame = self.peers, self.frame
        n = len(peers)
        count = min(self.slice, self.remaining, n)
        fds: list[int] = []
        sinks: list[Any] = []
        for j in range(count):
            peer = peers[(self.cursor + j) % n]
            transport = peer.transport
            if transport is None or transport.is_closing():
                continue
            buffered = transport.get_write_buffer_size()
            if buffered == 0 and peer.fd >= 0:
                fds.append(peer.fd)
                sinks.append(transport)
            elif buffered <= HIGH_WATER:
                transport.write(frame)
        if fds:
            self.writer(fds, sinks, frame)
        self.cursor = (self.cursor + count) % n if n else 0
        self.remaining = self.remaining - count if n else 0


class Peer(asyncio.Protocol):
    """One connection: HTTP requests until it asks for a WebSocket, then a subscriber."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.transport: Any = None
        self.fd = -1
        self.buffer = b""
        self.reader: StreamReader | None = None  # once a WebSocket: its frames, as they come
        self.joined = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.joined:
            self.feed.leave(self)

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed_data(data)
            next(self.parser, None)  # None: closed, the rest is not read
            return
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].split(b"\r\n")
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
            length = int(fields.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            if fields.get(b"upgrade", b"").lower() == b"websocket":
                self.upgrade(fields[b"sec-websocket-key"].decode())
                return
            self.order(lines[0].startswith(b"POST "))

    def order(self, post: bool) -> None:
        if not post:
            body, status = b'{"message":"not found"}', b"404 Not Found"
        else:
            seq = self.feed.change()
            body = b'{"data":{"seq":%d,"status":"Open","order_id":"%d"}}' % (seq, seq)
            status = b"200 OK"
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )

    def upgrade(self, key: str) -> None:
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept_key(key).encode()
        )
        self.fd = self.feed.writer.socket_of(self.transport)
        self.reader = StreamReader()
        self.parser = self.frames()
        self.reader.feed_data(self.buffer)  # what the client sent after its head
        next(self.parser)

    def frames(self) -> Generator[None, None, None]:
        """The client's frames, parsed by websockets' sans-I/O reader (RFC 6455 §5.2: masked):
        a text frame subscribes, a ping is answered, a close closes."""
        assert self.reader is not None
        while True:
            frame = yield from Frame.parse(self.reader.read_exact, mask=True)
            if frame.opcode is Opcode.TEXT:
                self.transport.write(self.feed.frame)  # the current state, then the feed
                if not self.joined:
                    self.joined = True
                    self.feed.join(self)
            elif frame.opcode is Opcode.PING:
                self.transport.write(Frame(Opcode.PONG, frame.data).serialize(mask=False))
            elif frame.opcode is Opcode.CLOSE:
                close = Close(CloseCode.NORMAL_CLOSURE, "").serialize()
                self.transport.write(Frame(Opcode.CLOSE, close).serialize(mask=False))
                self.transport.close()
                return


async def main_async(args: argparse.Namespace) -> None:
    stop = stop_on_signals()
    loop = asyncio.get_running_loop()
    feed = Feed(message_of(args), args.slice)
    server = await loop.create_server(lambda: Peer(feed), "127.0.0.1", args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"bare fresh ws://127.0.0.1:{port}/ws", flush=True)
    task = asyncio.ensure_future(feed.run())
    await stop.wait()
    task.cancel()
    server.close()
    print(f"changes {feed.seq}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--message", help="file holding the orderbook message (ends in seq)")
    parser.add_argument("--size", type=int, default=3000, help="filler bytes without --message")
    parser.add_argument("--slice", type=int, default=100, help="sends between two loop turns")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if not BATCH_WRITE:
        sys.exit("bare_fresh.py needs the C extension perps_indexer.server._sendeach (not built)")
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
