"""Funding: hand-computed settlements, the margin-capped payer, timing, replay and no-op cases.

Market 396 (APT/USDC): tick 1, min 500 lots, maintenance 2.5 %, taker fee 5 bps rounded up,
maker fee 0, funding every 3600 s (3,600,000 ms), rate capped at 75 bps.

rate = clamp((mark - index) / index, -cap, +cap), exact; positive: longs pay shorts. A payer
owes ceil(size * mark * |rate|) and pays at most its margin; receivers share what was paid
pro rata by size, rounded down; the remainder goes to the dust account.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import msgspec
import pytest

from perps_indexer import errors
from perps_indexer.commands import Deposit, SetIndexPrice, SetMarkPrice, SettleFunding, execute
from perps_indexer.engine import Engine
from perps_indexer.events import (
    AnyEvent,
    Fill,
    FundingSettled,
    IndexPriceSet,
    LiquidationSettled,
    OrderPlaced,
    PositionReleased,
    PositionState,
    from_json,
    to_json,
)
from perps_indexer.markets import MarketSpec, default_markets
from perps_indexer.units import liquidation_price, normalize_address

L1, L2, S1, S2, M = (normalize_address(f"0x{c}") for c in ("11", "12", "21", "22", "99"))
BIG = 1_000_000_000
HOUR = 3_600_000


class Venue:
    """An engine that records every event it commits (so the log can be replayed)."""

    def __init__(self, markets: dict[int, MarketSpec] | None = None) -> None:
        self.markets = dict(default_markets()) if markets is None else markets
        self.engine = Engine(self.markets)
        self.log: list[AnyEvent] = []
        commit = self.engine.apply

        def apply(event: AnyEvent) -> None:
            commit(event)
            self.log.append(event)

        self.engine.apply = apply  # type: ignore[method-assign]

    def pos(self, addr: str, long: bool) -> PositionState:
        return self.engine.positions[(addr, 396, long)]

    def margins(self) -> dict[str, tuple[int, int]]:
        """``(margin, added_margin)`` by address, for scenarios of one slot per address."""
        return {p.address: (p.margin, p.added_margin) for p in self.engine.positions.values()}

    def liq(self, addr: str, long: bool) -> float:
        return self.engine.liq_price(self.pos(addr, long))

    def check_replay(self) -> None:
        replayed = Engine.replay(self.markets, self.log)
        assert replayed.state() == self.engine.state()
        decoded = Engine.replay(self.markets, [from_json(to_json(e)) for e in self.log])
        assert decoded.state() == self.engine.state()
        ledger = self.engine.ledger()
        assert ledger.total == ledger.deposits - ledger.withdrawals


def four_positions() -> Venue:
    """Two longs and two shorts at 6000, all opened by ts 8000.

    S1 rests an ask 700 @ 6000 at 2x: reserves ceil(4,200,000 / 2) = 2,100,000.
    S2 rests an ask 500 @ 6000 at 4x: reserves ceil(3,000,000 / 4) = 750,000.
    L1 buys 700 at market, 5x: meets S1 (first in time); margin ceil(4,200,000 / 5) = 840,000.
    L2 buys 500 at market, 10x: meets S2; margin ceil(3,000,000 / 10) = 300,000.
    """
    v = Venue()
    e = v.engine
    for i, addr in enumerate((L1, L2, S1, S2)):
        e.deposit(addr, BIG, ts=1_000 * (i + 1))
    e.place_limit_order(
        S1, 396, is_long=False, is_close=False, size=700, price=6000, leverage=2, ts=5_000
    )
    e.place_limit_order(
        S2, 396, is_long=False, is_close=False, size=500, price=6000, leverage=4, ts=6_000
    )
    e.place_market_order(L1, 396, is_long=True, is_close=False, size=700, leverage=5, ts=7_000)
    e.place_market_order(L2, 396, is_long=True, is_close=False, size=500, leverage=10, ts=8_000)
    margins = {a: v.pos(a, a in (L1, L2)).margin for a in (L1, L2, S1, S2)}
    assert margins == {L1: 840_000, L2: 300_000, S1: 2_100_000, S2: 750_000}
    return v


def test_two_intervals_hand_computed() -> None:
    v = four_positions()
    e = v.engine
    assert e.funding_due == {}
    e.set_index_price(396, 6000, ts=9_000)
    # The market's first price (ts 9,000) starts the clock: due at the next hour boundary.
    assert e.funding_due == {396: HOUR}
    e.set_mark_price(396, 6031, ts=10_000)
    assert e.funding_due == {396: HOUR}  # a later price does not move it
    # Premium 31 / 6000 = 51.67 bps, inside the 75 bps cap.
    assert e.current_funding_rate(396) == Fraction(31, 6000)
    liq_before = {a: v.liq(a, a in (L1, L2)) for a in (L1, L2, S1, S2)}
    # L1 before: 6000 * (1 - 1/5) / 0.975 = 4923.0769...
    assert liq_before[L1] == pytest.approx(4923.076923, abs=1e-6)

    assert e.settle_funding(396, ts=HOUR - 1) == []  # one millisecond early: nothing
    events = e.settle_funding(396, ts=HOUR)
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, FundingSettled)
    assert (ev.market_id, ev.mark, ev.index, ev.rate_num, ev.rate_den) == (
        396,
        6031,
        6000,
        31,
        6000,
    )
    # Longs pay: 6031 * 31 = 186,961 per lot / 6000.
    # L1 owes 700 * 186,961 / 6000 = 130,872,700 / 6000 = 21,812.116... -> 21,813
    # L2 owes 500 * 186,961 / 6000 =  93,480,500 / 6000 = 15,580.083... -> 15,581
    # Paid 37,394, shared by the shorts' 1,200 lots:
    # S1 gets 37,394 * 700 // 1200 = 26,175,800 // 1200 = 21,813 (.166 dropped)
    # S2 gets 37,394 * 500 // 1200 = 18,697,000 // 1200 = 15,580 (.833 dropped)
    # Received 37,393: one unit of dust.
    amounts = {p.position.address: p.amount for p in ev.payments}
    assert amounts == {L1: -21_813, L2: -15_581, S1: 21_813, S2: 15_580}
    assert [p.position.address for p in ev.payments] == [S1, S2, L1, L2]  # slot order
    assert ev.dust == 1 and e.dust == 1
    assert ev.next_funding == 2 * HOUR and e.funding_due == {396: 2 * HOUR}
    # L1 840,000 - 21,813 = 818,187; L2 300,000 - 15,581 = 284,419;
    # S1 2,100,000 + 21,813 = 2,121,813; S2 750,000 + 15,580 = 765,580.
    assert v.margins() == {
        L1: (818_187, -21_813),
        L2: (284_419, -15_581),
        S1: (2_121_813, 21_813),
        S2: (765_580, 15_580),
    }
    assert all(p.position == v.pos(p.position.address, p.position.is_long) for p in ev.payments)
    assert all(p.position.updated == HOUR for p in ev.payments)
    # Margins 3,990,000 before; 818,187 + 284,419 + 2,121,813 + 765,580 = 3,989,999, + 1 dust.
    # A payer's liquidation price moves towards the mark, a receiver's away from it:
    # L1: 6000 * (1 - 0.2 + 21,813 / 4,200,000) / 0.975 = 4955.0374...
    assert v.liq(L1, True) == pytest.approx(4955.037363, abs=1e-6)
    assert v.liq(L1, True) > liq_before[L1] and v.liq(L2, True) > liq_before[L2]
    # S1: 6000 * (1 + 0.5 + 21,813 / 4,200,000) / 1.025 = 9031.16143 / 1.025 = 8810.88920
    assert v.liq(S1, False) == pytest.approx(8810.889199, abs=1e-6)
    assert v.liq(S1, False) > liq_before[S1] and v.liq(S2, False) > liq_before[S2]
    assert e.settle_funding(396, ts=HOUR + 1) == []  # settled: the next is an hour away
    v.check_replay()

    # Interval 2: the index moves above the mark; premium -57 / 6100 = -93.4 bps is clamped
    # to -75 bps = -3/400, and shorts pay.
    e.set_index_price(396, 6100, ts=4_000_000)
    e.set_mark_price(396, 6043, ts=4_000_001)
    assert e.current_funding_rate(396) == Fraction(-3, 400)
    # Settled 3.8 million ms after it was due (more than an interval late): once, and the next
    # is due at the first boundary after now, 4 hours.
    assert e.funding_ready(11_000_000) == [396]
    (ev,) = e.settle_funding(396, ts=11_000_000)
    assert isinstance(ev, FundingSettled)
    assert (ev.rate_num, ev.rate_den, ev.mark, ev.index) == (-3, 400, 6043, 6100)
    # S1 owes 700 * 6043 * 3 / 400 = 12,690,300 / 400 = 31,725.75 -> 31,726
    # S2 owes 500 * 6043 * 3 / 400 =  9,064,500 / 400 = 22,661.25 -> 22,662
    # Paid 54,388, shared by the longs' 1,200 lots:
    # L1 gets 54,388 * 700 // 1200 = 38,071,600 // 1200 = 31,726 (.333 dropped)
    # L2 gets 54,388 * 500 // 1200 = 27,194,000 // 1200 = 22,661 (.666 dropped)
    # One more unit of dust: 2.
    amounts = {p.position.address: p.amount for p in ev.payments}
    assert amounts == {S1: -31_726, S2: -22_662, L1: 31_726, L2: 22_661}
    assert ev.dust == 2 and e.dust == 2
    assert ev.next_funding == 4 * HOUR and e.funding_due == {396: 4 * HOUR}
    # S1 2,121,813 - 31,726 = 2,090,087, added 21,813 - 31,726 = -9,913
    # S2 765,580 - 22,662 = 742,918, added 15,580 - 22,662 = -7,082
    # L1 818,187 + 31,726 = 849,913, added 9,913; L2 284,419 + 22,661 = 307,080, added 7,080
    assert v.margins() == {
        S1: (2_090_087, -9_913),
        S2: (742_918, -7_082),
        L1: (849_913, 9_913),
        L2: (307_080, 7_080),
    }
    # 849,913 + 307,080 + 2,090,087 + 742,918 = 3,989,998, + 2 dust = 3,990,000.
    margins = sum(p.margin for p in e.positions.values())
    assert margins + e.dust == 3_990_000
    # Now S1's cushion is below its opening one:
    # 6000 * (1.5 - 9,913 / 4,200,000) / 1.025 = 8985.83857 / 1.025 = 8766.67178
    assert v.liq(S1, False) == pytest.approx(8766.671777, abs=1e-6)
    assert v.liq(S1, False) < liq_before[S1]
    assert v.liq(S1, False) == liquidation_price(4_200_000, 700, 2, False, 250, -9_913)
    # Free collateral never moves in a settlement.
    assert e.collateral[L1] == BIG - 840_000 - 2_100  # margin and the 5 bps taker fee
    assert e.collateral[S1] == BIG - 2_100_000  # the reservation became its margin
    v.check_replay()


def payer_exhausted(liquidity: bool = True) -> tuple[Venue, list[AnyEvent]]:
    """A short at 20x pays all its margin (the cap raised to 10 %); it is liquidated if
    ``liquidity`` offers it something to buy."""
    markets = dict(default_markets())
    markets[396] = msgspec.structs.replace(markets[396], funding_cap_bps=1_000)
    v = Venue(markets)
    e = v.engine
    for i, addr in enumerate((L1, S1, M)):
        e.deposit(addr, BIG, ts=1_000 * (i + 1))
    # S1 shorts 1000 @ 6000 at 20x (maker): margin ceil(6,000,000 / 20) = 300,000.
    e.place_limit_order(
        S1, 396, is_long=False, is_close=False, size=1000, price=6000, leverage=20, ts=4_000
    )
    e.place_market_order(L1, 396, is_long=True, is_close=False, size=1000, leverage=2, ts=5_000)
    if liquidity:  # M offers 1000 @ 5950: what the liquidation will buy.
        e.place_limit_order(
            M, 396, is_long=False, is_close=False, size=1000, price=5950, leverage=2, ts=6_000
        )
    e.set_index_price(396, 6300, ts=7_000)
    # Mark 5900: S1's liquidation price is 6000 * 1.05 / 1.025 = 6146.3, so it stays open.
    assert e.set_mark_price(396, 5900, ts=8_000)[1:] == []
    assert v.pos(S1, False).margin == 300_000
    return v, e.settle_funding(396, ts=HOUR)


def test_a_payer_pays_at_most_its_margin_and_is_then_liquidated() -> None:
    v, events = payer_exhausted()
    e = v.engine
    ev = events[0]
    assert isinstance(ev, FundingSettled)
    # Premium (5900 - 6300) / 6300 = -4/63 = -6.35 %, inside the 10 % cap: shorts pay.
    assert (ev.rate_num, ev.rate_den) == (-4, 63)
    # S1 owes 1000 * 5900 * 4 / 63 = 23,600,000 / 63 = 374,603.17 -> 374,604, more than its
    # 300,000 margin: it pays 300,000, all of which L1 (the only long) receives; no dust.
    amounts = {(p.position.address, p.position.is_long): p.amount for p in ev.payments}
    assert amounts == {(S1, False): -300_000, (L1, True): 300_000}
    paid = next(p.position for p in ev.payments if p.amount < 0)
    assert (paid.margin, paid.added_margin) == (0, -300_000)
    assert ev.dust == 0
    # With no margin S1's liquidation price is 6000 * (1 + 0.05 - 0.05) / 1.025 = 5853.66,
    # the mark 5900 is through it: the trigger path liquidates at once, buying M's 1000 @ 5950.
    assert [type(x) for x in events[1:]] == [
        OrderPlaced,
        Fill,
        LiquidationSettled,
        PositionReleased,
    ]
    placed = events[1]
    assert isinstance(placed, OrderPlaced) and placed.order.order_type == 14
    liq = events[3]
    assert isinstance(liq, LiquidationSettled)
    # Released margin 0 + pnl (6,000,000 - 5,950,000 = 50,000) - fee ceil(5,950,000 * 5 / 10^4)
    # = 2,975 -> 47,025; 20 % 9,405 to insurance, 30 % 14,107 (14,107.5 down) to the
    # liquidator, the rest 23,513 to the trader.
    assert (liq.remaining, liq.to_insurance, liq.to_liquidator, liq.to_trader) == (
        47_025,
        9_405,
        14_107,
        23_513,
    )
    assert (S1, 396, False) not in e.positions
    # Its 300,000 margin (reserved from collateral) went to L1; the trader's share came back.
    assert e.collateral[S1] == BIG - 300_000 + 23_513
    # L1: 3,000,000 + 300,000 margin, 300,000 added.
    assert (v.pos(L1, True).margin, v.pos(L1, True).added_margin) == (3_300_000, 300_000)
    v.check_replay()


def test_a_payer_without_margin_pays_nothing_and_margin_never_goes_negative() -> None:
    v, events = payer_exhausted(liquidity=False)
    e = v.engine
    # As above S1 pays its whole 300,000 margin, but no ask is there to close it against: the
    # liquidation cannot fill, emits nothing, and S1 stays open with no margin.
    assert [type(x) for x in events] == [FundingSettled]
    assert (v.pos(S1, False).margin, v.pos(S1, False).added_margin) == (0, -300_000)
    # The next hour S1 owes 374,604 again and pays min(374,604, 0) = 0; L1 receives nothing.
    (ev,) = e.settle_funding(396, ts=2 * HOUR)
    assert isinstance(ev, FundingSettled)
    amounts = {p.position.address: p.amount for p in ev.payments}
    assert amounts == {S1: 0, L1: 0}
    assert v.pos(S1, False).margin == 0
    assert (v.pos(L1, True).margin, v.pos(L1, True).added_margin) == (3_300_000, 300_000)
    assert ev.dust == 0 and ev.next_funding == 3 * HOUR
    v.check_replay()


def test_rate_zero_and_empty_market_still_settle_and_advance() -> None:
    v = four_positions()
    e = v.engine
    e.set_mark_price(396, 6000, ts=9_000)
    e.set_index_price(396, 6000, ts=9_500)
    before = dict(e.positions)
    (ev,) = e.settle_funding(396, ts=HOUR + 5)
    assert isinstance(ev, FundingSettled)
    assert (ev.rate_num, ev.rate_den) == (0, 1)
    assert [p.amount for p in ev.payments] == [0, 0, 0, 0]
    assert e.positions == before  # unchanged, not even `updated`
    assert ev.next_funding == 2 * HOUR and ev.dust == 0
    # A market with prices and no positions settles with no payments.
    e.set_index_price(397, 300_000, ts=HOUR + 10)
    e.set_mark_price(397, 301_000, ts=HOUR + 11)
    (ev,) = e.settle_funding(397, ts=2 * HOUR)
    assert isinstance(ev, FundingSettled)
    assert ev.payments == [] and ev.next_funding == 3 * HOUR
    v.check_replay()


def test_slots_without_size_take_no_part() -> None:
    v = four_positions()
    e = v.engine
    # S1 opens a long slot with a resting bid only (size 0, one pending open).
    e.place_limit_order(
        S1, 396, is_long=True, is_close=False, size=500, price=5000, leverage=2, ts=8_500
    )
    assert v.pos(S1, True).size == 0
    e.set_index_price(396, 6000, ts=9_000)
    e.set_mark_price(396, 6031, ts=10_000)
    (ev,) = e.settle_funding(396, ts=HOUR)
    assert isinstance(ev, FundingSettled)
    assert len(ev.payments) == 4
    assert all(p.position.size > 0 for p in ev.payments)
    v.check_replay()


def test_not_due_or_without_prices_is_a_no_op() -> None:
    v = four_positions()
    e = v.engine
    state = e.state()
    # No price yet: nothing is due, whatever the time.
    assert e.settle_funding(396, ts=10 * HOUR) == []
    assert e.funding_ready(10 * HOUR) == []
    # The first price starts the clock (a mark alone will do); without an index nothing settles.
    e.set_mark_price(396, 6030, ts=HOUR)  # exactly on a boundary: due at the next one
    assert e.funding_due == {396: 2 * HOUR}
    state = e.state()
    assert e.settle_funding(396, ts=3 * HOUR) == []
    assert e.funding_ready(3 * HOUR) == []
    assert e.state() == state
    e.set_index_price(396, 6000, ts=HOUR + 1)
    assert e.funding_ready(2 * HOUR - 1) == []
    assert e.settle_funding(396, ts=2 * HOUR - 1) == []
    assert e.funding_ready(2 * HOUR) == [396]
    assert e.current_funding_rate(396) == Fraction(1, 200)  # 30 / 6000
    assert e.current_funding_rate(397) is None
    v.check_replay()


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda e: e.set_index_price(999, 6000, ts=1), errors.UnknownMarket),
        (lambda e: e.set_index_price("396", 6000, ts=1), errors.UnknownMarket),
        (lambda e: e.set_index_price(396, 0, ts=1), errors.InvalidPrice),
        (lambda e: e.set_index_price(396, -5, ts=1), errors.InvalidPrice),
        (lambda e: e.set_index_price(396, 6000.0, ts=1), errors.InvalidPrice),
        (lambda e: e.set_index_price(396, True, ts=1), errors.InvalidPrice),
        (lambda e: e.settle_funding(999, ts=1), errors.UnknownMarket),
        (lambda e: e.current_funding_rate(1), errors.UnknownMarket),
    ],
)
def test_rejections_change_nothing(
    call: Callable[[Engine], object], exc: type[errors.CommandRejected]
) -> None:
    v = four_positions()
    state = v.engine.state()
    with pytest.raises(exc):
        call(v.engine)
    assert v.engine.state() == state


def test_index_price_event_and_commands() -> None:
    engine = Engine(default_markets())
    execute(engine, Deposit(address=L1, amount=5), 1)
    (ev,) = execute(engine, SetIndexPrice(market_id=398, price=300_000), 2_000).events
    assert isinstance(ev, IndexPriceSet)
    assert (ev.seq, ev.ts, ev.market_id, ev.price) == (2, 2_000, 398, 300_000)
    assert to_json(ev) == b'{"type":"index","seq":2,"ts":2000,"market_id":398,"price":300000}'
    assert engine.index_prices == {398: 300_000} and engine.marks == {}
    assert execute(engine, SettleFunding(market_id=398), HOUR).events == []
    execute(engine, SetMarkPrice(market_id=398, price=299_000), 3_000)
    (settled,) = execute(engine, SettleFunding(market_id=398), HOUR).events
    assert isinstance(settled, FundingSettled)
    # -1000 / 300000 = -1/300 = -33.3 bps
    assert (settled.rate_num, settled.rate_den, settled.next_funding) == (-1, 300, 2 * HOUR)
