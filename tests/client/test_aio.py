"""The asyncio client against a real server: every topic, routing, errors, unsubscribe."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from perps_indexer.client import Client, Subscription, SubscriptionRejected
from tests.client.conftest import (
    TOPICS,
    A,
    C,
    key_of,
    limit,
    rest_rows,
    typed,
    until,
)
from tests.server.conftest import ThreadedServer

pytestmark = pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])


def current(venue: ThreadedServer, topic: str, address: str = A) -> Any:
    rows = rest_rows(venue.rest, topic, address)
    return lambda m: m.rows == typed(topic, rows)


async def test_every_topic_snapshot_then_updates(venue: ThreadedServer, v2: bool) -> None:
    async with Client(venue.ws_url, v2=v2) as client:
        subs: dict[str, Subscription[Any]] = {
            topic: client.subscribe(topic, **key_of(topic)) for topic in TOPICS
        }
        for topic, sub in subs.items():
            message = await asyncio.wait_for(anext(sub), 5)
            rest = rest_rows(venue.rest, topic)
            assert rest, f"seed left {topic} empty"
            assert message.snapshot and message.topic == topic
            assert message.rows == typed(topic, rest)
            assert message.data == rest == json.loads(message.raw)["data"]
            assert message.subscription is sub
            assert isinstance(message.seq, int)
            assert ("id" in json.loads(message.raw)) is v2
        assert client.protocol_version == (2 if v2 else 1)

        limit(venue.rest, A, True, 700, 6001)  # changes open_orders, order_history, orderbook
        for topic in ("open_orders", "order_history", "orderbook"):
            message = await until(subs[topic], current(venue, topic))
            assert not message.snapshot


async def test_same_topic_for_two_addresses_routes_by_key(venue: ThreadedServer, v2: bool) -> None:
    async with Client(venue.ws_url, v2=v2) as client:
        mine = client.subscribe("open_orders", address=A)
        other = client.subscribe("open_orders", address=C)
        assert (await anext(mine)).rows == typed(
            "open_orders", rest_rows(venue.rest, "open_orders")
        )
        assert (await asyncio.wait_for(anext(other), 5)).rows == ()  # the empty first reply

        c_order = limit(venue.rest, C, True, 600, 5990)
        await until(other, current(venue, "open_orders", C))
        # A's list did not change, so A's subscription got nothing.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(mine), 0.3)

        # C's list empties while A's still has rows: an empty message names no key (v1).
        venue.rest.ok(
            "/cancelMultipleOrders",
            {"userAddress": C, "marketId": 396, "cancelOrderIds": [c_order]},
        )
        await until(other, lambda m: m.rows == ())
        await asyncio.sleep(0.3)  # any re-read of A settles
        a_rows = typed("open_orders", rest_rows(venue.rest, "open_orders"))
        assert a_rows
        while True:  # A's subscription, if it got anything, ends on A's true state
            try:
                last = await asyncio.wait_for(anext(mine), 0.1)
            except TimeoutError:
                break
            assert last.rows == a_rows


async def test_two_local_subscriptions_share_one_stream(venue: ThreadedServer, v2: bool) -> None:
    async with Client(venue.ws_url, v2=v2) as client:
        first = client.subscribe("positions", address=A)
        one = await asyncio.wait_for(anext(first), 5)
        second = client.subscribe("positions", address="0x" + "A" * 64)  # same stream
        two = await asyncio.wait_for(anext(second), 5)
        assert two.snapshot and two.rows == one.rows and two.subscription is second
        assert first.id == second.id
        second.unsubscribe()
        with pytest.raises(StopAsyncIteration):
            await anext(second)
        venue.rest.ok(
            "/placeMarketOrder",
            {
                "userAddress": A,
                "marketId": 396,
                "tradeSide": True,
                "direction": False,
                "size": 500,
                "leverage": 2,
            },
        )
        await until(first, current(venue, "positions"))


@pytest.mark.parametrize(
    ("topic", "key", "code"),
    [
        ("positions", {"address": "0xZZ"}, "invalid_address"),
        ("fills", {"address": A}, "unknown_topic"),
        ("orderbook", {"market_id": 999}, "unknown_market"),
    ],
)
async def test_a_refused_subscription_ends_alone(
    venue: ThreadedServer, v2: bool, topic: str, key: dict[str, Any], code: str
) -> None:
    async with Client(venue.ws_url, v2=v2) as client:
        good = client.subscribe("orderbook", market_id=396)
        await asyncio.wait_for(anext(good), 5)
        bad = client.subscribe(topic, **key)
        with pytest.raises(SubscriptionRejected) as caught:
            await asyncio.wait_for(anext(bad), 5)
        assert caught.value.code == code
        assert caught.value.subscription is bad
        assert bad.closed and bad.error is caught.value
        limit(venue.rest, A, True, 500, 5995)
        await until(good, current(venue, "orderbook"))  # the connection goes on


async def test_unsubscribe(venue: ThreadedServer, v2: bool) -> None:
    def held() -> int:
        return int(venue.call(lambda: venue.server.venue.hub.subscription_count))  # type: ignore[union-attr]

    async with Client(venue.ws_url, v2=v2) as client:
        book = client.subscribe("orderbook", market_id=396)
        orders = client.subscribe("open_orders", address=A)
        await asyncio.wait_for(anext(book), 5)
        await asyncio.wait_for(anext(orders), 5)
        assert held() == 2
        async with book:
            pass  # leaving the block unsubscribes
        with pytest.raises(StopAsyncIteration):
            await anext(book)
        limit(venue.rest, A, True, 500, 5994)
        await until(orders, current(venue, "open_orders"))
        # v2 tells the server; v1 cannot, and the client drops what still comes.
        for _ in range(100):
            if held() == 1:
                break
            await asyncio.sleep(0.02)
        assert held() == (1 if v2 else 2)
        again = client.subscribe("orderbook", market_id=396)
        message = await until(again, current(venue, "orderbook"))
        assert message.snapshot
