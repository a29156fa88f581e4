"""Protocol cases the real server cannot be made to produce on demand, against a small scripted
server: stale seqs, a rate-limit notice without an id, retryable errors, since_too_old, and a
strict server that refuses the v2 fields."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from perps_indexer.client import Backoff, Client

Script = Callable[[dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]
ROW = {"is_ask": True, "last_updated": "1", "market_id": "396", "price": "6036", "size": "5"}
TRADE = {
    "address": "0x1",
    "fee": "1",
    "last_updated": "1",
    "market_id": "396",
    "order_type": 1,
    "pnl": "0",
    "price": "6000",
    "size": "500",
    "timestamp": "1",
    "trade_id": "7",
}


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A server that hands every request to ``script``; yields its URL and the requests."""
    requests: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        async def send(message: dict[str, Any]) -> None:
            await ws.send(json.dumps(message))

        async for frame in ws:
            request = json.loads(frame)
            requests.append(request)
            await script(request, send)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", requests


def ack(request: dict[str, Any]) -> dict[str, Any]:
    return {"message": "subscribed", "id": request["id"], "topic": request["topic"]}


def data(request: dict[str, Any], seq: int, rows: list[Any]) -> dict[str, Any]:
    return {"data": rows, "message": request["topic"], "seq": seq, "id": request["id"]}


async def test_a_message_older_than_the_last_seen_is_dropped() -> None:
    async def script(request: dict[str, Any], send: Any) -> None:
        await send(ack(request))
        for seq in (5, 3, 6, 6):
            await send(data(request, seq, [{**ROW, "size": str(seq)}]))

    async with scripted(script) as (url, _), Client(url) as client:
        sub = client.subscribe("orderbook", market_id=396)
        got = [await asyncio.wait_for(anext(sub), 5) for _ in range(3)]
        assert [m.seq for m in got] == [5, 6, 6]  # 3 went back in time: dropped
        assert [m.rows[0].size for m in got] == [5, 6, 6]
        assert [m.snapshot for m in got] == [True, False, False]
        assert client.protocol_version == 2


async def test_an_unexplained_rate_limit_notice_means_asking_again() -> None:
    seen: set[str] = set()

    async def script(request: dict[str, Any], send: Any) -> None:
        key = request.get("market_id")
        if key == 397 and key not in seen:
            seen.add(key)  # dropped, like the real server's limiter: the notice has no id
            await send({"message": "error", "error": "rate limit: at most 20 messages per second"})
            return
        await send(ack(request))
        await send(data(request, 1, [{**ROW, "market_id": str(key)}]))

    async with scripted(script) as (url, requests), Client(url, reply_timeout=0.3) as client:
        first = client.subscribe("orderbook", market_id=396)
        await asyncio.wait_for(anext(first), 5)
        second = client.subscribe("orderbook", market_id=397)
        message = await asyncio.wait_for(anext(second), 5)
        assert message.rows[0].market_id == 397 and message.snapshot
        assert [r["market_id"] for r in requests] == [396, 397, 397]


async def test_retryable_errors_are_retried_with_backoff_and_since_too_old_starts_afresh() -> None:
    failures = iter(["internal_error", "overloaded"])

    async def script(request: dict[str, Any], send: Any) -> None:
        if request.get("since") is not None:
            await send(
                {"message": "error", "id": request["id"], "code": "since_too_old", "error": "old"}
            )
            return
        code = next(failures, None)
        if code is not None:
            await send({"message": "error", "id": request["id"], "code": code, "error": "busy"})
            return
        await send(ack(request))
        await send(data(request, 9, [TRADE]))

    backoff = Backoff(base=0.01, cap=0.02, jitter="none")
    async with scripted(script) as (url, requests), Client(url, backoff=backoff) as client:
        sub = client.subscribe("trade_history", address="0x1", since=4)
        message = await asyncio.wait_for(anext(sub), 5)
        assert message.rows[0].trade_id == 7 and message.seq == 9
        assert [r.get("since") for r in requests] == [4, None, None, None]


async def test_a_strict_server_gets_plain_v1_requests() -> None:
    async def script(request: dict[str, Any], send: Any) -> None:
        if set(request) - {"topic", "address", "market_id"}:
            await send({"message": "error", "error": "unexpected field"})
            return
        await send({"data": [ROW], "message": request["topic"]})

    async with scripted(script) as (url, requests), Client(url) as client:
        message = await asyncio.wait_for(anext(client.subscribe("orderbook", market_id=396)), 5)
        assert message.rows[0].price == 6036 and message.seq is None
        assert client.protocol_version == 1
        assert requests[-1] == {"topic": "orderbook", "market_id": 396}
