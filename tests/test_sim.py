"""The demo simulator driving a real engine: activity, safety, determinism."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fractions import Fraction

import msgspec
import pytest

from perps_indexer import errors, events
from perps_indexer.commands import AnyCommand, SetIndexPrice, SettleFunding, execute
from perps_indexer.engine import Engine
from perps_indexer.events import (
    AnyEvent,
    Fill,
    FundingSettled,
    IndexPriceSet,
    LiquidationSettled,
    MarkPriceSet,
    OrderPlaced,
)
from perps_indexer.markets import MarketSpec, default_markets
from perps_indexer.sim import MAX_PREMIUM, DemoSimulator
from perps_indexer.units import normalize_address

START_MS = 1_700_000_000_000


class Run:
    """A simulator and an engine, the server's loop in miniature (with its funding keeper)."""

    def __init__(self, seed: int = 1, markets: Mapping[int, MarketSpec] | None = None) -> None:
        self.markets = default_markets() if markets is None else markets
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
            due = self.engine.funding_ready(self.now)
            self.execute([SettleFunding(market_id=m) for m in due])
            if check is not None:
                check(self)

    def fills(self) -> list[Fill]:
        return [e for e in self.events if isinstance(e, Fill)]

    def settlements(self) -> list[FundingSettled]:
        return [e for e in self.events if isinstance(e, FundingSettled)]


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
    assert run.engine.index_prices == run.engine.marks  # no book yet: no premium
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


def check_premium(run: Run) -> None:
    """The mark is the index plus at most MAX_PREMIUM (and half a tick of rounding)."""
    engine = run.engine
    for m, index in engine.index_prices.items():
        slack = MAX_PREMIUM * index + run.markets[m].tick_size / 2
        assert abs(engine.marks[m] - index) <= slack, (m, engine.marks[m], index)


def test_the_oracle_is_the_index_and_the_funding_rate_moves_within_seconds() -> None:
    run = Run()
    rates: dict[int, set[Fraction]] = {m: set() for m in run.markets}
    premium_steps = dict.fromkeys(run.markets, 0)

    def check(run: Run) -> None:
        check_books(run)
        check_premium(run)
        for m in run.markets:
            rate = run.engine.current_funding_rate(m)
            assert rate is not None
            rates[m].add(rate)
            premium_steps[m] += run.engine.marks[m] != run.engine.index_prices[m]

    run.advance(10, 200, check)
    for m in run.markets:
        moves = [e for e in run.events if isinstance(e, IndexPriceSet) and e.market_id == m]
        assert len(moves) >= 10, f"market {m}: the index moved {len(moves)} times"
        assert len(rates[m]) >= 3, f"market {m}: funding rates {rates[m]}"
        # The premium follows the book, so the mark is off the index a good part of the time.
        assert premium_steps[m] >= 10, f"market {m}: premium in {premium_steps[m]} of 50 steps"
    assert sum(isinstance(e, MarkPriceSet) for e in run.events) >= 30


def test_a_short_funding_interval_settles_in_the_demo_and_conserves_money() -> None:
    """With a market file setting ``funding_interval_s`` to 10, settlements come every 10 s
    and move margin between the bots' positions; replaying the log gives the same state."""
    markets = {
        m: msgspec.structs.replace(spec, funding_interval_s=10)
        for m, spec in default_markets().items()
    }
    run = Run(seed=2, markets=markets)
    run.advance(60, 200, check_premium)
    settled = run.settlements()
    for m in markets:
        mine = [e for e in settled if e.market_id == m]
        # The first prices at START_MS, a multiple of 10 s: due at +10 s, +20 s, ... +60 s.
        assert [e.ts - START_MS for e in mine] == [10_000 * k for k in range(1, 7)], m
        assert [e.next_funding - START_MS for e in mine] == [10_000 * k for k in range(2, 8)]
        assert any(p.amount for e in mine for p in e.payments), f"market {m}: nothing paid"
        assert len({(e.rate_num, e.rate_den) for e in mine}) >= 2
    assert run.rejected < run.commands * 0.10
    ledger = run.engine.ledger()
    assert ledger.total == ledger.deposits - ledger.withdrawals
    assert Engine.replay(markets, run.events).state() == run.engine.state()


def test_resumes_from_the_index_of_a_previous_run() -> None:
    first = Run(seed=4)
    first.advance(20, 200)
    engine = first.engine
    sim = DemoSimulator(first.markets, seed=9)
    commands = sim.bootstrap(engine, first.now + 200)
    assert all(
        abs(sim.oracles[m].price(first.markets[m].tick_size) - engine.index_prices[m])
        <= first.markets[m].tick_size
        for m in first.markets
    )
    # The index does not jump: bootstrap sends no index price.
    assert not any(isinstance(c, SetIndexPrice) for c in commands)
