"""Bad input, oversize frames and keepalive, over real connections."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from perps_indexer.server.app import keepalive_plan
from tests.server.conftest import ThreadedServer, limit_order, start_threaded

A = "0x" + "a" * 64

BAD_INPUTS = [
    ("not json at all", "not valid JSON"),
    ("[1, 2, 3]", "must be a JSON object"),
    ('"positions"', "must be a JSON object"),
    ("{}", 'no "topic"'),
    (json.dumps({"address": A}), 'no "topic"'),
    (json.dumps({"topic": "fills", "address": A}), "unknown topic 'fills'"),
    (json.dumps({"topic": 7, "address": A}), "unknown topic 7"),
    ('{"topic": "positions"}', 'needs an "address"'),
    ('{"topic": "positions", "address": "0xZZ"}', "not hex digits"),
    ('{"topic": "positions", "address": "abc"}', "must start with 0x"),
    ('{"topic": "positions", "address": 12}', "must be a string"),
    (json.dumps({"topic": "positions", "address": "0x" + "1" * 65}), "more than 64"),
    ('{"topic": "orderbook"}', 'needs a "market_id"'),
    ('{"topic": "orderbook", "market_id": "999"}', "unknown market_id '999'"),
    ('{"topic": "orderbook", "market_id": 39.6}', "unknown market_id 39.6"),
    ('{"topic": "orderbook", "market_id": null}', 'needs a "market_id"'),
]


@pytest.mark.parametrize(("frame", "needle"), BAD_INPUTS)
def test_bad_input_gets_an_error_and_the_connection_stays(
    server: ThreadedServer, frame: str, needle: str
) -> None:
    ws = websocket.create_connection(server.ws_url, timeout=5)
    ws.send(frame)
    reply = json.loads(ws.recv())
    assert set(reply) == {"message", "error"}
    assert reply["message"] == "error"
    assert needle in reply["error"]
    # Still open and serving.
    ws.send(json.dumps({"topic": "orderbook", "market_id": "396"}))
    assert json.loads(ws.recv()) == {"data": [], "message": "orderbook", "seq": 0}
    ws.close()


def test_binary_frame_is_refused_politely(server: ThreadedServer) -> None:
    ws = websocket.create_connection(server.ws_url, timeout=5)
    ws.send_binary(b'{"topic": "orderbook", "market_id": "396"}')
    reply = json.loads(ws.recv())
    assert reply["message"] == "error" and "binary frames" in reply["error"]
    ws.send('{"topic": "orderbook", "market_id": "396"}')
    assert json.loads(ws.recv())["message"] == "orderbook"
    ws.close()


def test_oversize_frame_closes_1009_and_others_keep_working(server: ThreadedServer) -> None:
    rest = server.rest
    rest.ok("/deposit", {"userAddress": A, "amount": 10_000_000})
    bystander = websocket.create_connection(server.ws_url, timeout=5)
    bystander.send('{"topic": "orderbook", "market_id": "396"}')
    assert json.loads(bystander.recv())["data"] == []

    with ws_connect(server.ws_url, max_size=None) as offender:
        offender.send("x" * (64 * 1024 + 1))
        with pytest.raises(ConnectionClosed):
            offender.recv(timeout=5)
        assert offender.close_code == 1009

    # A frame of exactly 64 KiB is still accepted (and answered with an error, not a close).
    with ws_connect(server.ws_url, max_size=None) as edge:
        edge.send(" " * (64 * 1024 - 2) + "{}")
        assert 'no "topic"' in json.loads(edge.recv(timeout=5))["error"]

    rest.ok("/placeLimitOrder", limit_order(A, long=True, size=1000, price=6000))
    update = json.loads(bystander.recv())
    assert update["data"][0]["price"] == "6000"
    bystander.close()


@pytest.fixture
def unlimited(tmp_path: Path) -> Iterator[ThreadedServer]:
    """A server without the inbound rate limit, to measure error handling alone."""
    running, stop = start_threaded(tmp_path, rate=1e9, burst=1_000_000)
    try:
        yield running
    finally:
        stop()


def test_garbage_storm_does_not_disturb_a_subscriber(unlimited: ThreadedServer) -> None:
    server = unlimited
    rest = server.rest
    rest.ok("/deposit", {"userAddress": A, "amount": 100_000_000})
    watcher = websocket.create_connection(server.ws_url, timeout=5)
    watcher.send('{"topic": "orderbook", "market_id": "396"}')
    watcher.recv()
    noisy = websocket.create_connection(server.ws_url, timeout=5)
    for i in range(300):
        noisy.send(["{", "[]", "null", '{"topic":', "\u0000", "{}" * 50][i % 6])
    for i in range(5):
        rest.ok("/placeLimitOrder", limit_order(A, long=True, size=500, price=6000 - i))
    seen = []
    while len(seen) < 5:
        seen.append(json.loads(watcher.recv()))
    assert [len(m["data"]) for m in seen] == [1, 2, 3, 4, 5]
    errors = 0
    noisy.settimeout(5)
    while errors < 300:
        assert json.loads(noisy.recv())["message"] == "error"
        errors += 1
    noisy.close()
    watcher.close()


def test_client_ping_is_answered(server: ThreadedServer) -> None:
    with ws_connect(server.ws_url) as ws:
        pong = ws.ping(b"hello")
        assert pong.wait(5)


def silent_handshake(port: int) -> socket.socket:
    """A raw socket that completes the handshake and then never reads nor answers."""
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    silent.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return silent


def read_until_close(sock: socket.socket) -> bytes:
    """The frames a raw socket received up to the server's close frame."""
    deadline = time.monotonic() + 5
    data = b""
    while time.monotonic() < deadline and b"\x88" not in data.split(b"\r\n\r\n", 1)[-1]:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


@given(count=st.integers(0, 3_000), ticks=st.integers(1, 50), step=st.integers(1, 600))
def test_the_keepalive_plan_checks_every_connection_once_per_period(
    count: int, ticks: int, step: int
) -> None:
    plan = keepalive_plan(count, ticks, step)
    assert len(plan) == ticks
    ranges = [r for tick in plan for r in tick]
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(count))
    share = -(-count // ticks)
    for tick in plan:
        assert sum(stop - start for start, stop in tick) <= share  # spread over the period
        assert all(0 < stop - start <= step for start, stop in tick)


@pytest.mark.parametrize(
    ("ticks", "step", "count"),
    [(1, 1, 3), (4, 1, 11), (4, 2, 11), (4, 500, 11), (20, 500, 3)],
    ids=[
        "one-tick-slices-of-1",
        "shares-of-3-slices-of-1",
        "shares-of-3-slices-of-2",
        "shares-of-3-one-slice",
        "more-ticks-than-connections",
    ],
)
def test_the_keepalive_ticker_reaches_every_connection(
    tmp_path: Path, ticks: int, step: int, count: int
) -> None:
    """Every connection is checked, whatever the share per tick and the slice per share."""
    running, stop = start_threaded(
        tmp_path,
        ping_interval=0.3,
        ping_timeout=0.4,
        keepalive_ticks=ticks,
        keepalive_slice=step,
    )
    try:
        silent = [silent_handshake(running.server.port) for _ in range(count)]
        for sock in silent:
            frames = read_until_close(sock)
            assert frames[:1] == b"\x89" and b"keepalive ping timeout" in frames
            sock.close()
        assert running.call(lambda: running.server.metrics.keepalive_timeouts) == count
    finally:
        stop()


def test_server_pings_quiet_clients_and_closes_silent_ones(tmp_path: Path) -> None:
    running, stop = start_threaded(tmp_path, ping_interval=0.3, ping_timeout=0.4)
    try:
        # websockets answers pings by itself while its background thread reads.
        with ws_connect(running.ws_url) as healthy:
            healthy.send('{"topic": "orderbook", "market_id": "396"}')
            healthy.recv(timeout=5)
            time.sleep(1.5)
            healthy.send('{"topic": "orderbook", "market_id": "397"}')
            assert json.loads(healthy.recv(timeout=5))["message"] == "orderbook"

        silent = silent_handshake(running.server.port)
        frames = read_until_close(silent)
        assert frames[:1] == b"\x89"  # the server pinged first
        close_at = frames.index(b"\x88")
        code = int.from_bytes(frames[close_at + 2 : close_at + 4], "big")
        assert code == 1011
        assert b"keepalive ping timeout" in frames[close_at:]
        silent.close()
        assert running.call(lambda: running.server.metrics.keepalive_timeouts) == 1
    finally:
        stop()
