"""Protocol v2 over real connections: ids and acks, unsubscribe, seq, resume, limits, slow
consumers, and the security points (CORS, read-only, API key, refusing unsafe settings).

Clients are ``websockets`` (sync), ``websocket-client`` (the original examples' library) and,
for a reader that never reads, a raw socket speaking just enough RFC 6455.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import websocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from perps_indexer.errors import ConfigurationError
from perps_indexer.server.app import Server, ServerConfig
from tests.server.conftest import API_KEY, Client, ThreadedServer, start_threaded

A = "0x" + "a" * 64
B = "0x" + "b" * 64
C = "0x" + "c" * 64
READS = {
    "positions": "getPositions",
    "trade_history": "getTradeHistory",
    "open_orders": "getOpenOrders",
    "order_history": "getOrderHistory",
}


# ---------------------------------------------------------------------------- helpers


@contextmanager
def running(tmp_path: Path, **overrides: Any) -> Iterator[ThreadedServer]:
    server, stop = start_threaded(tmp_path, **overrides)
    try:
        yield server
    finally:
        stop()


@contextmanager
def connect(server: ThreadedServer) -> Iterator[ClientConnection]:
    with ws_connect(server.ws_url, open_timeout=5, close_timeout=2, max_size=None) as ws:
        yield ws


def send(ws: ClientConnection, **request: Any) -> None:
    ws.send(json.dumps(request))


def recv(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    message = json.loads(ws.recv(timeout=timeout))
    assert isinstance(message, dict)
    return message


def recv_until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool], timeout: float = 5
) -> list[dict[str, Any]]:
    """Messages up to and including the first for which ``done`` holds."""
    deadline = time.monotonic() + timeout
    got = []
    while True:
        got.append(recv(ws, max(0.01, deadline - time.monotonic())))
        if done(got[-1]):
            return got


def recv_closed(ws: ClientConnection, timeout: float = 5) -> list[dict[str, Any]]:
    """Every message until the server closes the connection."""
    deadline = time.monotonic() + timeout
    got = []
    with pytest.raises(ConnectionClosed):
        while True:
            got.append(json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
    return got


def wait_for(check: Callable[[], Any], timeout: float = 5, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.01)


def deposit(rest: Client, *addresses: str) -> None:
    for address in addresses:
        rest.ok("/deposit", {"userAddress": address, "amount": 10**12})


def limit(
    rest: Client, address: str, price: int, *, long: bool, size: int = 500, market: int = 396
) -> dict[str, Any]:
    return rest.ok(  # type: ignore[no-any-return]
        "/placeLimitOrder",
        {
            "userAddress": address,
            "marketId": market,
            "tradeSide": long,
            "direction": False,
            "size": size,
            "price": price,
            "leverage": 2,
        },
    )


def market(rest: Client, address: str, *, long: bool, size: int = 500) -> dict[str, Any]:
    return rest.ok(  # type: ignore[no-any-return]
        "/placeMarketOrder",
        {
            "userAddress": address,
            "marketId": 396,
            "tradeSide": long,
            "direction": False,
            "size": size,
            "leverage": 2,
        },
    )


def cancel(rest: Client, address: str, order_id: str) -> dict[str, Any]:
    return rest.ok(  # type: ignore[no-any-return]
        "/cancelMultipleOrders",
        {"userAddress": address, "marketId": 396, "cancelOrderIds": [order_id]},
    )


def rest_rows(rest: Client, path: str) -> list[dict[str, Any]]:
    status, reply = rest.get(path)
    assert status == 200, reply
    return reply["data"]  # type: ignore[no-any-return]


def server_seq(server: ThreadedServer) -> int:
    status, reply = server.rest.get("/health")
    assert status == 200, reply
    return int(reply["data"]["seq"])


def recv_streams(
    ws: ClientConnection, expected: dict[str, list[dict[str, Any]]], timeout: float = 10
) -> dict[str, list[dict[str, Any]]]:
    """Read until the newest message of each topic in ``expected`` has those rows; returns
    every message received, by topic (a step's messages come in no fixed order)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, list[dict[str, Any]]] = {}
    while any(seen.get(t, [{}])[-1].get("data") != rows for t, rows in expected.items()):
        message = recv(ws, max(0.01, deadline - time.monotonic()))
        seen.setdefault(message["message"], []).append(message)
    return seen


def metric(server: ThreadedServer, name: str) -> int:
    """A server counter; the fan-out's own (``direct_writes``) are kept by the hub."""

    def read() -> int:
        if name == "direct_writes":
            assert server.server.venue is not None
            return server.server.venue.hub.direct_writes
        return int(getattr(server.server.metrics, name))

    return int(server.call(read))


# ---------------------------------------------------------------------------- 1. ids and acks


def test_original_client_sees_only_original_replies_plus_seq(server: ThreadedServer) -> None:
    deposit(server.rest, A, B)
    limit(server.rest, B, 6000, long=False)
    ws = websocket.create_connection(server.ws_url, timeout=5)
    try:
        ws.send(json.dumps({"topic": "orderbook", "market_id": "396"}))
        ws.send(json.dumps({"topic": "positions", "address": "0xZZ"}))
        ws.send(json.dumps({"topic": "positions", "address": A}))
        book, error, positions = (json.loads(ws.recv()) for _ in range(3))
        assert set(book) == {"data", "message", "seq"} and book["message"] == "orderbook"
        assert book["data"] == rest_rows(server.rest, "/getOrderBook?marketId=396")
        assert set(error) == {"message", "error"} and error["message"] == "error"
        assert positions == {"data": [], "message": "positions", "seq": 0}
        market(server.rest, A, long=True)
        pushed = [json.loads(ws.recv()) for _ in range(2)]
        assert {m["message"] for m in pushed} == {"orderbook", "positions"}
        for message in pushed:
            assert set(message) == {"data", "message", "seq"}
    finally:
        ws.close()


def test_ack_then_snapshot_with_the_id(server: ThreadedServer) -> None:
    deposit(server.rest, A, B)
    limit(server.rest, B, 6000, long=False)
    market(server.rest, A, long=True)
    with connect(server) as ws:
        send(ws, topic="positions", address=A.upper().replace("0X", "0x"), id="pos-1")
        send(ws, topic="orderbook", market_id=396, id=7)
        got = [recv(ws) for _ in range(4)]
    positions = rest_rows(server.rest, f"/getPositions?userAddress={A}")
    assert len(positions) == 1
    seq = server_seq(server)
    assert got == [
        {"message": "subscribed", "id": "pos-1", "topic": "positions", "address": A},
        {"data": positions, "message": "positions", "seq": seq, "id": "pos-1"},
        {"message": "subscribed", "id": 7, "topic": "orderbook", "market_id": "396"},
        {"data": [], "message": "orderbook", "seq": seq, "id": 7},
    ]


def test_errors_carry_the_id_and_a_code(tmp_path: Path) -> None:
    with running(tmp_path, max_subscriptions=1) as server, connect(server) as ws:
        cases = [
            ({"topic": "fills", "address": A, "id": 1}, "unknown_topic"),
            ({"topic": "orderbook", "market_id": "999", "id": 2}, "unknown_market"),
            ({"topic": "orderbook", "market_id": "\u00b2", "id": 3}, "unknown_market"),
            ({"topic": "positions", "address": "0xZZ", "id": "x"}, "invalid_address"),
            ({"op": "watch", "topic": "positions", "address": A, "id": 4}, "invalid_op"),
            ({"topic": "trade_history", "address": A, "since": -1, "id": 5}, "invalid_since"),
            ({"op": "unsubscribe", "topic": "positions", "address": A, "id": 6}, "not_subscribed"),
            ({"topic": "positions", "address": A, "id": 7}, None),
            ({"topic": "positions", "address": B, "id": 8}, "too_many_subscriptions"),
        ]
        for request, code in cases:
            ws.send(json.dumps(request))
            reply = recv(ws)
            if code is None:
                assert reply["message"] == "subscribed"
                assert recv(ws)["message"] == "positions"
                continue
            assert reply["message"] == "error" and reply["code"] == code, (request, reply)
            assert reply["id"] == request["id"] and reply["error"]
        # The same mistakes without an id get exactly the original error reply.
        for request, code in cases:
            if code in (None, "invalid_op", "invalid_since", "not_subscribed"):
                continue
            ws.send(json.dumps({k: v for k, v in request.items() if k != "id"}))
            reply = recv(ws)
            assert set(reply) == {"message", "error"}, reply


def test_bad_frames_that_used_to_crash_the_handler(server: ThreadedServer) -> None:
    """Deep nesting, a superscript digit and a since beyond 64 bits are answered, not fatal."""
    with connect(server) as ws:
        ws.send("[" * 20_000 + "]" * 20_000)
        assert "nested too deeply" in recv(ws)["error"]
        send(ws, topic="orderbook", market_id="\u00b2")
        assert "unknown market_id" in recv(ws)["error"]
        send(ws, topic="trade_history", address=A, since=10**30, id=1)
        reply = recv(ws)
        assert reply["code"] == "invalid_since" and "ahead of the newest event" in reply["error"]
        send(ws, topic="orderbook", market_id="396")
        assert recv(ws)["message"] == "orderbook"
    status, reply = server.rest.get("/getOrderBook?marketId=%C2%B2")
    assert status == 400 and reply["code"] == "unknown_market"


# ---------------------------------------------------------------------------- 2. unsubscribe


def test_unsubscribe_stops_that_stream_only(server: ThreadedServer) -> None:
    deposit(server.rest, A)
    with connect(server) as ws, connect(server) as other:
        send(ws, topic="orderbook", market_id=396, id="b396")
        send(ws, topic="orderbook", market_id="397", id="b397")
        send(other, topic="orderbook", market_id=396)
        assert [m["message"] for m in (recv(ws) for _ in range(4))] == [
            "subscribed",
            "orderbook",
            "subscribed",
            "orderbook",
        ]
        recv(other)
        send(ws, op="unsubscribe", topic="orderbook", market_id="396", id="u")
        assert recv(ws) == {
            "message": "unsubscribed",
            "id": "u",
            "topic": "orderbook",
            "market_id": "396",
        }
        assert server.call(lambda: server.server.venue.hub.subscription_count) == 2
        for i in range(5):
            seq396 = limit(server.rest, A, 5000 + i, long=True)["seq"]
            seq397 = limit(server.rest, A, 50_000 + 10 * i, long=True, market=397)["seq"]
            assert seq397 > seq396
            # Had the 396 change reached this connection, it would come before this one.
            got = recv(ws)
            assert got["id"] == "b397" and got["seq"] == seq397, got
            assert recv(other)["seq"] == seq396  # the other connection still gets 396
        send(ws, op="unsubscribe", topic="orderbook", market_id=396, id="again")
        reply = recv(ws)
        assert reply["code"] == "not_subscribed" and reply["id"] == "again"
        send(ws, op="unsubscribe", topic="orderbook", market_id=397)  # no id: no ack
        send(ws, topic="open_orders", address=A)
        assert len(recv(ws)["data"]) == 10
        seq = limit(server.rest, A, 40_000, long=True, market=397)["seq"]
        got = recv(ws)  # the 397 book changed first, but only open_orders comes
        assert got["message"] == "open_orders" and got["seq"] == seq
        assert server.call(lambda: server.server.venue.hub.subscription_count) == 2


# ---------------------------------------------------------------------------- 3. seq


def test_seq_only_increases_per_stream(server: ThreadedServer) -> None:
    deposit(server.rest, A, B)
    topics = ("positions", "trade_history", "open_orders", "order_history")
    with connect(server) as ws:
        for topic in topics:
            send(ws, topic=topic, address=A)
        send(ws, topic="orderbook", market_id="396")
        seqs: dict[str, list[int]] = {}
        for message in (recv(ws) for _ in range(5)):
            seqs.setdefault(message["message"], []).append(message["seq"])
        for i in range(30):
            if i % 3 == 2:
                market(server.rest, A, long=True)
            else:
                limit(server.rest, B, 6000 + i % 5, long=False)
                limit(server.rest, A, 5990 - i % 5, long=True)
        rest = {
            "orderbook": rest_rows(server.rest, "/getOrderBook?marketId=396"),
            **{t: rest_rows(server.rest, f"/{READS[t]}?userAddress={A}") for t in topics},
        }
        for topic, messages in recv_streams(ws, rest).items():
            seqs[topic] += [m["seq"] for m in messages]
    last = server_seq(server)
    for topic, values in seqs.items():
        assert values == sorted(set(values)), (topic, values)  # strictly increasing
        assert len(values) > 5, topic
        assert values[-1] <= last


# ---------------------------------------------------------------------------- 4. resume


def test_resume_after_a_disconnect_misses_nothing(server: ThreadedServer) -> None:
    rest = server.rest
    deposit(rest, A, B)
    asks = [limit(rest, B, 6000 + i, long=False)["order_id"] for i in range(6)]
    with connect(server) as ws:
        send(ws, topic="trade_history", address=A, id="t")
        send(ws, topic="order_history", address=A, id="o")
        send(ws, topic="positions", address=A, id="p")
        recv_until(ws, lambda m: m.get("id") == "p" and m["message"] == "positions")
        seq = market(rest, A, long=True)["seq"]  # one fill
        expected = {t: rest_rows(rest, f"/{READS[t]}?userAddress={A}") for t in READS}
        del expected["open_orders"]
        last = {t: m[-1] for t, m in recv_streams(ws, expected).items()}
    assert last["trade_history"]["seq"] == last["order_history"]["seq"] == seq
    since_trades, since_orders = last["trade_history"]["seq"], last["order_history"]["seq"]

    # While disconnected: two fills for A, a bid placed and cancelled, B changes its own orders.
    fill_seq = market(rest, A, long=True, size=1000)["seq"]
    bid = limit(rest, A, 5000, long=True)["order_id"]
    cancel_seq = cancel(rest, A, bid)["seq"]
    cancel(rest, B, asks[-1])

    with connect(server) as ws:
        send(ws, topic="trade_history", address=A, since=since_trades, id="t2")
        send(ws, topic="order_history", address=A, since=since_orders)
        send(ws, topic="positions", address=A, since=since_trades, id="p2")
        got = [recv(ws) for _ in range(5)]
        assert got[0] == {
            "message": "subscribed",
            "id": "t2",
            "topic": "trade_history",
            "address": A,
        }
        trades, orders, ack, positions = got[1], got[2], got[3], got[4]
        assert ack["id"] == "p2" and ack["message"] == "subscribed"

        # Exactly the rows changed after since: the 2 new fills, the 2 orders they touched.
        assert trades["data"] == rest_rows(rest, f"/getTradeHistory?userAddress={A}&limit=2")
        assert len(trades["data"]) == 2 and trades["id"] == "t2"
        assert orders["data"] == rest_rows(rest, f"/getOrderHistory?userAddress={A}&limit=2")
        assert [r["status"] for r in orders["data"]] == ["Cancelled", "Filled"]
        assert set(orders) == {"data", "message", "seq"}
        full = rest_rows(rest, f"/getOrderHistory?userAddress={A}")
        assert len(full) == 3 and full[2] not in orders["data"]  # unchanged: not resent
        assert trades["seq"] == fill_seq and orders["seq"] == cancel_seq
        # A state topic answers since with a fresh snapshot.
        assert positions["data"] == rest_rows(rest, f"/getPositions?userAddress={A}")
        assert positions["seq"] > since_trades

        # Later pushes are the full windows again, with a larger seq.
        seq = market(rest, A, long=True)["seq"]
        expected = {t: rest_rows(rest, f"/{READS[t]}?userAddress={A}") for t in READS}
        del expected["open_orders"]
        pushed = recv_streams(ws, expected)
        assert [len(m) for m in pushed.values()] == [1, 1, 1]  # one full window each
        assert pushed["trade_history"][0]["seq"] == seq
        assert len(pushed["trade_history"][0]["data"]) == 4
        # since = now: nothing changed after it.
        send(ws, topic="trade_history", address=A, since=seq, id="now")
        assert recv(ws)["message"] == "subscribed"
        assert recv(ws) == {"data": [], "message": "trade_history", "seq": seq, "id": "now"}


def test_since_too_old_names_the_oldest_since_served(tmp_path: Path) -> None:
    with running(tmp_path, max_resume_rows=2) as server:
        rest = server.rest
        deposit(rest, A, B)
        for i in range(4):
            limit(rest, B, 6000 + i, long=False)
        fills = [market(rest, A, long=True)["seq"] for _ in range(4)]
        with connect(server) as ws:
            send(ws, topic="trade_history", address=A, since=0, id="old")
            reply = recv(ws)
            assert reply["code"] == "since_too_old" and reply["id"] == "old"
            assert "max_resume_rows" in reply["error"]
            match = re.search(r"the oldest since answered is (\d+)", reply["error"])
            assert match, reply["error"]
            oldest = int(match.group(1))
            assert oldest == fills[1]  # after it: the last two fills, the limit
            send(ws, topic="trade_history", address=A, since=oldest - 1)
            assert recv(ws)["message"] == "error"
            send(ws, topic="trade_history", address=A, since=oldest)
            resumed = recv(ws)
            assert resumed["data"] == rest_rows(rest, f"/getTradeHistory?userAddress={A}&limit=2")
            assert resumed["seq"] == fills[-1]
            # A since this server never sent is refused too (with the newest seq named).
            send(ws, topic="order_history", address=A, since=fills[-1] + 100, id=2)
            reply = recv(ws)
            assert reply["code"] == "invalid_since" and f"(seq {fills[-1]})" in reply["error"]
            # Without an id the error is the original shape.
            send(ws, topic="order_history", address=A, since=0)
            assert set(recv(ws)) == {"message", "error"}


# ---------------------------------------------------------------------------- 5. limits


def test_subscriptions_per_connection(tmp_path: Path) -> None:
    with running(tmp_path, max_subscriptions=3) as server, connect(server) as ws:
        for address in (A, B, C):
            send(ws, topic="positions", address=address)
            recv(ws)
        send(ws, topic="orderbook", market_id=396, id="fourth")
        reply = recv(ws)
        assert reply["code"] == "too_many_subscriptions" and reply["id"] == "fourth"
        assert "max_subscriptions = 3" in reply["error"]
        send(ws, op="unsubscribe", topic="positions", address=C)
        send(ws, topic="orderbook", market_id=396)
        assert recv(ws)["message"] == "orderbook"


def test_rate_limit_refuses_then_closes_with_1008(tmp_path: Path) -> None:
    with running(tmp_path, rate=5, burst=10) as server, connect(server) as ws:
        for _ in range(11):
            ws.send("{}")  # each admitted one is answered with its own error
        got = [recv(ws)["error"] for _ in range(11)]
        assert all('no "topic"' in text for text in got[:10])
        assert got[10] == (
            "rate limit: at most 5 messages per second, in bursts of up to 10 "
            "(rate = 5, burst = 10); this message was dropped"
        )
        with contextlib.suppress(ConnectionClosed):  # (closed while still sending)
            for _ in range(30):  # refusals in a row, more than the burst
                ws.send("{}")
        # (A token may have come back meanwhile: then one more answer and one more notice.)
        assert len(recv_closed(ws)) <= 2
        assert ws.close_code == 1008
        assert ws.close_reason == "inbound rate limit of 5/s exceeded repeatedly"
        wait_for(lambda: not server.call(lambda: server.server.connections), what="cleanup")


def test_connections_per_ip(tmp_path: Path) -> None:
    with running(tmp_path, max_connections_per_ip=2) as server:
        with connect(server) as one, connect(server) as two:
            with connect(server) as third:
                reply = recv(third)
                assert reply["message"] == "error"
                assert "max_connections_per_ip = 2" in reply["error"]
                assert recv_closed(third) == []
                assert third.close_code == 1008
                assert third.close_reason == "connection limit per address"
            for ws in (one, two):
                send(ws, topic="orderbook", market_id=396)
                assert recv(ws)["message"] == "orderbook"
        wait_for(lambda: not server.call(lambda: server.server.per_ip), what="per-IP count")
        with connect(server) as again:
            send(again, topic="orderbook", market_id=396)
            assert recv(again)["message"] == "orderbook"


def test_frame_size_limit(tmp_path: Path) -> None:
    with running(tmp_path, max_frame=1024) as server, connect(server) as ws:
        ws.send(" " * 1022 + "{}")  # exactly the limit: answered
        assert 'no "topic"' in recv(ws)["error"]
        ws.send(" " * 1025)
        assert recv_closed(ws) == []
        assert ws.close_code == 1009
        assert ws.close_reason == "a message is larger than 1024 bytes (max_frame)"


# ---------------------------------------------------------------------------- 6. slow consumers


def test_outbox_over_its_bound_closes_with_1013(tmp_path: Path) -> None:
    # Without the direct-write fast path, every push meets the outbox and its bound.
    limits = {"max_outbox_bytes": 3000, "direct_write_limit": 0}
    with running(tmp_path, **limits) as server, connect(server) as ws:
        rest = server.rest
        deposit(rest, A)
        for topic in ("order_history", "open_orders"):
            send(ws, topic=topic, address=A)
        send(ws, topic="orderbook", market_id=396)
        got = [recv(ws) for _ in range(3)]
        for i in range(10):  # each order changes three streams at once, more bytes each time
            limit(rest, A, 5000 + i, long=True)
            if ws.close_code is not None:
                break
        got += recv_closed(ws)
        assert ws.close_code == 1013
        assert ws.close_reason == (
            "reading too slowly: the outbound buffer is full; reconnect and resume with since"
        )
        # What arrived before the close is whole: each step's three messages or none of them.
        assert len(got) % 3 == 0 and 3 <= len(got) < 30
        assert metric(server, "slow_readers") == 1


class RawClient:
    """A WebSocket client on a bare socket with a small receive buffer, that reads only when
    told to: a reader that falls behind."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101")

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask, size = os.urandom(4), len(payload)
        if size < 126:
            header = bytes([0x80 | opcode, 0x80 | size])
        else:
            header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def read_to_end(self) -> list[tuple[int, bytes]]:
        """Read until the server ends the connection (answering its close frame); the frames
        that arrived whole."""
        data, frames, at = bytearray(), [], 0
        try:
            while chunk := self.sock.recv(1 << 20):
                data += chunk
                while (frame := _frame_at(data, at)) is not None:
                    opcode, payload, at = frame
                    frames.append((opcode, payload))
                    if opcode == 0x8:
                        self.send_frame(0x8, payload[:2])
        except ConnectionResetError:
            pass
        return frames

    def close(self) -> None:
        self.sock.close()


def _frame_at(data: bytearray, at: int) -> tuple[int, bytes, int] | None:
    """The server frame (unmasked) starting at ``at``: opcode, payload, where the next starts."""
    if at + 2 > len(data):
        return None
    opcode, size, at = data[at] & 0x0F, data[at + 1] & 0x7F, at + 2
    if size >= 126:
        width = 2 if size == 126 else 8
        if at + width > len(data):
            return None
        size, at = int.from_bytes(data[at : at + width], "big"), at + width
    if at + size > len(data):
        return None
    return opcode, bytes(data[at : at + size]), at + size


def assert_closed_1013(frames: list[tuple[int, bytes]], reason: str) -> None:
    opcode, payload = frames[-1]
    assert opcode == 0x8, frames[-1][:1]
    assert int.from_bytes(payload[:2], "big") == 1013
    assert payload[2:].decode() == reason


def flood_until(server: ThreadedServer, done: Callable[[], bool], prices: Iterator[int]) -> None:
    """Place orders for A (each changing A's order_history) until ``done``."""
    deadline = time.monotonic() + 15
    while not done():
        assert time.monotonic() < deadline, "the server never saw the reader fall behind"
        limit(server.rest, A, next(prices), long=True)


def writer_stuck(server: ThreadedServer, seconds: float) -> bool:
    """Some connection's writer has waited more than ``seconds`` in one send."""

    def stuck() -> bool:
        now = server.loop.time()
        return any(now - t > seconds for t in server.server.writing_since.values())

    return bool(server.call(stuck))


def test_a_client_that_never_reads_is_closed_with_1013(tmp_path: Path) -> None:
    with running(tmp_path, slow_reader_timeout=0.3, history_limit=250) as server:
        deposit(server.rest, A)
        prices = iter(range(9000, 1000, -1))
        for _ in range(250):  # A's order_history: about 85 kB per push
            limit(server.rest, A, next(prices), long=True)
        raw = RawClient(server.server.port)
        try:
            raw.send_text(json.dumps({"topic": "order_history", "address": A}))
            flood_until(server, lambda: metric(server, "slow_readers") == 1, prices)
            frames = raw.read_to_end()
        finally:
            raw.close()
        assert_closed_1013(frames, "not reading: a send waited too long; reconnect and resume")
        assert all(json.loads(p)["message"] == "order_history" for _, p in frames[:-1])
        wait_for(lambda: not server.call(lambda: server.server.connections), what="cleanup")
        assert server.call(lambda: server.server.venue.hub.subscription_count) == 0
        assert metric(server, "closed_by_server") == 1


def test_outbox_overflow_while_a_send_is_stuck_closes_at_once(tmp_path: Path) -> None:
    """The bound acts at once, not only after slow_reader_timeout (here far away)."""
    with running(
        tmp_path, slow_reader_timeout=60, history_limit=250, max_outbox_bytes=150_000
    ) as server:
        deposit(server.rest, A)
        prices = iter(range(9000, 1000, -1))
        for _ in range(250):
            limit(server.rest, A, next(prices), long=True)
        raw = RawClient(server.server.port)
        try:
            raw.send_text(json.dumps({"topic": "order_history", "address": A}))
            flood_until(server, lambda: writer_stuck(server, 0.2), prices)
            # Pending now: A's order_history (85 kB); asking for A's 250+ open orders (85 kB
            # more) puts the connection over its bound while its writer waits on the socket.
            limit(server.rest, A, next(prices), long=True)
            assert metric(server, "slow_readers") == 0
            raw.send_text(json.dumps({"topic": "open_orders", "address": A}))
            wait_for(lambda: metric(server, "slow_readers") == 1, 3, "the 1013 close")
            frames = raw.read_to_end()
        finally:
            raw.close()
        assert_closed_1013(
            frames,
            "reading too slowly: the outbound buffer is full; reconnect and resume with since",
        )
        wait_for(lambda: not server.call(lambda: server.server.connections), 3, "cleanup")


# ---------------------------------------------------------------------------- security


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body or None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def test_cors_reads_are_open_and_writes_are_not(server: ThreadedServer) -> None:
    url, origin = server.server.url, {"Origin": "https://elsewhere.example"}
    status, headers, _ = http(url + "/getOrderBook?marketId=396", headers=origin)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    status, headers, _ = http(url + "/getOrderBook?marketId=1", headers=origin)
    assert status == 400 and headers["Access-Control-Allow-Origin"] == "*"  # errors readable
    preflight = dict(origin, **{"Access-Control-Request-Method": "GET"})
    status, headers, _ = http(url + "/getPositions", "OPTIONS", preflight)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert "GET" in headers["Access-Control-Allow-Methods"]
    assert "POST" not in headers["Access-Control-Allow-Methods"]
    # A cross-origin write: its preflight is refused, and no response grants the origin.
    preflight = dict(origin, **{"Access-Control-Request-Method": "POST"})
    status, headers, _ = http(url + "/deposit", "OPTIONS", preflight)
    assert not 200 <= status < 300 and "Access-Control-Allow-Origin" not in headers
    write = dict(origin, **{"x-api-key": API_KEY, "content-type": "application/json"})
    body = json.dumps({"userAddress": A, "amount": 5}).encode()
    status, headers, _ = http(url + "/deposit", "POST", write, body)
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_read_only_serves_no_writes(tmp_path: Path) -> None:
    with running(tmp_path, read_only=True) as server:
        status, reply = server.rest.post("/deposit", {"userAddress": A, "amount": 5})
        assert status == 404 and reply["code"] == "not_found"
        status, reply = server.rest.post("/placeMarketOrder", {})
        assert status == 404
        assert rest_rows(server.rest, "/getOrderBook?marketId=396") == []
        with connect(server) as ws:
            send(ws, topic="orderbook", market_id=396)
            assert recv(ws)["message"] == "orderbook"


@pytest.mark.parametrize(
    ("host", "api_key", "read_only", "refused"),
    [
        ("0.0.0.0", None, False, True),
        ("::", None, False, True),
        ("192.168.1.10", None, False, True),
        ("0.0.0.0", "k", False, False),
        ("0.0.0.0", None, True, False),
        ("127.0.0.1", None, False, False),
        ("127.0.0.2", None, False, False),
        ("localhost", None, False, False),
        ("::1", None, False, False),
    ],
)
def test_check_config_refuses_open_writes_without_a_key(
    host: str, api_key: str | None, read_only: bool, refused: bool
) -> None:
    server = Server(ServerConfig(host=host, api_key=api_key, read_only=read_only))
    if refused:
        with pytest.raises(ConfigurationError, match="without a key"):
            server.check_config()
    else:
        server.check_config()


def test_start_refuses_before_listening(tmp_path: Path) -> None:
    db = tmp_path / "perps.db"
    server = Server(ServerConfig(host="0.0.0.0", port=0, db=str(db)))
    with pytest.raises(ConfigurationError, match="--api-key"):
        asyncio.run(server.start())
    assert not db.exists()  # refused before anything was opened, let alone listening


def test_api_key(server: ThreadedServer) -> None:
    body = {"userAddress": A, "amount": 5}
    for key in ("wrong", "", API_KEY + "x", API_KEY[:-1], "t\u00e9st-key"):
        status, reply = server.rest.post("/deposit", body, key=key)
        assert status == 401 and reply["code"] == "unauthorized", key
    assert server.rest.post("/deposit", body)[0] == 200
    # Header bytes that are not UTF-8 are a wrong key, not a server error.
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /deposit HTTP/1.1\r\nHost: x\r\nx-api-key: \xff\xfe\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(raw), raw)
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]


def test_request_bodies_are_capped_and_values_are_data(server: ThreadedServer) -> None:
    status, reply = server.rest.post("/deposit", None, raw=b"{" + b" " * 70_000 + b"}")
    assert status == 413 and reply["code"] == "body_too_large"
    # Values reach SQL only as parameters, after validation: injection text is just bad input.
    for path in (
        "/getTradeHistory?userAddress=0x1'%20OR%201=1--",
        f"/getOrderHistory?userAddress={A}&limit=1;DROP%20TABLE%20events",
        "/getOrderBook?marketId=396%20OR%201=1",
    ):
        status, reply = server.rest.get(path)
        assert status == 400, (path, reply)
    assert server_seq(server) == 0 and server.rest.get("/health")[0] == 200


def test_pushes_take_the_direct_path_and_keep_their_order(server: ThreadedServer) -> None:
    """A reader that keeps up gets pushes written straight to its socket (no queue, no task
    switch), in order after the queued snapshot, and a v2 id still spliced in."""
    deposit(server.rest, A)
    with connect(server) as plain, connect(server) as tagged:
        send(plain, topic="open_orders", address=A)
        send(tagged, topic="open_orders", address=A, id="mine")
        assert recv(plain)["data"] == []
        assert recv(tagged)["message"] == "subscribed"
        assert recv(tagged)["data"] == []
        before = metric(server, "direct_writes")
        for i in range(5):
            limit(server.rest, A, 5000 + i, long=True)
        pushes = [recv(plain) for _ in range(5)]
        tagged_pushes = [recv(tagged) for _ in range(5)]
    assert [len(p["data"]) for p in pushes] == [1, 2, 3, 4, 5]
    assert [p["seq"] for p in pushes] == sorted(p["seq"] for p in pushes)
    assert [p["id"] for p in tagged_pushes] == ["mine"] * 5
    assert [p["data"] for p in tagged_pushes] == [p["data"] for p in pushes]
    assert metric(server, "direct_writes") - before == 10
