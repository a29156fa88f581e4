"""The venue service: the in-memory window and the store-backed reads agree."""

from __future__ import annotations

import json
from pathlib import Path

from perps_indexer import commands
from perps_indexer.markets import default_markets
from perps_indexer.store import SQLiteStore
from perps_indexer.venue import Venue

A = "0x" + "a" * 64


def test_order_history_order_is_the_same_from_memory_and_from_the_store(tmp_path: Path) -> None:
    clock = iter(range(1_000, 10_000_000, 1_000))
    with SQLiteStore(tmp_path / "v.db") as store:
        venue = Venue(default_markets(), store, clock=lambda: next(clock))
        venue.execute(commands.Deposit(address=A, amount=100_000_000))
        bid = commands.PlaceLimitOrder(
            address=A,
            market_id=396,
            is_long=True,
            is_close=False,
            size=1000,
            price=6000,
            leverage=2,
        )
        venue.execute(bid)
        # An ask that crosses A's own bid: the bid is cancelled (self-trade prevention) after
        # the ask was placed, then the ask rests. The ask's last event is the newest.
        venue.execute(
            commands.PlaceLimitOrder(
                address=A,
                market_id=396,
                is_long=False,
                is_close=False,
                size=800,
                price=5990,
                leverage=2,
            )
        )
        window = venue.order_history(A)  # the in-memory window
        deep = venue.order_history(A, 1_000)  # beyond the window: read from the store
        assert [r.status for r in window] == ["Open", "Cancelled"]
        assert deep == window
        resumed = json.loads(venue.resume("order_history", A, 0))["data"]
        assert [r["order_id"] for r in resumed] == [r.order_id for r in window]
