"""Thousands of random and malformed frames against running servers, while well-behaved
clients keep receiving correct data.

Two servers: one without a practical inbound rate limit (every garbage frame reaches the
parser) and one with the default limit (abusers are refused, closed with 1008 and come back).
On each, watchers subscribe to the book and to positions and orders of traders whose orders
flow over REST, and abusers throw random bytes as text and binary, broken JSON, huge numbers,
deep nesting, wrong types, unicode and oversize frames. Afterwards every watcher's newest
message of each stream equals the REST state, every seq a watcher saw only increased, the
servers are healthy, and nothing was logged at ERROR.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.server.conftest import Client, ThreadedServer
from tests.server.test_protocol_v2 import running

TRADERS = ["0x" + c * 64 for c in "1234"]
MARKET = 396
SERVER_LOGGERS = {"perps_indexer", "aiohttp", "asyncio"}
ALLOWED_CLOSES = {
    1007,  # a text frame that is not UTF-8
    1008,  # the inbound rate limit
    1009,  # a frame over 64 KiB
}


# ---------------------------------------------------------------------------- garbage


def garbage(rng: random.Random, fatal: bool) -> tuple[str | bytes, bool]:
    """One malformed frame: (payload, sent as a text frame). Only with ``fatal`` are there
    frames that end the connection (not UTF-8, over 64 KiB)."""
    kind = rng.randrange(12)
    if kind == 0:  # random bytes as text (mostly not UTF-8: the server closes with 1007)
        return rng.randbytes(rng.randrange(1, 64)), fatal and rng.random() < 0.1
    if kind == 1:  # random bytes as binary
        return rng.randbytes(rng.randrange(0, 300)), False
    if kind == 2:  # broken JSON: a valid request cut or spliced
        text = json.dumps({"topic": "orderbook", "market_id": "396", "id": rng.randrange(9)})
        cut = rng.randrange(len(text))
        return (text[:cut] + rng.choice(["", "}", "]", ",", '"', "\\", "{{"])), True
    if kind == 3:  # huge numbers
        huge = rng.choice(["1e400", "-1e400", "9" * rng.randrange(20, 6000), "1" + "0" * 30])
        field_ = rng.choice(["market_id", "since", "id", "topic", "op"])
        return f'{{"topic": "orderbook", "market_id": 396, "{field_}": {huge}}}', True
    if kind == 4:  # deep nesting
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        depth = rng.randrange(100, 60_000 // (len(opener) + 1))  # within 64 KiB
        return opener * depth + "1" + closer * rng.choice([0, depth]), True
    if kind == 5:  # wrong types
        value = rng.choice([None, True, 1.5, -1, [], {}, ["positions"], {"a": 1}, "", 2**70])
        request = {"topic": rng.choice(["positions", "orderbook", "trade_history"])}
        request[rng.choice(["topic", "address", "market_id", "id", "since", "op"])] = value
        return json.dumps(request), True
    if kind == 6:  # unicode
        codes = [rng.choice([(32, 0xD800), (0xE000, 0x110000)]) for _ in range(rng.randrange(40))]
        chars = "".join(chr(rng.randrange(*span)) for span in codes)
        template = rng.choice(['{"topic": "%s"}', '{"topic": "positions", "address": "%s"}', "%s"])
        return template % chars.replace('"', "").replace("\\", ""), True
    if kind == 7:  # escapes that are not characters, and look-alike digits
        value = rng.choice(["\\ud800", "\\udfff\\ud800", "\\u0000", "\u00b2", "\u0663\u0669\u0666"])
        return f'{{"topic": "orderbook", "market_id": "{value}", "id": "{value}"}}', True
    if kind == 8:  # oversize (the server closes with 1009)
        if fatal and rng.random() < 0.15:
            return "x" * (64 * 1024 + rng.randrange(1, 5000)), True
        return " " * rng.randrange(1000, 60_000) + "{}", True
    if kind == 9:  # valid but pointless: subscribe / unsubscribe with odd ids
        request = {
            "op": rng.choice(["subscribe", "unsubscribe"]),
            "topic": rng.choice(["positions", "open_orders", "orderbook"]),
            "address": rng.choice(TRADERS),
            "market_id": rng.choice([396, "397", 398]),
            "id": rng.choice([0, -5, "é", "x" * 128, "x" * 129]),
        }
        if rng.random() < 0.3:
            request["since"] = rng.choice([0, 5, 10**6])
        return json.dumps(request), True
    if kind == 10:  # JSON that is not an object
        return rng.choice(["null", "[]", '"positions"', "1", "true", "[{}]", ""]), True
    return rng.choice(["{", "}", "\x00", "{}" * 50, '{"topic":', "{'topic': 'positions'}"]), True


def closes_with(payload: str | bytes, text: bool) -> int | None:
    """The close code a frame must end its connection with (None: it must be answered)."""
    data = payload.encode() if isinstance(payload, str) else payload
    if len(data) > 64 * 1024:
        return 1009
    if text:
        try:
            data.decode()
        except UnicodeDecodeError:
            return 1007
    return None


@dataclass
class Abuser:
    """Sends ``count`` garbage frames, reading what comes back, reconnecting when closed."""

    url: str
    seed: int
    count: int
    fatal: bool = True
    """Whether to send frames that end the connection (each reconnect refills the bucket)."""
    ask_last: bool = False
    """Whether to end with a valid request that must be answered (not under a rate limit)."""
    sent: int = 0
    replies: int = 0
    answers: int = 0
    """Of the replies, errors and acks: what answers a request (the rest are pushes, which
    the order flow makes as often as it likes)."""
    answered_last: bool = False
    closes: dict[int | None, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def run(self) -> None:
        rng = random.Random(self.seed)
        while self.sent < self.count:
            with ws_connect(self.url, open_timeout=10, close_timeout=2, max_size=None) as ws:
                fatal = None
                try:
                    while self.sent < self.count:
                        payload, text = garbage(rng, self.fatal)
                        self.sent += 1
                        ws.send(payload, text=text)
                        fatal = closes_with(payload, text)
                        if fatal is not None:  # the server must close: wait for it
                            self.drain(ws, quiet=5, most=5)
                            self.problems.append(f"not closed after a frame of {fatal}")
                        if self.sent % 16 == 0:
                            self.drain(ws, quiet=0, most=0.5)
                    self.drain(ws, quiet=0.2, most=1)
                    if self.ask_last:
                        self.last_request(ws)
                except ConnectionClosed:
                    pass
                code = ws.close_code
                if fatal is not None:
                    # (1006: the rest of an oversize frame was still unread when the server
                    # closed, so its TCP stack answered with a reset and the close frame was
                    # lost; aiohttp does not linger. Still a close, as it should be.)
                    if code not in (fatal, 1006, 1008):  # (1008: the rate limit came first)
                        self.problems.append(f"closed with {code}, not {fatal}")
                elif code is not None and code not in ALLOWED_CLOSES | {1000}:
                    self.problems.append(f"closed with {code}: {ws.close_reason}")
                self.closes[code] = self.closes.get(code, 0) + 1

    def last_request(self, ws: ClientConnection) -> None:
        """Still serving after all that: a valid request is answered."""
        ws.send(json.dumps({"topic": "orderbook", "market_id": 398, "id": "last"}))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reply = json.loads(ws.recv(timeout=5))
            if reply.get("id") == "last":
                self.answered_last = reply["message"] == "subscribed"
                return

    def drain(self, ws: ClientConnection, *, quiet: float, most: float) -> None:
        """Read replies until none came for ``quiet`` seconds, for at most ``most``."""
        deadline = time.monotonic() + most
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = json.loads(ws.recv(timeout=min(quiet, left)))
            except TimeoutError:
                return
            self.replies += 1
            answer = ("error", "subscribed", "unsubscribed")
            if isinstance(reply, dict) and reply.get("message") in answer:
                self.answers += 1
            if not isinstance(reply, dict) or reply.get("message") not in (
                "error",
                "subscribed",
                "unsubscribed",
                "positions",
                "open_orders",
                "orderbook",
            ):
                self.problems.append(f"unexpected reply {reply!r:.200}")


# ---------------------------------------------------------------------------- watchers


class Watcher:
    """A well-behaved client: subscribes, reads everything, checks every seq only increases."""

    def __init__(
        self, stack: ExitStack, url: str, requests: list[dict[str, Any]], *, v1: bool = False
    ) -> None:
        self.v1 = v1
        self.latest: dict[str, dict[str, Any]] = {}
        self.seqs: dict[str, int] = {}
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if v1:  # the original examples' library, original requests
            self.old = websocket.create_connection(url, timeout=10)
            stack.callback(self.old.close)
            for request in requests:
                self.old.send(json.dumps(request))
            self.old.settimeout(0.1)
            self.recv: Callable[[], str | None] = self._recv_v1
        else:
            self.new = stack.enter_context(
                ws_connect(url, open_timeout=10, close_timeout=2, max_size=None)
            )
            for request in requests:
                self.new.send(json.dumps(request))
            self.recv = self._recv_v2
        self.thread = threading.Thread(target=self.run)
        self.thread.start()
        stack.callback(self.close)  # runs before the connection closes

    def _recv_v1(self) -> str | None:
        try:
            return self.old.recv()  # type: ignore[no-any-return]
        except websocket.WebSocketTimeoutException:
            return None

    def _recv_v2(self) -> str | None:
        try:
            return self.new.recv(timeout=0.1)
        except TimeoutError:
            return None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                text = self.recv()
                if text is not None:
                    self.take(json.loads(text))
        except Exception as exc:  # reported by the test, in its thread
            self.problems.append(f"watcher failed: {exc!r}")

    def take(self, message: dict[str, Any]) -> None:
        if message["message"] in ("subscribed", "error"):
            if message["message"] == "error":
                self.problems.append(f"error reply to a valid request: {message}")
            return
        key = str(message.get("id", message["message"]))
        if self.v1 and set(message) != {"data", "message", "seq"}:
            self.problems.append(f"not an original message: {sorted(message)}")
        with self.lock:
            if message["seq"] < self.seqs.get(key, -1):
                self.problems.append(f"{key}: seq went from {self.seqs[key]} to {message['seq']}")
            self.seqs[key] = message["seq"]
            self.latest[key] = message

    def data(self, key: str) -> Any:
        with self.lock:
            message = self.latest.get(key)
        return None if message is None else message["data"]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


# ---------------------------------------------------------------------------- order flow


def order_flow(rest: Client, stop: threading.Event, seed: int, done: list[int]) -> None:
    rng = random.Random(seed)
    while not stop.is_set() or done[0] < 150:
        trader = rng.choice(TRADERS)
        roll = rng.random()
        order = {"userAddress": trader, "marketId": MARKET, "leverage": 5, "direction": False}
        if roll < 0.6:
            order |= {"price": rng.randrange(5990, 6010), "size": rng.randrange(500, 3000)}
            rest.post("/placeLimitOrder", dict(order, tradeSide=rng.random() < 0.5))
        elif roll < 0.8:
            rest.post("/placeMarketOrder", dict(order, tradeSide=rng.random() < 0.5, size=500))
        else:
            _, opened = rest.get(f"/getOpenOrders?userAddress={trader}")
            ids = [row["order_id"] for row in opened["data"]][:3]
            if ids:
                rest.post(
                    "/cancelMultipleOrders",
                    {"userAddress": trader, "marketId": MARKET, "cancelOrderIds": ids},
                )
        done[0] += 1


# ---------------------------------------------------------------------------- the storm


def rest_data(rest: Client, path: str) -> Any:
    status, reply = rest.get(path)
    assert status == 200, reply
    return reply["data"]


def storm(server: ThreadedServer, abusers: list[Abuser], seed: int) -> None:
    rest = server.rest
    for trader in TRADERS:
        rest.ok("/deposit", {"userAddress": trader, "amount": 10**12})
    a, b, c = TRADERS[:3]
    with ExitStack() as stack:
        watchers = [
            Watcher(
                stack,
                server.ws_url,
                [{"topic": "orderbook", "market_id": "396"}, {"topic": "positions", "address": a}],
                v1=True,
            ),
            Watcher(
                stack,
                server.ws_url,
                [
                    {"topic": "orderbook", "market_id": 396, "id": "book"},
                    {"topic": "positions", "address": b, "id": "pos"},
                    {"topic": "open_orders", "address": c, "id": 7},
                ],
            ),
            Watcher(
                stack,
                server.ws_url,
                [
                    {"topic": "positions", "address": a, "id": "a"},
                    {"topic": "positions", "address": c, "id": "c"},
                    {"topic": "orderbook", "market_id": "396"},
                ],
            ),
        ]
        expected = [
            {
                "orderbook": "/getOrderBook?marketId=396",
                "positions": f"/getPositions?userAddress={a}",
            },
            {
                "book": "/getOrderBook?marketId=396",
                "pos": f"/getPositions?userAddress={b}",
                "7": f"/getOpenOrders?userAddress={c}",
            },
            {
                "a": f"/getPositions?userAddress={a}",
                "c": f"/getPositions?userAddress={c}",
                "orderbook": "/getOrderBook?marketId=396",
            },
        ]
        stop, done = threading.Event(), [0]
        threads = [threading.Thread(target=order_flow, args=(rest, stop, seed, done))]
        threads += [threading.Thread(target=abuser.run) for abuser in abusers]
        try:
            for thread in threads:
                thread.start()
            for thread in threads[1:]:
                thread.join(60)
            stop.set()
            threads[0].join(60)
            assert not any(thread.is_alive() for thread in threads)

            # Every watcher converges on the REST state of each of its streams.
            deadline = time.monotonic() + 10
            for watcher, paths in zip(watchers, expected, strict=True):
                for key, path in paths.items():
                    want = rest_data(rest, path)
                    while watcher.data(key) != want:
                        assert time.monotonic() < deadline, (key, watcher.data(key), want)
                        time.sleep(0.02)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
    for watcher in watchers:
        assert watcher.problems == []
        assert len(watcher.seqs) == (2 if watcher.v1 else 3)
    for abuser in abusers:
        assert abuser.problems == [], abuser.problems[:5]
        assert abuser.sent == abuser.count
    assert done[0] >= 150
    assert rest.get("/health")[0] == 200
    # Everything abusers opened has been cleaned up.
    deadline = time.monotonic() + 5
    while server.call(lambda: len(server.server.connections)) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert server.call(lambda: server.server.per_ip) == {}


def test_garbage_storm_without_a_rate_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with running(tmp_path, rate=1e9, burst=10**9) as server:
        abusers = [Abuser(server.ws_url, seed, 1000, ask_last=True) for seed in (1, 2)]
        storm(server, abusers, seed=11)
        # Every frame reached the server (nothing sent after a frame that ends a connection).
        received = server.call(lambda: server.server.metrics.frames_received)
        assert received >= sum(a.sent for a in abusers) >= 2000
        assert all(a.answered_last for a in abusers)
        assert sum(a.closes.get(1009, 0) + a.closes.get(1007, 0) for a in abusers) > 10
        assert server.call(lambda: server.server.metrics.closed_by_server) == 0
    assert server_errors(caplog) == []


def test_garbage_storm_with_the_default_rate_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with running(tmp_path) as server:
        abusers = [Abuser(server.ws_url, 3, 700), Abuser(server.ws_url, 4, 700, fatal=False)]
        storm(server, abusers, seed=12)
        # Refused, closed with 1008 (however many frames were in flight by then), back again.
        assert abusers[1].closes.get(1008, 0) >= 1
        assert abusers[1].answers < abusers[1].sent
        # (Frames that arrive after a close was decided are not read, so fewer than were sent.)
        assert server.call(lambda: server.server.metrics.frames_received) >= 500
    assert server_errors(caplog) == []


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the server's side logged at ERROR or above (its loop's and its libraries')."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in SERVER_LOGGERS
    ]
