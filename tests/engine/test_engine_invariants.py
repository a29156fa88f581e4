"""Property tests: random command streams against the engine's invariants.

Hypothesis draws a list of abstract commands (~6 traders, all three markets, every order kind,
cancels, closes, margin, TP/SL, mark moves large enough to liquidate, index prices, funding
settlements after random jumps of the clock). A small harness turns each
into a concrete engine call against the current state (prices near a per-market centre that
follows the mark, closes sized from the live position, cancels picking real resting ids or bogus
ones) and checks after every command, from the engine's public state and not from its own
bookkeeping:

* a rejected command leaves ``state()`` and ``seq`` exactly as they were;
* no book is crossed, and each book level holds exactly the resting orders on it;
* per market, long lots held equal short lots held;
* money is conserved exactly: free + reserved + margin + unrealised + fee account + insurance
  fund + liquidator + dust equals the deposits minus withdrawals the harness itself accepted;
* a funding settlement happens exactly when it is due (and changes nothing otherwise), and its
  rate, every payment, the dust and the next due time match a computation from the state
  before it;
* no balance, margin or reservation is negative; ``pending_close <= size``; a slot's
  ``pending_opens`` / ``pending_close`` match its resting orders;
* event seqs are gap-free from 1; folding the log (also through JSON) reproduces the state;
  the same commands give a byte-identical log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perps_indexer import errors
from perps_indexer.engine import Engine
from perps_indexer.events import (
    AnyEvent,
    Fill,
    FundingSettled,
    LiquidationSettled,
    PositionState,
    from_json,
    to_json,
)
from perps_indexer.markets import MarketSpec, default_markets
from perps_indexer.units import BPS, ceil_div, normalize_address


def _funding_markets() -> dict[int, MarketSpec]:
    """The bundled markets with funding intervals the streams reach: 396 every 60 s (cap
    75 bps), 397 hourly as bundled, 398 every 7 s with a 20 % cap, so that a payment can take
    a position's whole margin."""
    markets = dict(default_markets())
    markets[396] = msgspec.structs.replace(markets[396], funding_interval_s=60)
    markets[398] = msgspec.structs.replace(
        markets[398], funding_interval_s=7, funding_cap_bps=2_000
    )
    return markets


MARKETS: Mapping[int, MarketSpec] = _funding_markets()
MARKET_IDS = sorted(MARKETS)
# A reference price per market (in ticks, on the tick): APT $6.000, BTC $30000.0, ETH $60.00.
# 396 and 398 share the number on purpose, so that order ids of the two markets can meet.
REFERENCE = {396: 6_000, 397: 300_000, 398: 6_000}
# Traders, written in mixed forms that normalise to six distinct addresses.
TRADERS = ["0x1", "0X02", "0xA", "0x" + "0" * 63 + "b", "0xc0ffee", "0xDEAD"]
LEVERAGES = [1, 2, 3, 5, 10, 20]

Cmd = tuple[Any, ...]

trader = st.integers(0, len(TRADERS) - 1)
# All three markets, 396 (the busiest on the venue) twice as often.
market = st.sampled_from([396, 396, 397, 398])
side = st.booleans()
# Leverage: an index into LEVERAGES, or None for "whatever the slot already uses".
leverage = st.sampled_from([None, None, None, *range(len(LEVERAGES))])
# Limit price offsets in ticks (positive crosses the best opposite quote); mostly small.
offset = st.one_of(st.integers(-8, 8), st.integers(-200, 200))
# Open sizes in multiples of min_lots (0 gives an invalid size below the minimum).
lots = st.sampled_from([1, 1, 2, 2, 3, 4, 6, 8, 0])
# One order in four closes (direction = true).
is_close = st.sampled_from([False, False, False, True])
# Closes as a percentage of the closable size (above 100 is too large).
close_pct = st.sampled_from([10, 25, 50, 100, 150])

deposit = st.tuples(st.just("deposit"), trader, st.integers(-1, 200).map(lambda k: k * 500_000))
limit_order = st.tuples(
    st.just("limit"),
    trader,
    market,
    side,
    is_close,
    lots,
    close_pct,
    offset,
    leverage,
    st.sampled_from([0, 0, 0, 1, 2, 3]),  # restriction: mostly none, so books get depth
    st.one_of(st.none(), st.integers(1, 60)),  # take-profit distance in ticks
    st.one_of(st.none(), st.integers(1, 60)),  # stop-loss distance in ticks
)
market_order = st.tuples(
    st.just("market"), trader, market, side, is_close, lots, close_pct, leverage
)
cancel = st.tuples(
    st.just("cancel"),
    trader,
    market,
    st.lists(st.integers(0, 50), min_size=1, max_size=3),
    st.integers(0, 9),  # 0: add a bogus id
)
add_margin = st.tuples(st.just("add_margin"), trader, market, side, st.integers(0, 3_000_000))
trigger = st.tuples(
    st.just("trigger"),
    trader,
    market,
    side,
    st.booleans(),  # take-profit?
    st.one_of(st.none(), st.integers(-20, 80)),  # distance in ticks from the centre
)
# Mark moves, in basis points from the reference: small drifts and crashes/squeezes.
mark = st.tuples(
    st.just("mark"), market, st.one_of(st.integers(-300, 300), st.integers(-6000, 6000))
)
withdraw = st.tuples(st.just("withdraw"), trader, st.integers(1, 120))  # percent of free
# Index prices in basis points from the current mark: small premiums and ones beyond any cap.
index = st.tuples(
    st.just("index"), market, st.one_of(st.integers(-120, 120), st.integers(-3000, 3000))
)
# A funding settlement after the clock jumps this many seconds (often not due: a no-op).
funding = st.tuples(st.just("funding"), market, st.sampled_from([0, 0, 2, 7, 30, 60, 3_600]))

# Order entry dominates the stream, as it does on a venue.
KINDS = {
    "limit": (limit_order, 8),
    "market": (market_order, 3),
    "cancel": (cancel, 2),
    "mark": (mark, 2),
    "deposit": (deposit, 1),
    "withdraw": (withdraw, 1),
    "add_margin": (add_margin, 1),
    "trigger": (trigger, 2),
    "index": (index, 2),
    "funding": (funding, 2),
}
commands = st.sampled_from([k for k, (_, w) in KINDS.items() for _ in range(w)]).flatmap(
    lambda k: KINDS[k][0]
)


def on_tick(price: int, tick: int) -> int:
    return max(tick, price - price % tick)


@dataclass
class Harness:
    engine: Engine = field(default_factory=lambda: Engine(MARKETS))
    events: list[AnyEvent] = field(default_factory=list)
    deposited: int = 0
    withdrawn: int = 0
    centre: dict[int, int] = field(default_factory=lambda: dict(REFERENCE))
    rejected: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    ts: int = 0
    settlements: list[FundingSettled] = field(default_factory=list)
    capped: int = 0
    """Payments that took a payer's whole (non-zero) margin."""

    def run(self, cmds: list[Cmd]) -> None:
        for cmd in cmds:
            self.step(cmd)

    def step(self, cmd: Cmd) -> None:
        self.ts += 1_000
        before = self.engine.state()
        seq = self.engine.seq
        try:
            new_events = self.execute(cmd)
        except errors.CommandRejected as exc:
            assert exc.code != "error" and exc.message
            assert self.engine.seq == seq, f"{cmd} was rejected ({exc}) but moved seq"
            assert self.engine.state() == before, f"{cmd} was rejected ({exc}) but changed state"
            self.rejected[exc.code] += 1
        else:
            if cmd[0] == "funding" and not new_events:  # not due: a no-op
                assert self.engine.state() == before
                self.rejected["funding_not_due"] += 1
            else:
                assert new_events, f"{cmd} was accepted without an event"
                self.accepted[cmd[0]] += 1
            self.events.extend(new_events)
        self.check()

    # ---------------------------------------------------------------- concrete commands

    def slot_leverage(self, addr: str, market_id: int, is_long: bool, choice: int | None) -> int:
        if choice is None:
            slot = self.engine.positions.get((normalize_address(addr), market_id, is_long))
            return slot.leverage if slot is not None else 2
        return LEVERAGES[choice]

    def held_side(self, addr: str, market_id: int, is_long: bool) -> bool:
        """The side asked for if it holds a position, else the other side if that does."""
        key = normalize_address(addr), market_id
        if self.engine.positions.get((*key, is_long)) is None:
            other = self.engine.positions.get((*key, not is_long))
            if other is not None and other.size:
                return not is_long
        return is_long

    def size_for(
        self, addr: str, market_id: int, is_long: bool, is_close: bool, k: int, pct: int
    ) -> int:
        spec = MARKETS[market_id]
        if not is_close:
            return k * spec.min_lots if k else spec.min_lots - 1
        slot = self.engine.positions.get((normalize_address(addr), market_id, is_long))
        if slot is None or slot.size == 0:
            return spec.min_lots
        closable = slot.size - slot.pending_close
        return max(1, closable * pct // 100)

    def execute(self, cmd: Cmd) -> list[AnyEvent]:
        eng, ts = self.engine, self.ts
        kind = cmd[0]
        if kind == "deposit":
            _, t, amount = cmd
            events = eng.deposit(TRADERS[t], amount, ts=ts)
            self.deposited += amount
            return events
        if kind == "withdraw":
            _, t, pct = cmd
            free = eng.collateral.get(normalize_address(TRADERS[t]), 0)
            amount = max(1, free * pct // 100)  # above 100 % is more than free
            events = eng.withdraw(TRADERS[t], amount, ts=ts)
            self.withdrawn += amount
            return events
        if kind == "limit":
            _, t, m, is_long, is_close, k, pct, off, lev, restriction, tp, sl = cmd
            is_long = self.held_side(TRADERS[t], m, is_long) if is_close else is_long
            tick = MARKETS[m].tick_size
            # Priced from the best opposite quote when there is one, so about half cross.
            book, is_ask = eng.books[m], is_long == is_close
            anchor = book.best_bid() if is_ask else book.best_ask()
            anchor = self.centre[m] if anchor is None else anchor
            price = on_tick(anchor + (-off if is_ask else off) * tick, tick)
            take = None if tp is None or is_close else price + (tp if is_long else -tp) * tick
            stop = None if sl is None or is_close else price - (sl if is_long else -sl) * tick
            return eng.place_limit_order(
                TRADERS[t],
                m,
                is_long=is_long,
                is_close=is_close,
                size=self.size_for(TRADERS[t], m, is_long, is_close, k, pct),
                price=price,
                leverage=self.slot_leverage(TRADERS[t], m, is_long, lev),
                restriction=restriction,
                take_profit=take if take is None or take > 0 else None,
                stop_loss=stop if stop is None or stop > 0 else None,
                ts=ts,
            ).events
        if kind == "market":
            _, t, m, is_long, is_close, k, pct, lev = cmd
            is_long = self.held_side(TRADERS[t], m, is_long) if is_close else is_long
            return eng.place_market_order(
                TRADERS[t],
                m,
                is_long=is_long,
                is_close=is_close,
                size=self.size_for(TRADERS[t], m, is_long, is_close, k, pct),
                leverage=self.slot_leverage(TRADERS[t], m, is_long, lev),
                ts=ts,
            ).events
        if kind == "cancel":
            _, t, m, picks, bogus = cmd
            addr = normalize_address(TRADERS[t])
            mine = sorted(
                oid for oid, o in eng.orders.items() if o.address == addr and o.market_id == m
            )
            ids = [mine[p % len(mine)] for p in picks] if mine else []
            ids = list(dict.fromkeys(ids))  # a repeated id is rejected; keep it unique
            if bogus == 0 or not ids:
                ids.append((999_999 << 64) | 7)
            return eng.cancel_orders(TRADERS[t], m, ids, ts=ts)
        if kind == "add_margin":
            _, t, m, is_long, amount = cmd
            is_long = self.held_side(TRADERS[t], m, is_long)
            return eng.add_margin(TRADERS[t], m, is_long, amount, ts=ts)
        if kind == "trigger":
            _, t, m, is_long, is_tp, dist = cmd
            is_long = self.held_side(TRADERS[t], m, is_long)
            tick = MARKETS[m].tick_size
            price = None
            if dist is not None:
                up = is_long == is_tp  # a long's TP and a short's SL sit above the price
                price = self.centre[m] + (dist if up else -dist) * tick
            if is_tp:
                return eng.update_take_profit(TRADERS[t], m, is_long, price, ts=ts)
            return eng.update_stop_loss(TRADERS[t], m, is_long, price, ts=ts)
        if kind == "index":
            _, m, bps = cmd
            tick = MARKETS[m].tick_size
            return eng.set_index_price(m, on_tick(self.centre[m] * (BPS + bps) // BPS, tick), ts=ts)
        if kind == "funding":
            _, m, jump = cmd
            self.ts = ts = ts + jump * 1_000
            return self.settle(m, ts)
        assert kind == "mark"
        _, m, bps = cmd
        tick = MARKETS[m].tick_size
        price = on_tick(REFERENCE[m] * (10_000 + bps) // 10_000, tick)
        events = eng.set_mark_price(m, price, ts=ts)
        self.centre[m] = price
        return events

    def settle(self, m: int, ts: int) -> list[AnyEvent]:
        """Settle funding and check the settlement against the state before it."""
        eng = self.engine
        spec = MARKETS[m]
        due, mark, index = eng.funding_due.get(m), eng.marks.get(m), eng.index_prices.get(m)
        ready = due is not None and ts >= due and mark is not None and index is not None
        assert eng.funding_ready(ts).count(m) == ready
        held = {k: p for k, p in eng.positions.items() if k[1] == m and p.size}
        dust = eng.dust
        events = eng.settle_funding(m, ts=ts)
        if not ready:
            assert events == []
            return events
        assert mark is not None and index is not None
        ev = events[0]
        assert isinstance(ev, FundingSettled)
        self.settlements.append(ev)
        cap = Fraction(spec.funding_cap_bps, BPS)
        rate = max(-cap, min(cap, Fraction(mark - index, index)))
        assert Fraction(ev.rate_num, ev.rate_den) == rate and ev.rate_den > 0
        assert (ev.mark, ev.index) == (mark, index)
        payers = {k for k, p in held.items() if rate and p.is_long == (rate > 0)}
        expected: dict[tuple[str, int, bool], int] = {}
        for k in payers:
            pos = held[k]
            owed = ceil_div(pos.size * mark * abs(rate.numerator), rate.denominator)
            expected[k] = -min(owed, pos.margin)
            self.capped += pos.margin > 0 and expected[k] == -pos.margin
        pool = -sum(expected.values())
        receiving = sum(p.size for k, p in held.items() if k not in payers)
        for k, pos in held.items():
            if k not in payers:
                expected[k] = pool * pos.size // receiving if pool else 0
        got = {(p.position.address, m, p.position.is_long): p for p in ev.payments}
        assert {k: p.amount for k, p in got.items()} == expected
        for k, payment in got.items():
            after: PositionState = payment.position
            assert after.margin == held[k].margin + payment.amount >= 0
            assert after.added_margin == held[k].added_margin + payment.amount
            assert (after.size, after.value, after.trade_id) == (
                held[k].size,
                held[k].value,
                held[k].trade_id,
            )
        assert ev.dust == dust + sum(-a for a in expected.values() if a < 0) - sum(
            a for a in expected.values() if a > 0
        )
        assert ev.dust - dust < max(1, len(held))  # at most one unit short per receiver
        interval = spec.funding_interval_s * 1000
        assert ev.next_funding % interval == 0 and ts < ev.next_funding <= ts + interval
        assert eng.funding_due[m] == ev.next_funding
        for later in events[1:]:  # what follows is the trigger path at the same mark
            assert not isinstance(later, FundingSettled)
        return events

    # ---------------------------------------------------------------- invariants

    def check(self) -> None:
        eng = self.engine
        # Gap-free sequence from 1, and the engine is at its end.
        assert [e.seq for e in self.events] == list(range(1, len(self.events) + 1))
        assert eng.seq == len(self.events)

        for m, book in eng.books.items():
            assert not book.is_crossed(), f"book {m} is crossed: {book.levels()}"
            for is_ask, levels in ((True, book.asks), (False, book.bids)):
                for price, level in levels.items():
                    assert level.order_ids, f"empty level {price} left in book {m}"
                    assert level.size == sum(level.order_ids.values())
                    for oid, rest in level.order_ids.items():
                        order = eng.orders[oid]
                        assert (order.market_id, order.is_ask, order.price) == (m, is_ask, price)
                        assert order.remaining == rest > 0
        assert sum(len(lv.order_ids) for b in eng.books.values() for lv in b.asks.values()) + sum(
            len(lv.order_ids) for b in eng.books.values() for lv in b.bids.values()
        ) == len(eng.orders)

        # Bought lots equal sold lots, per market.
        for m in MARKET_IDS:
            longs = sum(p.size for k, p in eng.positions.items() if k[1] == m and k[2])
            shorts = sum(p.size for k, p in eng.positions.items() if k[1] == m and not k[2])
            assert longs == shorts, f"market {m}: {longs} long lots vs {shorts} short"

        # Slots and their resting orders agree; nothing is negative.
        opens: Counter[tuple[str, int, bool]] = Counter()
        closes: Counter[tuple[str, int, bool]] = Counter()
        for order in eng.orders.values():
            key = (order.address, order.market_id, order.is_long)
            assert key in eng.positions, f"resting order {order.order_id} has no slot"
            assert order.reserved_margin >= 0 and order.reserved_fee >= 0
            assert 0 < order.remaining <= order.size
            if order.is_close:
                closes[key] += order.remaining
                assert order.reserved_margin == order.reserved_fee == 0
            else:
                opens[key] += 1
        for key, pos in eng.positions.items():
            assert key == (pos.address, pos.market_id, pos.is_long)
            assert pos.trade_id & ((1 << 64) - 1) == pos.market_id
            assert pos.size >= 0 and pos.value >= 0 and pos.margin >= 0
            # Funding paid from a position counts as negative added margin.
            assert pos.added_margin <= pos.margin
            assert pos.size > 0 or pos.pending_opens > 0, f"empty slot {key} not released"
            assert pos.size > 0 or (pos.value == pos.margin == 0)
            assert pos.pending_opens == opens[key]
            assert pos.pending_close == closes[key]
            assert 0 <= pos.pending_close <= pos.size
            assert 1 <= pos.leverage <= MARKETS[pos.market_id].max_leverage
        for addr, free in eng.collateral.items():
            assert free >= 0, f"{addr} has negative free collateral {free}"
        assert eng.fee_account >= 0 and eng.insurance_fund >= 0 and eng.liquidator >= 0
        assert eng.dust >= 0

        # Funding starts with a market's first price and is due on its interval boundaries.
        for m in MARKET_IDS:
            due = eng.funding_due.get(m)
            if m in eng.marks or m in eng.index_prices:
                assert due is not None and due % (MARKETS[m].funding_interval_s * 1000) == 0
            else:
                assert due is None

        # Money is conserved exactly, whatever the marks (unrealised pnl nets to zero).
        marks = {m: on_tick(self.centre[m] + 37 * m, MARKETS[m].tick_size) for m in MARKET_IDS}
        unrealised = 0
        for pos in eng.positions.values():
            exit_value = marks[pos.market_id] * pos.size
            unrealised += exit_value - pos.value if pos.is_long else pos.value - exit_value
        held = (
            sum(eng.collateral.values())
            + sum(o.reserved_margin + o.reserved_fee for o in eng.orders.values())
            + sum(p.margin for p in eng.positions.values())
            + unrealised
            + eng.fee_account
            + eng.insurance_fund
            + eng.liquidator
            + eng.dust
        )
        assert held == self.deposited - self.withdrawn
        ledger = eng.ledger(marks)
        assert ledger.total == held
        assert (ledger.deposits, ledger.withdrawals) == (self.deposited, self.withdrawn)


# Every stream starts with the traders funded (100 million sub-units each), so that orders are
# accepted and books fill; the stream itself deposits and withdraws more.
PROLOGUE: list[Cmd] = [("deposit", t, 100_000_000) for t in range(len(TRADERS))]


def run_stream(cmds: list[Cmd]) -> Harness:
    harness = Harness()
    harness.run(PROLOGUE + cmds)
    replayed = Engine.replay(MARKETS, harness.events)
    assert replayed.state() == harness.engine.state()
    decoded = Engine.replay(MARKETS, [from_json(to_json(e)) for e in harness.events])
    assert decoded.state() == harness.engine.state()
    return harness


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(commands, min_size=30, max_size=150))
def test_random_command_streams_keep_the_invariants(cmds: list[Cmd]) -> None:
    first = run_stream(cmds)
    second = run_stream(cmds)
    assert [to_json(e) for e in first.events] == [to_json(e) for e in second.events]


def _warm_stream(seed: int, n: int) -> list[Cmd]:
    """A fixed busy stream: funded traders quoting both sides, takers, marks, cancels."""
    import random

    rng = random.Random(seed)
    cmds: list[Cmd] = []
    for _ in range(n):
        m = rng.choice(MARKET_IDS)
        t = rng.randrange(len(TRADERS))
        roll = rng.random()
        if roll < 0.45:
            cmds.append(
                (
                    "limit",
                    t,
                    m,
                    rng.random() < 0.5,
                    rng.random() < 0.25,
                    rng.randint(1, 4),
                    rng.choice([25, 50, 100]),
                    rng.randint(-6, 6),
                    rng.choice([None, 1, 3]),
                    rng.choice([0, 0, 0, 1, 2, 3]),
                    rng.choice([None, 30]),
                    rng.choice([None, 30]),
                )
            )
        elif roll < 0.7:
            cmds.append(
                (
                    "market",
                    t,
                    m,
                    rng.random() < 0.5,
                    rng.random() < 0.4,
                    rng.randint(1, 3),
                    rng.choice([50, 100]),
                    None,
                )
            )
        elif roll < 0.8:
            cmds.append(("cancel", t, m, [rng.randrange(50)], 1))
        elif roll < 0.9:
            cmds.append(("mark", m, rng.choice([-4000, -1500, -300, 0, 300, 1500, 4000])))
        elif roll < 0.95:
            cmds.append(("trigger", t, m, rng.random() < 0.5, rng.random() < 0.5, 20))
        else:
            cmds.append(("add_margin", t, m, rng.random() < 0.5, 100_000))
    return cmds


def test_a_long_busy_stream_keeps_the_invariants_and_exercises_every_path() -> None:
    """Not random per run: a long seeded stream that is known to reach liquidations,
    TP/SL closes and self-trade cancels, so the invariants are checked on those paths too."""
    harness = run_stream(_warm_stream(7, 1_500))
    second = run_stream(_warm_stream(7, 1_500))
    assert [to_json(e) for e in harness.events] == [to_json(e) for e in second.events]
    order_types = Counter(
        side.order.order_type
        for e in harness.events
        if isinstance(e, Fill)
        for side in (e.taker, e.maker)
    )
    reasons = Counter(getattr(e, "reason", "") for e in harness.events)
    assert harness.accepted["mark"] > 0
    assert order_types[1] and order_types[2] and order_types[3] and order_types[4]
    assert order_types[13] + order_types[14] > 0, "no liquidation fill in the stream"
    assert sum(order_types[c] for c in (9, 10, 11, 12)) > 0, "no TP/SL fill in the stream"
    assert any(r.startswith("self-trade") for r in reasons), "no self-trade cancel"


def _funding_stream(seed: int, n: int) -> list[Cmd]:
    """The busy stream with index prices and funding settlements mixed in."""
    import random

    rng = random.Random(seed)
    cmds: list[Cmd] = []
    for cmd in _warm_stream(seed, n):
        cmds.append(cmd)
        roll = rng.random()
        m = rng.choice(MARKET_IDS)
        if roll < 0.08:
            cmds.append(("index", m, rng.choice([-2500, -400, -60, 0, 60, 400, 2500])))
        elif roll < 0.16:
            cmds.append(("funding", m, rng.choice([0, 7, 60])))
    return cmds


def test_a_long_stream_with_funding_keeps_the_invariants() -> None:
    """A seeded stream known to settle funding often: payments both ways, payers capped at
    their margin, dust, and liquidations set off by a settlement."""
    harness = run_stream(_funding_stream(11, 1_500))
    second = run_stream(_funding_stream(11, 1_500))
    assert [to_json(e) for e in harness.events] == [to_json(e) for e in second.events]
    settled = harness.settlements
    assert {ev.market_id for ev in settled} == set(MARKET_IDS)
    assert any(ev.rate_num > 0 for ev in settled) and any(ev.rate_num < 0 for ev in settled)
    assert sum(1 for ev in settled for p in ev.payments if p.amount) > 20
    assert harness.capped > 0, "no payer paid its whole margin"
    assert harness.engine.dust > 0
    after_funding = [
        later
        for i, ev in enumerate(harness.events)
        if isinstance(ev, FundingSettled)
        for later in harness.events[i + 1 : i + 4]
        if isinstance(later, LiquidationSettled) and later.ts == ev.ts
    ]
    assert after_funding, "no settlement set off a liquidation"
