"""The snapshot race and crash recovery, against real servers."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect as ws_connect

from tests.server.conftest import (
    Client,
    ThreadedServer,
    limit_order,
    market_order,
    spawn_server,
)

TRADERS = ["0x" + c * 64 for c in "1234"]
WATCHED = TRADERS[0]
STATUS_RANK = {"Open": 0, "Partially Filled": 1, "Filled": 2, "Cancelled": 2}


def order_flow(rest: Client, stop: threading.Event, seed: int, acked: list[str]) -> None:
    """Limit orders around 6000, crossing market orders and cancels, until ``stop``."""
    # OSError: the server was killed under us, which is the point of the crash test.
    with contextlib.suppress(OSError):
        _flow(rest, stop, random.Random(seed), acked)


def _flow(rest: Client, stop: threading.Event, rng: random.Random, acked: list[str]) -> None:
    while not stop.is_set():
        trader = rng.choice(TRADERS)
        roll = rng.random()
        if roll < 0.6:
            status, reply = rest.post(
                "/placeLimitOrder",
                limit_order(
                    trader,
                    long=rng.random() < 0.5,
                    size=rng.randrange(500, 3000),
                    price=rng.randrange(5990, 6010),
                    leverage=5,
                ),
            )
        elif roll < 0.8:
            status, reply = rest.post(
                "/placeMarketOrder",
                market_order(trader, long=rng.random() < 0.5, size=500, leverage=5),
            )
        else:
            _, opened = rest.get(f"/getOpenOrders?userAddress={trader}")
            ids = [row["order_id"] for row in opened["data"]][:3]
            if not ids:
                continue
            status, reply = rest.post(
                "/cancelMultipleOrders",
                {
                    "userAddress": trader,
                    "marketId": 396,
                    "cancelOrderIds": ids,
                },
            )
        if status == 200 and "order_id" in reply["data"]:
            acked.append(reply["data"]["order_id"])


def watch(
    url: str, results: dict[int, dict[str, list[Any]]], idx: int, done: threading.Event
) -> None:
    streams: dict[str, list[Any]] = {"orderbook": [], "open_orders": [], "order_history": []}
    results[idx] = streams
    with ws_connect(url) as ws:
        ws.send(json.dumps({"topic": "orderbook", "market_id": "396"}))
        ws.send(json.dumps({"topic": "open_orders", "address": WATCHED}))
        ws.send(json.dumps({"topic": "order_history", "address": WATCHED}))
        quiet_since = None
        while True:
            try:
                message = json.loads(ws.recv(timeout=0.2))
            except TimeoutError:
                if done.is_set():
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 1.5:  # generous: CI may be loaded
                        return
                continue
            quiet_since = None
            streams[message["message"]].append(message["data"])


def check_never_backwards(streams: dict[str, list[Any]]) -> None:
    """Order states only move forward across one subscriber's messages."""
    rank: dict[str, int] = {}
    for rows in streams["order_history"]:
        for row in rows:
            now = STATUS_RANK[row["status"]]
            assert now >= rank.get(row["order_id"], 0), row
            rank[row["order_id"]] = now
    remaining: dict[str, int] = {}
    gone: set[str] = set()
    for rows in streams["open_orders"]:
        current = {row["order_id"]: int(row["remaining_size"]) for row in rows}
        assert not (gone & set(current)), "an order came back to the book"
        for oid, size in current.items():
            assert size <= remaining.get(oid, size)
            remaining[oid] = size
        gone |= set(remaining) - set(current)


def test_subscribers_joining_mid_flow_end_exactly_at_the_rest_state(
    server: ThreadedServer,
) -> None:
    rest = server.rest
    for trader in TRADERS:
        rest.ok("/deposit", {"userAddress": trader, "amount": 10_000_000_000})
    stop, done = threading.Event(), threading.Event()
    acked: list[str] = []
    flows = [
        threading.Thread(target=order_flow, args=(rest, stop, seed, acked)) for seed in range(2)
    ]
    for flow in flows:
        flow.start()
    results: dict[int, dict[str, list[Any]]] = {}
    watchers = []
    for idx in range(16):  # subscribers arrive one by one while orders keep flowing
        thread = threading.Thread(target=watch, args=(server.ws_url, results, idx, done))
        thread.start()
        watchers.append(thread)
        time.sleep(0.12)
    time.sleep(0.5)
    stop.set()
    for flow in flows:
        flow.join()
    # The random flow may have emptied the book; one last order that crosses nothing (a buy
    # far under the asks) makes sure the state every subscriber must end on is not empty.
    rest.ok(
        "/placeLimitOrder", limit_order(TRADERS[1], long=True, size=500, price=5000, leverage=5)
    )
    done.set()
    for thread in watchers:
        thread.join(20)
    assert len(acked) > 50, "the flow should have produced plenty of updates"
    book = rest.get("/getOrderBook?marketId=396")[1]["data"]
    opened = rest.get(f"/getOpenOrders?userAddress={WATCHED}")[1]["data"]
    history = rest.get(f"/getOrderHistory?userAddress={WATCHED}")[1]["data"]
    assert book, "the book should not be empty"
    for idx, streams in results.items():
        assert streams["orderbook"][-1] == book, f"subscriber {idx} ended on a stale book"
        assert streams["open_orders"][-1] == opened, idx
        assert streams["order_history"][-1] == history, idx
        check_never_backwards(streams)


def rest_state(rest: Client) -> dict[str, Any]:
    state = {"book": rest.get("/getOrderBook?marketId=396")[1]["data"]}
    for trader in TRADERS[:2]:
        for call in ("getPositions", "getOpenOrders", "getOrderHistory", "getTradeHistory"):
            state[f"{call}:{trader}"] = rest.get(f"/{call}?userAddress={trader}")[1]["data"]
    return state


def ws_state(url: str) -> dict[str, Any]:
    state = {}
    with ws_connect(url) as ws:
        ws.send(json.dumps({"topic": "orderbook", "market_id": 396}))
        state["book"] = json.loads(ws.recv(timeout=5))["data"]
        for trader in TRADERS[:2]:
            for topic, call in (
                ("positions", "getPositions"),
                ("open_orders", "getOpenOrders"),
                ("order_history", "getOrderHistory"),
                ("trade_history", "getTradeHistory"),
            ):
                ws.send(json.dumps({"topic": topic, "address": trader}))
                state[f"{call}:{trader}"] = json.loads(ws.recv(timeout=5))["data"]
    return state


def test_sigkill_mid_stream_then_restart_on_the_same_db(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    first = spawn_server(db)
    try:
        rest = Client(first.url)
        for trader in TRADERS:
            rest.ok("/deposit", {"userAddress": trader, "amount": 10_000_000_000})
        stop = threading.Event()
        acked: list[str] = []
        flow = threading.Thread(target=order_flow, args=(rest, stop, 7, acked))
        flow.start()
        time.sleep(1.5)
        first.kill()  # mid-stream: requests are in flight
        stop.set()
        flow.join()
    finally:
        if first.proc.poll() is None:
            first.kill()
    assert len(acked) > 20

    second = spawn_server(db)
    try:
        rest = Client(second.url)
        # Every order the API acknowledged survived the crash.
        known = set()
        for trader in TRADERS:
            status, reply = rest.get(f"/getOrderHistory?userAddress={trader}&limit=100000")
            assert status == 200
            known |= {row["order_id"] for row in reply["data"]}
        assert set(acked) <= known
        before = rest_state(rest)
        assert ws_state(second.ws_url) == before
        health = rest.get("/health")[1]["data"]["seq"]
        second.kill()
    finally:
        if second.proc.poll() is None:
            second.kill()

    third = spawn_server(db)
    try:
        rest = Client(third.url)
        assert rest_state(rest) == before
        assert ws_state(third.ws_url) == before
        # Numbering goes on where it stopped.
        reply = rest.ok("/deposit", {"userAddress": TRADERS[0], "amount": 1})
        assert reply["seq"] == health + 1
        third.terminate()
    finally:
        if third.proc.poll() is None:
            third.kill()
