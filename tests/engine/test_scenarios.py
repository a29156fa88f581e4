"""Worked scenarios: every expected number is computed by hand in the comments beside it.

Market 396 (APT/USDC): tick 1, min 500 lots, max leverage 20, maintenance 2.5 %, taker fee
5 bps rounded up, maker fee 0. value = price x size; taker margin = ceil(value / leverage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from perps_indexer import errors
from perps_indexer.engine import Engine, OrderResult
from perps_indexer.events import (
    CANCELLED,
    FILL_OR_ABORT,
    FILLED,
    IMMEDIATE_OR_CANCEL,
    OPEN,
    PARTIALLY_FILLED,
    POST_OR_ABORT,
    AnyEvent,
    Fill,
    LiquidationSettled,
    OrderCancelled,
    PositionReleased,
    PositionState,
)
from perps_indexer.markets import default_markets
from perps_indexer.units import ASK_BIT, U64_MASK, format_ratio, normalize_address

A, B, C, D, E = (normalize_address(f"0x{c}") for c in "abcde")
T = normalize_address("0x7")  # the trader each scenario follows
BIG = 1_000_000_000  # a comfortable deposit


class Venue:
    """An engine with a clock that ticks one second per command."""

    def __init__(self, *funded: str, amount: int = BIG) -> None:
        self.engine = Engine(default_markets())
        self.ts = 0
        self.log: list[AnyEvent] = []
        commit = self.engine.apply

        def apply(event: AnyEvent) -> None:  # record every event the engine commits
            commit(event)
            self.log.append(event)

        self.engine.apply = apply  # type: ignore[method-assign]
        for addr in funded:
            self.engine.deposit(addr, amount, ts=self.tick())

    def tick(self) -> int:
        self.ts += 1_000
        return self.ts

    def limit(
        self,
        addr: str,
        *,
        long: bool,
        size: int,
        price: int,
        lev: int = 2,
        close: bool = False,
        market: int = 396,
        restriction: int = 0,
        tp: int | None = None,
        sl: int | None = None,
    ) -> OrderResult:
        return self.engine.place_limit_order(
            addr,
            market,
            is_long=long,
            is_close=close,
            size=size,
            price=price,
            leverage=lev,
            restriction=restriction,
            take_profit=tp,
            stop_loss=sl,
            ts=self.tick(),
        )

    def market(
        self,
        addr: str,
        *,
        long: bool,
        size: int,
        lev: int = 2,
        close: bool = False,
        market: int = 396,
        tp: int | None = None,
        sl: int | None = None,
    ) -> OrderResult:
        return self.engine.place_market_order(
            addr,
            market,
            is_long=long,
            is_close=close,
            size=size,
            leverage=lev,
            take_profit=tp,
            stop_loss=sl,
            ts=self.tick(),
        )

    def mark(self, price: int, market: int = 396) -> list[AnyEvent]:
        return self.engine.set_mark_price(market, price, ts=self.tick())

    def pos(self, addr: str, long: bool, market: int = 396) -> PositionState:
        return self.engine.positions[(addr, market, long)]

    def free(self, addr: str) -> int:
        return self.engine.collateral.get(addr, 0)

    def conserved(self) -> bool:
        """Money adds up, and folding the log from empty gives this very state."""
        ledger = self.engine.ledger({m: 1234 for m in self.engine.markets})
        replayed = Engine.replay(self.engine.markets, self.log)
        return (
            ledger.total == ledger.deposits - ledger.withdrawals
            and replayed.state() == self.engine.state()
        )


def fills(events: list[AnyEvent]) -> list[Fill]:
    return [e for e in events if isinstance(e, Fill)]


def rejects(
    venue: Venue, code: type[errors.CommandRejected], call: Callable[[], Any]
) -> errors.CommandRejected:
    """Run ``call``, which must raise ``code`` and change nothing."""
    before, seq = venue.engine.state(), venue.engine.seq
    with pytest.raises(code) as info:
        call()
    assert venue.engine.state() == before and venue.engine.seq == seq
    assert info.value.code == code.code and info.value.message
    return info.value


# ---------------------------------------------------------------------- positions


def test_increase_at_a_second_price_keeps_an_exact_weighted_entry() -> None:
    v = Venue(A, T)
    v.limit(A, long=False, size=1000, price=6000)  # A's ask: open short
    first = v.market(T, long=True, size=1000)
    # 1000 @ 6000: value 6,000,000, margin ceil(6,000,000 / 2) = 3,000,000,
    # taker fee ceil(6,000,000 x 5 / 10,000) = 3,000.
    assert first.order.order_type == 1  # open long
    assert fills(first.events)[0].taker.fee == 3_000
    assert v.free(T) == BIG - 3_000_000 - 3_000

    v.limit(A, long=False, size=500, price=6301)
    second = v.market(T, long=True, size=500)
    # 500 @ 6301: value 3,150,500, margin ceil(3,150,500 / 2) = 1,575,250,
    # fee ceil(3,150,500 x 5 / 10,000) = ceil(1,575.25) = 1,576.
    assert second.order.order_type == 3  # increase long
    (fill,) = fills(second.events)
    assert (fill.price, fill.size, fill.taker.fee, fill.taker.pnl) == (6301, 500, 1_576, 0)
    long = v.pos(T, True)
    # size 1500, value 6,000,000 + 3,150,500 = 9,150,500, margin 4,575,250;
    # entry 9,150,500 / 1500 = 6100.333... exactly (kept as value / size, never rounded).
    assert (long.size, long.value, long.margin) == (1500, 9_150_500, 4_575_250)
    assert format_ratio(long.value, long.size) == "6100.333333"
    assert v.free(T) == BIG - 3_003_000 - 1_575_250 - 1_576
    # A's short grew the same way from its resting orders (type 2 then 4: open, increase).
    short = v.pos(A, False)
    assert (short.size, short.value) == (1500, 9_150_500)
    assert fill.maker.order.order_type == 4
    assert v.conserved()


def test_partial_close_realises_pnl_and_keeps_the_rest_of_the_position() -> None:
    v = Venue(A, B, T)
    v.limit(A, long=False, size=1000, price=6000)
    v.limit(A, long=False, size=1000, price=6001)
    v.market(T, long=True, size=2000)
    # value 6,000,000 + 6,001,000 = 12,001,000; margin 3,000,000 + ceil(6,001,000 / 2)
    # = 3,000,000 + 3,000,500 = 6,000,500; fees 3,000 + ceil(3,000.5) = 3,001.
    free_before = BIG - 6_000_500 - 6_001
    assert v.free(T) == free_before

    v.limit(B, long=True, size=501, price=6500, lev=4)  # B's bid
    result = v.market(T, long=True, close=True, size=501)
    # Closing 501 of 2000 lots releases, rounded down, the rest staying with the position:
    #   cost basis 12,001,000 x 501 / 2000 = 3,006,250.5 -> 3,006,250
    #   margin      6,000,500 x 501 / 2000 = 1,503,125.25 -> 1,503,125
    # exit value 501 x 6500 = 3,256,500; pnl 3,256,500 - 3,006,250 = 250,250;
    # fee ceil(3,256,500 x 5 / 10,000) = ceil(1,628.25) = 1,629.
    (fill,) = fills(result.events)
    assert result.order.order_type == 5  # decrease long
    assert (fill.taker.pnl, fill.taker.fee) == (250_250, 1_629)
    assert v.free(T) == free_before + 1_503_125 + 250_250 - 1_629
    long = v.pos(T, True)
    # 2000 - 501 = 1499 lots, value 12,001,000 - 3,006,250 = 8,994,750,
    # margin 6,000,500 - 1,503,125 = 4,497,375.
    assert (long.size, long.value, long.margin) == (1499, 8_994_750, 4_497_375)

    # Closing everything that is left is a "close" (type 7) and releases exactly the rest.
    v.limit(B, long=True, size=1499, price=5900, lev=4)
    last = v.market(T, long=True, close=True, size=1499)
    # pnl 1499 x 5900 - 8,994,750 = 8,844,100 - 8,994,750 = -150,650;
    # fee ceil(8,844,100 x 5 / 10,000) = ceil(4,422.05) = 4,423.
    assert last.order.order_type == 7
    (fill,) = fills(last.events)
    assert (fill.taker.pnl, fill.taker.fee) == (-150_650, 4_423)
    assert (T, 396, True) not in v.engine.positions
    assert isinstance(last.events[-1], PositionReleased)
    assert v.free(T) == free_before + 1_503_125 + 250_250 - 1_629 + 4_497_375 - 150_650 - 4_423
    assert v.conserved()


def test_hedge_mode_holds_a_long_and_a_short_for_one_address() -> None:
    v = Venue(A, B, T)
    v.limit(A, long=False, size=1000, price=6000)
    v.limit(B, long=True, size=500, price=5990, lev=5)
    v.market(T, long=True, size=1000, lev=2)
    v.market(T, long=False, size=500, lev=5)
    long, short = v.pos(T, True), v.pos(T, False)
    # long: 1000 @ 6000, margin 3,000,000; short: 500 @ 5990 = 2,995,000, margin 599,000.
    assert (long.size, long.value, long.margin, long.leverage) == (1000, 6_000_000, 3_000_000, 2)
    assert (short.size, short.value, short.margin, short.leverage) == (500, 2_995_000, 599_000, 5)
    # Two positions, two trade ids in market 396 (counter << 64 | 396).
    assert long.trade_id != short.trade_id
    assert long.trade_id & U64_MASK == short.trade_id & U64_MASK == 396
    # Fees: ceil(6,000,000 x 0.0005) = 3,000 and ceil(2,995,000 x 0.0005) = 1,497.5 -> 1,498.
    assert v.free(T) == BIG - 3_000_000 - 3_000 - 599_000 - 1_498
    # Each side keeps its own leverage: an increase of the short at 2x is refused.
    rejects(v, errors.LeverageMismatch, lambda: v.market(T, long=False, size=500, lev=2))
    # Closing the short leaves the long alone.
    v.limit(A, long=False, size=500, price=5980)
    v.market(T, long=False, close=True, size=500)
    assert (T, 396, False) not in v.engine.positions
    assert v.pos(T, True) == long
    assert v.conserved()


# ---------------------------------------------------------------------- liquidation


def test_liquidation_after_a_mark_move_splits_20_30_50_then_the_fund_covers_a_shortfall() -> None:
    v = Venue(A, B, C, D, T, E)
    # T: long 10,000 @ 6000 at 2x: margin 30,000,000, fee 30,000.
    v.limit(A, long=False, size=10_000, price=6000)
    v.market(T, long=True, size=10_000)
    assert v.free(T) == BIG - 30_030_000
    # Liquidation price 6000 x (1 - 1/2) / (1 - 0.025) = 3076.923...
    assert v.engine.liq_price(v.pos(T, True)) == 6000 * (1 - 1 / 2) / (1 - 0.025)
    v.limit(B, long=True, size=10_000, price=3070, lev=1)  # the bid the liquidation meets

    events = v.mark(3070)  # at or below 3076.92: liquidate through the book
    (fill,) = fills(events)
    assert fill.taker.order.order_type == 13  # liquidation long
    assert fill.maker.order.order_type == 1  # B's open long
    # Sold 10,000 @ 3070 = 30,700,000 against a cost of 60,000,000: pnl -29,300,000;
    # fee ceil(30,700,000 x 0.0005) = 15,350; what remains of the margin:
    # 30,000,000 - 29,300,000 - 15,350 = 684,650, split
    #   insurance 20 % = 136,930, liquidator 30 % = 205,395, trader 50 % = 342,325.
    assert (fill.taker.pnl, fill.taker.fee) == (-29_300_000, 15_350)
    (settled,) = [e for e in events if isinstance(e, LiquidationSettled)]
    assert (settled.closed_size, settled.remaining) == (10_000, 684_650)
    assert (settled.to_insurance, settled.to_liquidator, settled.to_trader) == (
        136_930,
        205_395,
        342_325,
    )
    assert v.engine.insurance_fund == 136_930
    assert v.engine.liquidator == 205_395
    assert v.free(T) == BIG - 30_030_000 + 342_325
    assert (T, 396, True) not in v.engine.positions
    assert v.engine.fee_account == 30_000 + 15_350

    # A second trader, E: long 1000 @ 6000 at 10x (margin 600,000, fee 3,000),
    # liquidation price 6000 x 0.9 / 0.975 = 5538.46...
    v.mark(6000)
    v.limit(A, long=False, size=1000, price=6000)
    v.market(E, long=True, size=1000, lev=10)
    v.limit(C, long=True, size=500, price=5400, lev=1)
    v.limit(D, long=True, size=500, price=4000, lev=1)
    events = v.mark(5400)
    # 500 @ 5400 releases half the cost (3,000,000) and margin (300,000):
    # 300,000 + (2,700,000 - 3,000,000) - fee 1,350 = -1,350, which the fund (136,930) covers.
    # The next 500 @ 4000 would add 300,000 + (2,000,000 - 3,000,000) - 1,000 = -701,000:
    # more than the fund holds, so the liquidation stops there and the rest stays open.
    (fill,) = fills(events)
    assert (fill.price, fill.size, fill.taker.order.order_type) == (5400, 500, 13)
    (settled,) = [e for e in events if isinstance(e, LiquidationSettled)]
    assert (settled.closed_size, settled.remaining) == (500, -1_350)
    assert (settled.to_insurance, settled.to_liquidator, settled.to_trader) == (0, 0, 0)
    assert v.engine.insurance_fund == 136_930 - 1_350
    cancelled = [e for e in events if isinstance(e, OrderCancelled)]
    assert cancelled[-1].order.order_type == 13 and cancelled[-1].order.remaining == 500
    left = v.pos(E, True)
    assert (left.size, left.value, left.margin) == (500, 3_000_000, 300_000)
    assert v.free(E) == BIG - 603_000  # the trader gets nothing back from a shortfall

    # The remainder is retried at the next mark; with only the 4000 bid it still cannot go.
    assert [type(e).__name__ for e in v.mark(5400)] == ["MarkPriceSet"]
    v.limit(C, long=True, size=500, price=5300, lev=1)
    events = v.mark(5350)
    # 500 @ 5300: 300,000 + (2,650,000 - 3,000,000) - ceil(1,325) = -51,325 from the fund.
    (settled,) = [e for e in events if isinstance(e, LiquidationSettled)]
    assert (settled.closed_size, settled.remaining) == (500, -51_325)
    assert v.engine.insurance_fund == 136_930 - 1_350 - 51_325
    assert (E, 396, True) not in v.engine.positions
    assert v.conserved()


def test_a_short_is_liquidated_when_the_mark_rises_through_its_price() -> None:
    v = Venue(A, B, T)
    v.limit(A, long=True, size=1000, price=6000)  # A's bid
    v.market(T, long=False, size=1000, lev=10)  # T: short 1000 @ 6000, margin 600,000
    # Liquidation price 6000 x (1 + 1/10) / (1 + 0.025) = 6439.02...
    assert v.engine.liq_price(v.pos(T, False)) == 6000 * (1 + 1 / 10) / (1 + 0.025)
    v.limit(B, long=False, size=1000, price=6400, lev=1)  # B's ask: what T buys back
    assert len(v.mark(6439)) == 1  # below 6439.02: nothing happens
    events = v.mark(6440)
    (fill,) = fills(events)
    assert (fill.taker.order.order_type, fill.maker.order.order_type) == (14, 2)
    # Bought back 1000 @ 6400: pnl 6,000,000 - 6,400,000 = -400,000; fee 3,200;
    # left 600,000 - 400,000 - 3,200 = 196,800: 39,360 / 59,040 / 98,400.
    (settled,) = [e for e in events if isinstance(e, LiquidationSettled)]
    assert (settled.remaining, settled.to_insurance, settled.to_liquidator, settled.to_trader) == (
        196_800,
        39_360,
        59_040,
        98_400,
    )
    assert v.free(T) == BIG - 600_000 - 3_000 + 98_400
    assert (v.engine.insurance_fund, v.engine.liquidator) == (39_360, 59_040)
    assert v.conserved()


def test_liquidation_cancels_the_positions_resting_close_orders() -> None:
    v = Venue(A, B, T)
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000, lev=10)
    close = v.limit(T, long=True, close=True, size=600, price=7000)
    assert v.pos(T, True).pending_close == 600
    v.limit(B, long=True, size=1000, price=5500, lev=1)
    events = v.mark(5500)
    (cancel, *_) = [e for e in events if isinstance(e, OrderCancelled)]
    assert cancel.order.order_id == close.order_id and cancel.order.status == CANCELLED
    assert close.order_id not in v.engine.orders
    assert (T, 396, True) not in v.engine.positions
    assert v.engine.books[396].levels() == ([], [])


# ---------------------------------------------------------------------- TP / SL


@pytest.mark.parametrize(
    ("long", "trigger", "exit_price", "pnl", "fee", "code"),
    [
        # long TP 6300: sells 1000 @ 6250: pnl 6,250,000 - 6,000,000 = 250,000, fee 3,125.
        (True, "tp", 6250, 250_000, 3_125, 11),
        # long SL 5800: sells 1000 @ 5790: pnl -210,000, fee ceil(2,895) = 2,895.
        (True, "sl", 5790, -210_000, 2_895, 9),
        # short TP 5700: buys 1000 @ 5690: pnl 6,000,000 - 5,690,000 = 310,000, fee 2,845.
        (False, "tp", 5690, 310_000, 2_845, 12),
        # short SL 6200: buys 1000 @ 6210: pnl -210,000, fee ceil(3,105) = 3,105.
        (False, "sl", 6210, -210_000, 3_105, 10),
    ],
)
def test_take_profit_and_stop_loss_close_at_market_when_the_mark_reaches_them(
    long: bool, trigger: str, exit_price: int, pnl: int, fee: int, code: int
) -> None:
    v = Venue(A, B, T)
    v.mark(6000)
    v.limit(A, long=not long, size=1000, price=6000)
    # Both triggers set on the opening order; the one that fires depends on the mark.
    tp, sl = (6300, 5800) if long else (5700, 6200)
    v.market(T, long=long, size=1000, tp=tp, sl=sl)
    assert (v.pos(T, long).tp, v.pos(T, long).sl) == (tp, sl)
    free = v.free(T)  # BIG - 3,000,000 margin - 3,000 fee
    assert free == BIG - 3_003_000

    v.limit(B, long=long, size=1000, price=exit_price, lev=1)  # liquidity on the exit side
    # A mark one tick short of the trigger does nothing.
    target = tp if trigger == "tp" else sl
    step = 1 if (trigger == "tp") == long else -1
    assert len(v.mark(target - step)) == 1
    events = v.mark(target)
    (fill,) = fills(events)
    assert fill.taker.order.order_type == code
    assert (fill.price, fill.size, fill.taker.pnl, fill.taker.fee) == (exit_price, 1000, pnl, fee)
    assert (T, 396, long) not in v.engine.positions
    assert v.free(T) == free + 3_000_000 + pnl - fee
    assert v.conserved()


def test_a_trigger_fill_that_hands_a_maker_a_passed_stop_fires_it_in_the_same_mark() -> None:
    """T's stop-loss sells into M's bid, which carries its own stop-loss: M's new position is
    already through its stop at this mark, so it is closed in the same pass (M's slot comes
    after T's). Pins the trigger loop's rule that a fill may change any later slot."""
    v = Venue(A, B, T, D)
    v.mark(6000)
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000, sl=5900)
    m = D  # the maker whose resting bid carries a stop-loss
    v.limit(m, long=True, size=1000, price=5950, sl=5940)
    v.limit(B, long=True, size=1000, price=5800, lev=1)
    events = v.mark(5900)
    first, second = fills(events)
    # T sells 1000 @ 5950 to M (stop-loss long, 9); M's long 1000 @ 5950 with SL 5940 is then
    # at a mark of 5900 <= 5940 and sells 1000 @ 5800 to B: pnl 5,800,000 - 5,950,000
    # = -150,000, fee ceil(5,800,000 x 0.0005) = 2,900.
    assert (first.taker.order.address, first.price, first.taker.order.order_type) == (T, 5950, 9)
    assert (second.taker.order.address, second.price, second.taker.order.order_type) == (
        m,
        5800,
        9,
    )
    assert (second.taker.pnl, second.taker.fee) == (-150_000, 2_900)
    assert (m, 396, True) not in v.engine.positions
    assert v.conserved()


def test_stop_loss_closes_only_what_margin_and_free_collateral_can_pay() -> None:
    v = Venue(A, B)
    v.engine.deposit(T, 3_003_000 + 100_000, ts=v.tick())
    v.mark(6000)
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000, sl=5900)  # margin 3,000,000 + fee 3,000; 100,000 free
    v.limit(B, long=True, size=500, price=5000, lev=1)
    v.limit(B, long=True, size=500, price=800, lev=1)
    events = v.mark(5900)
    # First 500 @ 5000: 1,500,000 margin + (2,500,000 - 3,000,000) - 1,250 fee = 998,750 >= 0.
    # Next 500 @ 800: 1,500,000 + (400,000 - 3,000,000) - 200 = -1,100,200; against the
    # 998,750 already credited plus 100,000 free that is 1,450 short: not filled, and the
    # position keeps 500 lots (the stop fires again at the next mark).
    (fill,) = fills(events)
    assert (fill.price, fill.size, fill.taker.order.order_type) == (5000, 500, 9)
    assert v.free(T) == 100_000 + 998_750
    assert v.pos(T, True).size == 500
    assert v.conserved()


def test_update_triggers_checks_the_side_of_the_mark_and_can_clear() -> None:
    v = Venue(A, T)
    v.mark(6000)
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000)
    err = rejects(
        v,
        errors.InvalidTrigger,
        lambda: v.engine.update_take_profit(T, 396, True, 5999, ts=v.tick()),
    )
    assert "take-profit 5999" in err.message
    rejects(
        v, errors.InvalidTrigger, lambda: v.engine.update_stop_loss(T, 396, True, 6000, ts=v.tick())
    )
    v.engine.update_take_profit(T, 396, True, 6500, ts=v.tick())
    v.engine.update_stop_loss(T, 396, True, 5500, ts=v.tick())
    assert (v.pos(T, True).tp, v.pos(T, True).sl) == (6500, 5500)
    v.engine.update_take_profit(T, 396, True, None, ts=v.tick())
    assert (v.pos(T, True).tp, v.pos(T, True).sl) == (None, 5500)


def test_add_margin_moves_free_collateral_and_the_liquidation_price() -> None:
    v = Venue(A, T)
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000, lev=10)  # margin 600,000
    before = v.engine.liq_price(v.pos(T, True))
    v.engine.add_margin(T, 396, True, 300_000, ts=v.tick())
    pos = v.pos(T, True)
    assert (pos.margin, pos.added_margin) == (900_000, 300_000)
    assert v.free(T) == BIG - 603_000 - 300_000
    # 6000 x (1 - 0.1 - 300,000 / 6,000,000) / 0.975 = 6000 x 0.85 / 0.975 = 5230.769...
    assert v.engine.liq_price(pos) == pytest.approx(6000 * 0.85 / 0.975)
    assert v.engine.liq_price(pos) < before
    rejects(
        v,
        errors.InsufficientCollateral,
        lambda: v.engine.add_margin(T, 396, True, BIG, ts=v.tick()),
    )


# ---------------------------------------------------------------------- restrictions


def test_no_restriction_rests_and_reserves_margin() -> None:
    v = Venue(T)
    result = v.limit(T, long=True, size=1000, price=6002, lev=3)
    assert result.status == OPEN and not result.fills
    # A resting bid's id: counter << 64 | price (no ask bit).
    assert result.order_id & U64_MASK == 6002
    order = v.engine.orders[result.order_id]
    # ceil(6,002,000 / 3) = 2,000,667 held back; maker fee 0.
    assert (order.reserved_margin, order.reserved_fee) == (2_000_667, 0)
    assert v.free(T) == BIG - 2_000_667
    ask = v.limit(T, long=False, size=500, price=6100, lev=3)
    assert ask.order_id & U64_MASK == 6100 | ASK_BIT
    assert v.engine.books[396].levels() == ([(6100, 500)], [(6002, 1000)])


def test_fill_or_abort_fills_everything_at_once_or_is_rejected() -> None:
    v = Venue(A, T)
    v.limit(A, long=False, size=500, price=6000)
    v.limit(A, long=False, size=500, price=6010)
    rejects(
        v,
        errors.FillOrAbortUnfilled,
        lambda: v.limit(T, long=True, size=1000, price=6005, restriction=FILL_OR_ABORT),
    )
    result = v.limit(T, long=True, size=1000, price=6010, restriction=FILL_OR_ABORT)
    assert result.status == FILLED
    assert [(f.price, f.size) for f in result.fills] == [(6000, 500), (6010, 500)]
    assert result.order_id & U64_MASK == 0  # filled on arrival: key 0


def test_immediate_or_cancel_fills_what_it_can_and_drops_the_rest() -> None:
    v = Venue(A, T)
    v.limit(A, long=False, size=600, price=6000)
    result = v.limit(T, long=True, size=1000, price=6000, restriction=IMMEDIATE_OR_CANCEL)
    assert [(f.price, f.size) for f in result.fills] == [(6000, 600)]
    assert result.status == CANCELLED and result.order.remaining == 400
    assert result.order_id not in v.engine.orders
    assert v.engine.books[396].levels() == ([], [])
    # Only the filled 600 lots hold margin: ceil(3,600,000 / 2) = 1,800,000, fee 1,800.
    assert v.free(T) == BIG - 1_801_800
    # With nothing to meet, the order is cancelled whole and the empty slot retired.
    nothing = v.limit(T, long=False, size=500, price=7000, restriction=IMMEDIATE_OR_CANCEL)
    assert nothing.status == CANCELLED and (T, 396, False) not in v.engine.positions


def test_post_or_abort_rejects_a_crossing_order_and_rests_otherwise() -> None:
    v = Venue(A, T)
    v.limit(A, long=False, size=500, price=6000)
    err = rejects(
        v,
        errors.WouldCross,
        lambda: v.limit(T, long=True, size=500, price=6000, restriction=POST_OR_ABORT),
    )
    assert "6000" in err.message
    result = v.limit(T, long=True, size=500, price=5999, restriction=POST_OR_ABORT)
    assert result.status == OPEN
    assert v.engine.books[396].levels() == ([(6000, 500)], [(5999, 500)])


def test_a_partly_filled_limit_order_rests_the_rest_as_partially_filled() -> None:
    v = Venue(A, T, B)
    v.limit(A, long=False, size=600, price=6000)
    result = v.limit(T, long=True, size=1000, price=6000)
    assert result.status == PARTIALLY_FILLED
    # Rests 400 @ 6000: reserve ceil(2,400,000 / 2) = 1,200,000; the 600 filled as taker
    # paid 1,800,000 margin and 1,800 fee.
    assert v.engine.orders[result.order_id].remaining == 400
    assert v.free(T) == BIG - 1_800_000 - 1_800 - 1_200_000
    # B sells 500 IOC: 400 fill against T's rest, B's other 100 are dropped. T's last 400 lots
    # take the whole reservation: margin 1,800,000 + 1,200,000 = 3,000,000 = ceil(6,000,000 / 2).
    sold = v.limit(B, long=False, size=500, price=6000, restriction=IMMEDIATE_OR_CANCEL)
    assert [(f.price, f.size) for f in sold.fills] == [(6000, 400)]
    assert result.order_id not in v.engine.orders
    assert (v.pos(T, True).size, v.pos(T, True).margin) == (1000, 3_000_000)
    assert v.free(T) == BIG - 1_800_000 - 1_800 - 1_200_000
    assert v.conserved()


def test_price_time_priority_and_partial_maker_fills() -> None:
    v = Venue(A, B, C, T)
    first = v.limit(A, long=False, size=500, price=6000)
    second = v.limit(B, long=False, size=500, price=6000)
    better = v.limit(C, long=False, size=500, price=5999)
    result = v.market(T, long=True, size=1200)
    # Best price first (C @ 5999), then time at 6000 (A before B); B fills 200 of 500.
    assert [(f.price, f.size) for f in result.fills] == [(5999, 500), (6000, 500), (6000, 200)]
    makers = [f.maker.order.order_id for f in fills(result.events)]
    assert makers == [better.order_id, first.order_id, second.order_id]
    rest = v.engine.orders[second.order_id]
    assert (rest.remaining, rest.status) == (300, PARTIALLY_FILLED)
    # B reserved ceil(3,000,000 / 2) = 1,500,000; 200 of 500 lots release 600,000 into the
    # position and 900,000 stay reserved for the other 300.
    assert rest.reserved_margin == 900_000
    assert v.pos(B, False).margin == 600_000


# ---------------------------------------------------------------------- self-trade, cancels


def test_self_trade_cancels_the_resting_order_and_goes_on() -> None:
    v = Venue(A, B)
    own = v.limit(A, long=False, size=500, price=6000)
    other = v.limit(B, long=False, size=500, price=6001)
    result = v.limit(A, long=True, size=1000, price=6001)
    cancels = [e for e in result.events if isinstance(e, OrderCancelled)]
    assert [c.order.order_id for c in cancels] == [own.order_id]
    assert cancels[0].reason.startswith("self-trade")
    assert [(f.price, f.size) for f in result.fills] == [(6001, 500)]
    assert fills(result.events)[0].maker.order.order_id == other.order_id
    # The rest of A's bid rests; A's short slot, which held only that ask, is retired.
    assert v.engine.books[396].levels() == ([], [(6001, 500)])
    assert (A, 396, False) not in v.engine.positions
    assert v.conserved()


def test_cancel_many_is_all_or_none() -> None:
    v = Venue(A, B)
    ids = [v.limit(A, long=True, size=500, price=p).order_id for p in (5990, 5991, 5992)]
    other = v.limit(B, long=True, size=500, price=5993).order_id
    rejects(v, errors.UnknownOrder, lambda: v.engine.cancel_orders(A, 396, [ids[0], 12345], ts=1))
    rejects(v, errors.UnknownOrder, lambda: v.engine.cancel_orders(A, 396, [ids[0], ids[0]], ts=1))
    rejects(v, errors.UnknownOrder, lambda: v.engine.cancel_orders(A, 396, [ids[0], other], ts=1))
    rejects(v, errors.UnknownOrder, lambda: v.engine.cancel_orders(A, 397, ids[:1], ts=1))
    rejects(v, errors.UnknownOrder, lambda: v.engine.cancel_orders(A, 396, [], ts=1))
    events = v.engine.cancel_orders(A, 396, ids[:2], ts=v.tick())
    assert [e.order.order_id for e in events if isinstance(e, OrderCancelled)] == ids[:2]
    assert sorted(v.engine.orders) == sorted([ids[2], other])
    # The last one: all reservations are back and the empty slot is retired.
    events = v.engine.cancel_orders(A, 396, ids[2:], ts=v.tick())
    assert isinstance(events[-1], PositionReleased)
    assert v.free(A) == BIG


def test_order_ids_of_two_markets_never_collide() -> None:
    """Regression: per-market order counters gave the first bid at 6000 in 396 and in 398 the
    same id, so the second overwrote the first in the engine's order map."""
    v = Venue(T)
    a = v.limit(T, long=True, size=500, price=6000, market=396)
    b = v.limit(T, long=True, size=10, price=6000, market=398)
    assert a.order_id != b.order_id
    assert len(v.engine.orders) == 2
    v.engine.cancel_orders(T, 396, [a.order_id], ts=v.tick())
    assert list(v.engine.orders) == [b.order_id]
    assert v.engine.books[398].levels() == ([], [(6000, 10)])
    assert v.conserved()


def test_a_resting_close_that_takes_the_whole_position_retires_the_slot() -> None:
    """Regression: a maker close fill that emptied its position left an empty slot behind
    (size 0, no orders), with its trade_id still taken."""
    v = Venue(A, B, T)
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000)
    v.limit(T, long=True, close=True, size=1000, price=6100)  # T's close rests as an ask
    result = v.market(B, long=True, size=1000)
    (fill,) = fills(result.events)
    assert fill.maker.order.order_type == 7 and fill.maker.position.size == 0
    # 1000 @ 6100 - 6,000,000 = 100,000 profit; maker fee 0.
    assert fill.maker.pnl == 100_000
    assert (T, 396, True) not in v.engine.positions
    released = [e for e in result.events if isinstance(e, PositionReleased)]
    assert [(e.address, e.is_long) for e in released] == [(T, True)]
    assert v.free(T) == BIG - 3_003_000 + 3_000_000 + 100_000


# ---------------------------------------------------------------------- accounts and rules


def test_only_free_collateral_can_be_withdrawn() -> None:
    v = Venue()
    v.engine.deposit(T, 10_000_000, ts=v.tick())
    bid = v.limit(T, long=True, size=1000, price=6000)  # reserves ceil(6,000,000 / 2)
    assert v.free(T) == 7_000_000
    err = rejects(
        v, errors.InsufficientCollateral, lambda: v.engine.withdraw(T, 7_000_001, ts=v.tick())
    )
    assert "7000000" in err.message
    v.engine.withdraw(T, 7_000_000, ts=v.tick())
    assert v.free(T) == 0
    v.engine.cancel_orders(T, 396, [bid.order_id], ts=v.tick())
    assert v.free(T) == 3_000_000
    assert v.engine.ledger().total == 10_000_000 - 7_000_000
    assert v.conserved()


def test_addresses_are_normalised_to_one_account() -> None:
    v = Venue()
    v.engine.deposit("0xA", 500, ts=v.tick())
    v.engine.deposit("  0x00a ", 500, ts=v.tick())
    v.engine.withdraw("0x" + "0" * 63 + "a", 1_000, ts=v.tick())
    assert v.engine.collateral == {A: 0}
    assert A == "0x" + "0" * 63 + "a"


def test_leverage_is_fixed_by_the_slot_even_with_only_resting_orders() -> None:
    v = Venue(T)
    bid = v.limit(T, long=True, size=500, price=5000, lev=2)
    err = rejects(
        v, errors.LeverageMismatch, lambda: v.limit(T, long=True, size=500, price=5001, lev=5)
    )
    assert "leverage 2" in err.message
    v.engine.cancel_orders(T, 396, [bid.order_id], ts=v.tick())
    assert v.limit(T, long=True, size=500, price=5001, lev=5).status == OPEN


def test_a_close_counts_resting_closes_and_never_exceeds_the_position() -> None:
    v = Venue(A, B, T)
    v.limit(A, long=False, size=2000, price=6000)
    v.market(T, long=True, size=2000)
    v.limit(T, long=True, close=True, size=1700, price=7000)
    assert v.pos(T, True).pending_close == 1700
    err = rejects(v, errors.CloseTooLarge, lambda: v.market(T, long=True, close=True, size=301))
    assert "1700" in err.message and "at most 300" in err.message
    # Below min_lots (500) a close is allowed only for the whole closable remainder.
    rejects(v, errors.InvalidSize, lambda: v.market(T, long=True, close=True, size=200))
    v.limit(B, long=True, size=500, price=5900)
    done = v.market(T, long=True, close=True, size=300)
    assert done.order.order_type == 5 and v.pos(T, True).size == 1700
    rejects(v, errors.CloseTooLarge, lambda: v.market(T, long=True, close=True, size=1))
    # A close can neither flip the position nor open the other side.
    assert (T, 396, False) not in v.engine.positions
    rejects(v, errors.NoPosition, lambda: v.market(T, long=False, close=True, size=500))
    assert v.conserved()


def test_a_market_order_fills_completely_or_is_rejected() -> None:
    v = Venue(A, T)
    v.limit(A, long=False, size=500, price=6000)
    err = rejects(v, errors.InsufficientLiquidity, lambda: v.market(T, long=True, size=1000))
    assert "found only 500" in err.message
    result = v.market(T, long=True, size=500)
    assert result.status == FILLED and result.order.is_market
    # A market order carries its last fill price and the sum of fill values.
    assert (result.order.price, result.order.value) == (6000, 3_000_000)


def test_a_close_whose_loss_cannot_be_paid_is_refused_or_cancelled() -> None:
    v = Venue(A, B)
    v.engine.deposit(T, 303_000, ts=v.tick())
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000, lev=20)  # margin 300,000 + fee 3,000: nothing free
    assert v.free(T) == 0
    bid = v.limit(B, long=True, size=1000, price=5000, lev=1)
    # Selling at 5000: 300,000 margin + (5,000,000 - 6,000,000) - 2,500 fee = -702,500.
    err = rejects(
        v, errors.CloseLossTooLarge, lambda: v.market(T, long=True, close=True, size=1000)
    )
    assert "702500" in err.message
    # A resting close at that price is cancelled when met instead of filled.
    v.engine.cancel_orders(B, 396, [bid.order_id], ts=v.tick())
    close = v.limit(T, long=True, close=True, size=1000, price=5000)
    v.limit(A, long=False, size=1000, price=5100)
    taken = v.market(B, long=True, size=1000, lev=1)
    cancels = [e for e in taken.events if isinstance(e, OrderCancelled)]
    assert [c.order.order_id for c in cancels] == [close.order_id]
    assert "loss" in cancels[0].reason
    assert [(f.price, f.size) for f in taken.fills] == [(5100, 1000)]
    assert v.pos(T, True).pending_close == 0
    assert v.conserved()


def test_off_tick_prices_are_refused_in_market_397() -> None:
    v = Venue(T)
    err = rejects(
        v,
        errors.InvalidPrice,
        lambda: v.limit(T, long=True, size=10, price=300_005, market=397),
    )
    assert "multiples of 10" in err.message
    assert v.limit(T, long=True, size=10, price=300_010, market=397).status == OPEN
    rejects(
        v,
        errors.InvalidPrice,
        lambda: v.limit(T, long=True, size=10, price=300_010, market=397, tp=310_001),
    )


def test_replay_refuses_a_gap_in_the_sequence() -> None:
    v = Venue(T)
    log = list(v.log)
    with pytest.raises(errors.SequenceGap) as info:
        Engine.replay(default_markets(), [*log, *log])
    assert (info.value.expected, info.value.got, info.value.code) == (2, 1, "sequence_gap")


def _error_cases() -> dict[str, Callable[[Venue], Any]]:
    """One command per rejection code, run against :func:`_busy_venue`."""
    eng = Engine.place_limit_order

    def limit(**kw: Any) -> Callable[[Venue], Any]:
        args = {"long": True, "size": 500, "price": 6000, **kw}
        return lambda v: v.limit(T, **args)

    return {
        "rejected": lambda v: v.engine.place_market_order(
            T,
            396,
            is_long="yes",
            is_close=False,
            size=500,
            leverage=2,
            ts=1,  # type: ignore[arg-type]
        ),
        "invalid_address": lambda v: v.engine.deposit("0xnothex", 1, ts=1),
        "unknown_market": lambda v: eng(
            v.engine, T, 999, is_long=True, is_close=False, size=500, price=1, leverage=1, ts=1
        ),
        "invalid_amount": lambda v: v.engine.deposit(T, 0, ts=1),
        "invalid_price": limit(price=0),
        "invalid_size": limit(size=499),
        "invalid_leverage": limit(lev=21),
        "invalid_restriction": limit(restriction=4),
        "insufficient_collateral": lambda v: v.engine.withdraw(T, BIG, ts=1),
        "leverage_mismatch": lambda v: v.market(T, long=True, size=500, lev=3),
        "no_position": lambda v: v.market(T, long=False, close=True, size=500),
        "close_too_large": lambda v: v.market(T, long=True, close=True, size=1001),
        "insufficient_liquidity": lambda v: v.market(T, long=False, size=100_000),
        "post_or_abort_would_cross": limit(price=6100, restriction=POST_OR_ABORT),
        "fill_or_abort_unfilled": limit(size=100_000, price=6100, restriction=FILL_OR_ABORT),
        "unknown_order": lambda v: v.engine.cancel_orders(T, 396, [1 << 64], ts=1),
        "invalid_trigger": lambda v: v.market(T, long=True, close=True, size=500, tp=7000),
        "close_loss_too_large": lambda v: v.market(T, long=True, close=True, size=1000),
    }


def _busy_venue() -> Venue:
    """T: long 1000 @ 6000 at 2x with 1,000 free; a deep ask at 6100 and a low bid at 10."""
    v = Venue(A, B)
    v.engine.deposit(T, 3_004_000, ts=v.tick())
    v.limit(A, long=False, size=1000, price=6000)
    v.market(T, long=True, size=1000)
    v.limit(A, long=False, size=5000, price=6100)
    v.limit(B, long=True, size=5000, price=10, lev=1)
    return v


@pytest.mark.parametrize("code", sorted(_error_cases()))
def test_every_rejection_has_its_code_and_a_message_and_changes_nothing(code: str) -> None:
    v = _busy_venue()
    (cls,) = [
        c
        for c in (errors.CommandRejected, *errors.CommandRejected.__subclasses__())
        if c.code == code
    ]
    err = rejects(v, cls, lambda: _error_cases()[code](v))
    assert type(err) is cls and len(err.message) > 10


def test_the_error_table_covers_every_rejection_class() -> None:
    codes = {errors.CommandRejected.code} | {
        c.code for c in errors.CommandRejected.__subclasses__()
    }
    assert codes == set(_error_cases())
    assert len(codes) == 1 + len(errors.CommandRejected.__subclasses__())  # codes are unique
