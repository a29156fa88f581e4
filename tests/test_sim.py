"""The demo simulator driving a real engine: activity, safety, determinism."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from perps_indexer import errors, events
from perps_indexer.commands import AnyCommand, execute
from perps_indexer.engine import Engine
from perps_indexer.events import AnyEvent, Fill, LiquidationSettled, OrderPlaced
from perps_indexer.markets import default_markets
from perps_indexer.sim import DemoSimulator
from perps_indexer.units import normalize_address

START_MS = 1_700_000_000_000


class Run:
    """A simulator and an engine, the server's loop in miniature."""

    def __init__(self, seed: int = 1) -> None:
        self.markets = default_markets()
        self.engine = Engine(self.markets)
        self.sim = DemoSimulator(self.markets, seed=seed)
        self.events: list[AnyEvent] = []
        self.commands = 0
        self.rejected = 0
        self.now = START_MS
        self.execute(self.sim.bootstrap(self.engine, self.now))
        self.start_marks = dict(self.engine.marks)

    def execute(self, commands: list[AnyCommand]) -> None:
        for command in commands:
            self.commands += 1
            try:
                self.events.extend(execute(self.engine, command, self.now).events)
            except errors.CommandRejected:
                self.rejected += 1

    def advance(
        self, seconds: float, step_ms: int, check: Callable[[Run], None] | None = None
    ) -> None:
        for _ in range(round(seconds * 1000 / step_ms)):
            self.now += step_ms
            self.execute(self.sim.step(self.engine, self.now))
            if check is not None:
                check(self)

    def fills(self) -> list[Fill]:
        return [e for e in self.events if isinstance(e, Fill)]


def check_books(run: Run) -> None:
    for m, book in run.engine.books.items():
        assert book.best_bid() is not None, f"market {m} has no bids"
        assert book.best_ask() is not None, f"market {m} has no asks"
        assert not book.is_crossed(), f"market {m} is crossed"


def check_books_and_marks(run: Run) -> None:
    check_books(run)
    for m, mark in run.engine.marks.items():
        assert 0.5 <= mark / run.start_marks[m] <= 2.0, f"market {m} mark {mark} ran away"


def test_bootstrap_builds_deep_books_at_the_starting_prices() -> None:
    run = Run()
    assert run.rejected == 0
    assert run.engine.marks == {396: 6050, 397: 600000, 398: 300000}
    for m, book in run.engine.books.items():
        asks, bids = book.levels()
        assert len(asks) >= 12 and len(bids) >= 12, m
        spec = run.markets[m]
        assert all(p % spec.tick_size == 0 for p, _ in asks + bids)
        assert all(spec.min_lots <= o.size <= spec.max_lots for o in run.engine.orders.values())
    check_books(run)
    funded = set(run.engine.collateral)
    assert funded == set(run.sim.addresses)


def test_addresses_are_normalised_and_distinct() -> None:
    sim = DemoSimulator(default_markets())
    addresses = sim.addresses
    assert len(set(addresses)) == len(addresses)
    assert all(normalize_address(a) == a for a in addresses)
    assert sim.featured_address in addresses
    assert sim.featured_market == 396


def test_step_only_reads_the_engine() -> None:
    run = Run()
    run.advance(5, 200)
    before = run.engine.state()
    commands = run.sim.step(run.engine, run.now + 200)
    assert commands
    assert run.engine.state() == before


def test_every_topic_moves_within_ten_seconds() -> None:
    run = Run()
    run.advance(10, 200, check_books)
    assert {f.market_id for f in run.fills()} == {396, 397, 398}
    featured = run.sim.featured_address
    engine = run.engine
    assert any(p.size > 0 for (addr, _, _), p in engine.positions.items() if addr == featured), (
        "the featured address holds no position"
    )
    resting = [o for o in engine.orders.values() if o.address == featured]
    assert any(not o.is_close for o in resting), "the featured address has no resting open order"
    placed = [e for e in run.events if isinstance(e, OrderPlaced) and e.order.address == featured]
    assert len(placed) >= 3
    trades = [f for f in run.fills() if featured in (f.taker.order.address, f.maker.order.address)]
    assert trades, "the featured address has no trade history"


def test_half_an_hour_liquidates_triggers_and_conserves_money() -> None:
    run = Run(seed=3)
    # Every 500 ms rather than the server's 200 ms keeps the test quick; activity follows
    # elapsed time, not the number of calls.
    run.advance(30 * 60, 500, check_books_and_marks)
    assert any(isinstance(e, LiquidationSettled) for e in run.events)
    assert any(9 <= f.taker.order.order_type <= 12 for f in run.fills())
    assert run.rejected < run.commands * 0.10
    ledger = run.engine.ledger()
    assert ledger.total == run.engine.deposits - run.engine.withdrawals


def test_activity_follows_elapsed_time_not_call_rate() -> None:
    fast, slow = Run(seed=5), Run(seed=5)
    fast.advance(5 * 60, 200)
    slow.advance(5 * 60, 1000)
    ratio = len(fast.fills()) / len(slow.fills())
    assert 0.5 < ratio < 2.0


def test_same_seed_same_event_log() -> None:
    logs = []
    for seed in (11, 11, 12):
        run = Run(seed=seed)
        run.advance(120, 200)
        logs.append([events.to_json(e) for e in run.events])
    assert logs[0] == logs[1]
    assert logs[0] != logs[2]


def test_rejects_an_empty_market_set() -> None:
    with pytest.raises(ValueError, match="at least one market"):
        DemoSimulator({})
