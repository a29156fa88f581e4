"""Dead connections are detected: a server that never answers pings, one that never sends."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from perps_indexer.client import Backoff, Client, ConnectionState, StateChange

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class SilentServer:
    """Completes the WebSocket handshake, then never reads or writes again."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the listener is closed to stop
            while True:
                conn, _ = self.listener.accept()
                self.accepted.append(conn)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                key = next(
                    line.split(b":", 1)[1].strip()
                    for line in request.split(b"\r\n")
                    if line.lower().startswith(b"sec-websocket-key:")
                )
                accept = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
                conn.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


async def test_a_server_that_never_answers_pings_is_dropped(silent: SilentServer) -> None:
    changes: list[StateChange] = []
    started = time.monotonic()
    client = Client(
        f"ws://127.0.0.1:{silent.port}/ws",
        ping_interval=0.2,
        ping_timeout=0.3,
        close_timeout=0.2,
        backoff=Backoff(base=0.05, cap=0.05, jitter="none"),
        on_state=changes.append,
    )
    async with client:
        sub = client.subscribe("positions", address="0x1")
        async with asyncio.timeout(5):
            while len(silent.accepted) < 2:  # detected, then a new connection
                await asyncio.sleep(0.02)
        took = time.monotonic() - started
    lost = [c for c in changes if c.state is ConnectionState.DISCONNECTED]
    assert lost and lost[0].reason == "keepalive ping timeout"
    assert 0.5 <= took < 3
    assert sub.closed  # closing the client ends its subscriptions


async def test_a_server_that_stops_delivering_is_dropped() -> None:
    async def mute(ws: ServerConnection) -> None:
        await ws.wait_closed()  # answers pings (the library does), never sends

    changes: list[StateChange] = []
    async with serve(mute, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = Client(
            f"ws://127.0.0.1:{port}/ws",
            idle_timeout=0.3,
            reply_timeout=5,
            backoff=Backoff(base=0.05, cap=0.05, jitter="none"),
            on_state=changes.append,
        )
        async with client:
            client.subscribe("orderbook", market_id=396)
            async with asyncio.timeout(5):
                while not any(c.state is ConnectionState.DISCONNECTED for c in changes):
                    await asyncio.sleep(0.02)
    lost = next(c for c in changes if c.state is ConnectionState.DISCONNECTED)
    assert lost.reason == "nothing received for 0.3 s"
