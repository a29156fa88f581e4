"""The synchronous client against a real server: iterators and callbacks, every topic."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from perps_indexer.client import (
    ClientClosed,
    ConnectionState,
    Message,
    SubscriptionRejected,
    SyncClient,
)
from tests.client.conftest import TOPICS, A, key_of, limit, rest_rows, typed, wait_for
from tests.server.conftest import ThreadedServer


def test_every_topic_through_blocking_iterators(venue: ThreadedServer) -> None:
    with SyncClient(venue.ws_url) as client:
        subs = {topic: client.subscribe(topic, **key_of(topic)) for topic in TOPICS}
        for topic, sub in subs.items():
            message = sub.get(timeout=5)
            assert message.snapshot and message.subscription is sub
            assert message.rows == typed(topic, rest_rows(venue.rest, topic))
        assert client.state is ConnectionState.CONNECTED
        assert client.protocol_version == 2
        limit(venue.rest, A, False, 500, 6100)
        for topic in ("open_orders", "order_history", "orderbook"):
            want = typed(topic, rest_rows(venue.rest, topic))
            for message in subs[topic]:  # the plain ``for`` loop blocks for the next message
                if message.rows == want:
                    break
        with pytest.raises(TimeoutError):
            subs["positions"].get(timeout=0.05)
        subs["positions"].unsubscribe()
        assert list(subs["positions"]) == []  # the iterator has ended
        with pytest.raises(ClientClosed):
            subs["positions"].get(timeout=1)
    assert all(sub.closed for sub in subs.values())
    assert client.state is ConnectionState.CLOSED
    assert not any(t.name == "perps-indexer-client" for t in threading.enumerate())


def test_every_topic_through_callbacks(venue: ThreadedServer) -> None:
    got: dict[str, list[Message[Any]]] = {topic: [] for topic in TOPICS}
    errors: queue.Queue[BaseException] = queue.Queue()
    callers: set[str] = set()

    def collect(message: Message[Any]) -> None:
        callers.add(threading.current_thread().name)
        got[message.topic].append(message)

    with SyncClient(venue.ws_url, v2=False) as client:
        for topic in TOPICS:
            client.subscribe(topic, on_message=collect, **key_of(topic))
        client.subscribe("orderbook", market_id=12345, on_message=collect, on_error=errors.put)
        wait_for(lambda: all(got.values()))
        for topic in TOPICS:
            assert got[topic][0].snapshot
            assert got[topic][0].rows == typed(topic, rest_rows(venue.rest, topic))
        refused = errors.get(timeout=5)
        assert isinstance(refused, SubscriptionRejected) and refused.code == "unknown_market"
        limit(venue.rest, A, True, 500, 5990)
        want = typed("orderbook", rest_rows(venue.rest, "orderbook"))
        wait_for(lambda: got["orderbook"][-1].rows == want)

        # A callback that raises is logged, and the client goes on.
        def boom(message: Message[Any]) -> None:
            raise RuntimeError("a bug in the caller's callback")

        raising = client.subscribe("positions", address=A, on_message=boom)
        wait_for(lambda: raising.inner.last_seq is not None)
        assert client.state is ConnectionState.CONNECTED
    assert callers == {"perps-indexer-client"}
