"""Real events for the store tests, produced by driving the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from perps_indexer.engine import Engine
from perps_indexer.engine.engine import OrderResult
from perps_indexer.events import AnyEvent
from perps_indexer.markets import default_markets
from perps_indexer.store.sqlite import SQLiteStore

TRADER = "0x" + "11" * 32
MAKER = "0x" + "22" * 32
LIQUIDITY = "0x" + "33" * 32
MARKET = 396
OTHER_MARKET = 397


def drive_engine() -> tuple[Engine, list[AnyEvent]]:
    """A session that produces every event type: deposits, a withdrawal, resting and crossing
    orders, a cancel, TP/SL, added margin, a liquidation through a mark price, an index price
    and a funding settlement."""
    engine = Engine(default_markets())
    events: list[AnyEvent] = []
    ts = 1_000

    def run(produced: list[AnyEvent] | OrderResult) -> None:
        nonlocal ts
        ts += 1_000
        events.extend(produced.events if isinstance(produced, OrderResult) else produced)

    def open_limit(address: str, market: int, long: bool, size: int, price: int) -> OrderResult:
        """A limit order opening a position at leverage 2."""
        return engine.place_limit_order(
            address,
            market,
            is_long=long,
            is_close=False,
            size=size,
            price=price,
            leverage=2,
            ts=ts,
        )

    for address in (TRADER, MAKER, LIQUIDITY):
        run(engine.deposit(address, 100_000_000, ts=ts))
    run(engine.withdraw(LIQUIDITY, 1_000_000, ts=ts))
    # The maker's bid rests; the trader's market short fills against it (leverage 10).
    run(open_limit(MAKER, MARKET, True, 1000, 6050))
    run(
        engine.place_market_order(
            TRADER, MARKET, is_long=False, is_close=False, size=1000, leverage=10, ts=ts
        )
    )
    # A resting order in another market, then cancelled by its owner.
    other = open_limit(MAKER, OTHER_MARKET, True, 100, 500_000)
    run(other)
    run(engine.cancel_orders(MAKER, OTHER_MARKET, [other.order_id], ts=ts))
    run(engine.update_take_profit(TRADER, MARKET, False, 5000, ts=ts))
    run(engine.update_stop_loss(MAKER, MARKET, True, 5000, ts=ts))
    run(engine.add_margin(MAKER, MARKET, True, 10_000, ts=ts))
    # Liquidity above the short's entry, then a mark at its price, past the short's
    # liquidation price (about 6493), liquidates the short through it.
    run(open_limit(LIQUIDITY, MARKET, False, 5000, 6500))
    run(engine.set_mark_price(MARKET, 6500, ts=ts))
    # An index under the mark, then the hourly funding settlement: longs pay shorts.
    run(engine.set_index_price(MARKET, 6450, ts=ts))
    ts = 3_600_000
    settled = engine.settle_funding(MARKET, ts=ts)
    assert any(p.amount for ev in settled for p in getattr(ev, "payments", ()))
    run(settled)
    return engine, events


@pytest.fixture(scope="session")
def session() -> tuple[Engine, list[AnyEvent]]:
    return drive_engine()


@pytest.fixture
def events(session: tuple[Engine, list[AnyEvent]]) -> list[AnyEvent]:
    return list(session[1])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(db_path) as opened:
        yield opened


def deposits(count: int, start_seq: int = 1) -> list[AnyEvent]:
    """``count`` deposit events with seqs from ``start_seq``, from a real engine."""
    engine = Engine(default_markets())
    engine.seq = start_seq - 1
    return [ev for i in range(count) for ev in engine.deposit(TRADER, i + 1, ts=i)]
