"""Shared helpers: a seeded venue state and the REST view of every topic."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from perps_indexer.client import Message
from perps_indexer.client.rows import decode_rows
from tests.server.conftest import Client as Rest
from tests.server.conftest import ThreadedServer, start_threaded

A = "0x" + "a" * 64
B = "0x" + "b" * 64
C = "0x" + "c" * 64
MARKET = 396

TOPICS = ("positions", "trade_history", "open_orders", "order_history", "orderbook")
REST_CALLS = {
    "positions": "/getPositions?userAddress=",
    "trade_history": "/getTradeHistory?userAddress=",
    "open_orders": "/getOpenOrders?userAddress=",
    "order_history": "/getOrderHistory?userAddress=",
    "orderbook": "/getOrderBook?marketId=",
}


def key_of(topic: str, address: str = A) -> dict[str, Any]:
    """The subscribe keyword for a topic: address=A, or market_id=396 for the book."""
    return {"market_id": MARKET} if topic == "orderbook" else {"address": address}


def cli_command(topic: str, url: str, *extra: str, address: str = A) -> list[str]:
    """``perps-indexer subscribe`` for a topic of address A (or market 396)."""
    key = ["--market-id", str(MARKET)] if topic == "orderbook" else ["--address", address]
    return [sys.executable, "-m", "perps_indexer", "subscribe", topic, *key, "--url", url, *extra]


def rest_rows(rest: Rest, topic: str, address: str = A) -> list[Any]:
    """A topic's current rows as the REST API reports them (the same JSON as the stream)."""
    key = MARKET if topic == "orderbook" else address
    status, reply = rest.get(REST_CALLS[topic] + str(key))
    assert status == 200, reply
    return list(reply["data"])


def typed(topic: str, rows: list[Any]) -> tuple[Any, ...]:
    return decode_rows(topic, rows)


def limit(rest: Rest, address: str, is_long: bool, size: int, price: int) -> str:
    reply = rest.ok(
        "/placeLimitOrder",
        {
            "userAddress": address,
            "marketId": MARKET,
            "tradeSide": is_long,
            "direction": False,
            "size": size,
            "price": price,
            "leverage": 2,
        },
    )
    return str(reply["order_id"])


def seed(rest: Rest) -> None:
    """Every topic non-empty for A: a resting bid, a filled buy (position, trades), a book."""
    for address in (A, B, C):
        rest.ok("/deposit", {"userAddress": address, "amount": 10_000_000_000})
    limit(rest, A, True, 1000, 6002)
    limit(rest, B, False, 1000, 6050)
    rest.ok(
        "/placeMarketOrder",
        {
            "userAddress": A,
            "marketId": MARKET,
            "tradeSide": True,
            "direction": False,
            "size": 500,
            "leverage": 2,
        },
    )


async def until(
    sub: Any, accept: Callable[[Message[Any]], bool], timeout: float = 5.0
) -> Message[Any]:
    """The first message of an async subscription that ``accept`` takes."""
    async with asyncio.timeout(timeout):
        async for message in sub:
            if accept(message):
                return message
    raise AssertionError("the subscription ended")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture
def venue(tmp_path: Path) -> Iterator[ThreadedServer]:
    """A real server on port 0, in a thread, with every topic of address A non-empty."""
    running, stop = start_threaded(tmp_path)
    try:
        seed(running.rest)
        yield running
    finally:
        stop()
