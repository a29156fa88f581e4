"""Projections driven by the real engine: exact pushes, changed keys, limits and persistence."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perps_indexer import errors, projections, wire
from perps_indexer.engine import Engine
from perps_indexer.events import (
    AnyEvent,
    Deposited,
    Fill,
    FundingPayment,
    FundingSettled,
    IndexPriceSet,
    MarkPriceSet,
    OrderCancelled,
    OrderPlaced,
    OrderRested,
    PositionReleased,
    PositionUpdated,
    Withdrew,
)
from perps_indexer.markets import default_markets
from perps_indexer.projections import Projections
from tests.test_wire import POSITIONS_EXAMPLE, TRADE_EXAMPLE, check_message_types

MARKETS = default_markets()
A = "0x" + "a" * 64
B = "0x" + "b" * 64
C = "0x" + "c" * 64
U64 = 1 << 64


def tid(counter: int, market: int = 396) -> str:
    """A position's trade_id, by the reference's rule ``counter << 64 | market``."""
    return str(counter << 64 | market)


def oid(counter: int, key: int = 0) -> str:
    """An order id, by the reference's rule ``counter << 64 | key``."""
    return str(counter << 64 | key)


def bare(message: bytes) -> bytes:
    """A push without its "seq" (checked to be there and an integer), for comparing rows."""
    parsed = json.loads(message)
    seq = parsed.pop("seq")
    assert isinstance(seq, int) and seq >= 0
    return json.dumps(parsed, separators=(",", ":")).encode()


def push(topic: str, rows: list[dict[str, Any]]) -> bytes:
    """The expected bytes of a push, from rows written out by hand in field order."""
    return json.dumps({"data": rows, "message": topic}, separators=(",", ":")).encode()


def book_level(is_ask: bool, ts: str, price: str, size: str) -> dict[str, Any]:
    return {"is_ask": is_ask, "last_updated": ts, "market_id": "396", "price": price, "size": size}


class Venue:
    """An engine with projections folded batch by batch, as a server would."""

    def __init__(self, history_limit: int = 100) -> None:
        self.engine = Engine(MARKETS)
        self.proj = Projections(MARKETS, history_limit)
        self.log: list[AnyEvent] = []

    @classmethod
    def funded(cls, *addresses: str, amount: int, ts: int, history_limit: int = 100) -> Venue:
        """A venue where each address deposited ``amount``; a deposit changes only the
        address's deposit_withdraw_history."""
        venue = cls(history_limit)
        for addr in addresses:
            changed = venue.feed(venue.engine.deposit(addr, amount, ts=ts))
            assert changed == {("deposit_withdraw_history", addr)}
        return venue

    def feed(self, events: list[AnyEvent]) -> set[tuple[str, str | int]]:
        self.log.extend(events)
        return set(self.proj.fold(events))

    def limit(self, addr: str, is_long: bool, size: int, price: int, ts: int, **kw: Any) -> Any:
        return self._place(
            self.engine.place_limit_order, addr, is_long, size, ts, price=price, **kw
        )

    def market(self, addr: str, is_long: bool, size: int, ts: int, **kw: Any) -> Any:
        return self._place(self.engine.place_market_order, addr, is_long, size, ts, **kw)

    def _place(self, place: Any, addr: str, is_long: bool, size: int, ts: int, **kw: Any) -> Any:
        result = place(
            addr,
            kw.pop("market", 396),
            is_long=is_long,
            is_close=kw.pop("is_close", False),
            size=size,
            leverage=kw.pop("leverage", 2),
            ts=ts,
            **kw,
        )
        return self.feed(result.events)


def keys(*pairs: tuple[str, str | int]) -> set[tuple[str, str | int]]:
    return set(pairs)


@pytest.fixture
def venue() -> Venue:
    """A, B, C funded; A bids 1000 @ 6000 and 500 @ 5990, B asks 700 @ 6010, then C sells
    1200 at market (filling A's 6000 bid and 200 of the 5990 bid)."""
    v = Venue.funded(A, B, C, amount=100_000_000, ts=1_000_000)
    v.limit(A, True, 1000, 6000, 2_000_000)
    v.limit(A, True, 500, 5990, 3_000_000)
    v.limit(B, False, 700, 6010, 4_000_000, leverage=2)
    v.market(C, False, 1200, 5_000_000, leverage=4)
    return v


# Rows of the scripted sequence, written out by hand. Position counters: A's slot 1, B's 2,
# C's 3. Order counters: A's bids 1 and 2, B's ask 3, C's market sell 4 (filled on arrival, key 0).
A_BID_6000 = {
    "address": A,
    "is_market_order": False,
    "last_updated": "5000",
    "leverage": 2,
    "market_id": "396",
    "order_id": oid(1, 6000),
    "order_type": 1,
    "order_value": "6000000",
    "price": "6000",
    "size": "1000",
    "status": "Filled",
    "timestamp": "2000",
    "trade_id": tid(1),
}
A_BID_5990 = {
    **A_BID_6000,
    "order_id": oid(2, 5990),
    "order_value": "2995000",
    "price": "5990",
    "size": "500",
    "status": "Partially Filled",
    "timestamp": "3000",
}
A_TRADE_5990 = {
    "address": A,
    "fee": "0",
    "last_updated": "5000",
    "market_id": "396",
    "order_type": 1,
    "pnl": "0",
    "price": "5990",
    "size": "200",
    "timestamp": "5000",
    "trade_id": tid(1),
}
C_SELL = {
    "address": C,
    "is_market_order": True,
    "last_updated": "5000",
    "leverage": 4,
    "market_id": "396",
    "order_id": oid(4),
    "order_type": 2,
    "order_value": "7198000",
    "price": "5990",
    "size": "1200",
    "status": "Filled",
    "timestamp": "5000",
    "trade_id": tid(3),
}


def test_first_resting_order() -> None:
    fresh = Venue.funded(A, amount=100_000_000, ts=1_000_000)
    changed = fresh.limit(A, True, 1000, 6000, 2_000_000)
    assert changed == keys(
        ("order_history", A), ("open_orders", A), ("orderbook", 396), ("best_price", 396)
    )
    p = fresh.proj
    assert bare(p.message("open_orders", A)) == push(
        "open_orders",
        [
            {
                "address": A,
                "last_updated": "2000",
                "leverage": 2,
                "market_id": "396",
                "order_id": oid(1, 6000),
                "order_type": 1,
                "order_value": "6000000",
                "price": "6000",
                "remaining_size": "1000",
                "timestamp": "2000",
                "total_size": "1000",
                "trade_id": tid(1),
            }
        ],
    )
    assert bare(p.message("order_history", A)) == push(
        "order_history", [{**A_BID_6000, "last_updated": "2000", "status": "Open"}]
    )
    assert bare(p.message("orderbook", 396)) == push(
        "orderbook", [book_level(False, "2000", "6000", "1000")]
    )
    assert bare(p.message("positions", A)) == b'{"data":[],"message":"positions"}'
    assert bare(p.message("trade_history", A)) == b'{"data":[],"message":"trade_history"}'


def test_market_order_fills_two_makers(venue: Venue) -> None:
    p = venue.proj
    # A long 1200 for 6000*1000 + 5990*200 = 7198000, margin 3000000 + 599000 from the bids'
    # reservations; entry 5998.333…; liq long 2x = entry * 0.5 / 0.975.
    assert bare(p.message("positions", A)) == push(
        "positions",
        [
            {
                "address": A,
                "entry_price": "5998.333333",
                "is_long": True,
                "last_updated": "5000",
                "leverage": 2,
                "liq_price": "3076.068376068376",
                "margin": "3599000",
                "market_id": "396",
                "size": "1200",
                "sl": None,
                "tp": None,
                "trade_id": tid(1),
                "value": "7198000",
            }
        ],
    )
    # C short 4x: margin 6000000/4 + 1198000/4; liq short = entry * 1.25 / 1.025.
    assert bare(p.message("positions", C)) == push(
        "positions",
        [
            {
                "address": C,
                "entry_price": "5998.333333",
                "is_long": False,
                "last_updated": "5000",
                "leverage": 4,
                "liq_price": "7315.040650406504",
                "margin": "1799500",
                "market_id": "396",
                "size": "1200",
                "sl": None,
                "tp": None,
                "trade_id": tid(3),
                "value": "7198000",
            }
        ],
    )
    trade = A_TRADE_5990
    assert bare(p.message("trade_history", A)) == push(
        "trade_history", [trade, {**trade, "price": "6000", "size": "1000"}]
    )
    # Taker fee 0.05 %: 6000000 -> 3000, 1198000 -> 599.
    c_trade = {**trade, "address": C, "order_type": 2, "trade_id": tid(3)}
    assert bare(p.message("trade_history", C)) == push(
        "trade_history",
        [{**c_trade, "fee": "599"}, {**c_trade, "fee": "3000", "price": "6000", "size": "1000"}],
    )
    assert bare(p.message("open_orders", A)) == push(
        "open_orders",
        [
            {
                "address": A,
                "last_updated": "5000",
                "leverage": 2,
                "market_id": "396",
                "order_id": oid(2, 5990),
                "order_type": 1,
                "order_value": "2995000",
                "price": "5990",
                "remaining_size": "300",
                "timestamp": "3000",
                "total_size": "500",
                "trade_id": tid(1),
            }
        ],
    )
    # The 5990 bid changed last, so it leads.
    assert bare(p.message("order_history", A)) == push("order_history", [A_BID_5990, A_BID_6000])
    assert bare(p.message("order_history", C)) == push("order_history", [C_SELL])
    assert bare(p.message("orderbook", 396)) == push(
        "orderbook",
        [book_level(True, "4000", "6010", "700"), book_level(False, "5000", "5990", "300")],
    )
    assert p.open_orders(C) == []


def test_market_order_changed_keys() -> None:
    v = Venue.funded(A, B, C, amount=100_000_000, ts=1_000_000)
    v.limit(A, True, 1000, 6000, 2_000_000)
    v.limit(A, True, 500, 5990, 3_000_000)
    assert v.limit(B, False, 700, 6010, 4_000_000) == keys(
        ("order_history", B), ("open_orders", B), ("orderbook", 396), ("best_price", 396)
    )
    assert v.market(C, False, 1200, 5_000_000, leverage=4) == keys(
        ("order_history", A),
        ("order_history", C),
        ("trade_history", A),
        ("trade_history", C),
        ("open_orders", A),
        ("orderbook", 396),
        ("best_price", 396),
        ("recent_trades", 396),
        ("positions", A),
        ("positions", C),
    )


def test_cancel_resting_order(venue: Venue) -> None:
    changed = venue.feed(venue.engine.cancel_orders(A, 396, [2 << 64 | 5990], ts=6_000_000))
    # A keeps its position: placing or cancelling orders does not change the positions view.
    # The 5990 bid was the best bid: best_price changes too.
    assert changed == keys(
        ("order_history", A), ("open_orders", A), ("orderbook", 396), ("best_price", 396)
    )
    p = venue.proj
    assert bare(p.message("open_orders", A)) == b'{"data":[],"message":"open_orders"}'
    assert bare(p.message("order_history", A)) == push(
        "order_history",
        [{**A_BID_5990, "last_updated": "6000", "status": "Cancelled"}, A_BID_6000],
    )
    assert bare(p.message("orderbook", 396)) == push(
        "orderbook", [book_level(True, "4000", "6010", "700")]
    )
    assert p.positions(A)[0].last_updated == "5000"


def test_liquidation_through_the_book(venue: Venue) -> None:
    v = venue
    v.feed(v.engine.cancel_orders(A, 396, [2 << 64 | 5990], ts=6_000_000))
    v.limit(B, False, 500, 7000, 6_500_000)
    events = v.engine.set_mark_price(396, 7400, ts=7_000_000)  # C's liq price is 7315.04
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "MarkPriceSet"
    assert "LiquidationSettled" in kinds
    # The mark price changes only the funding view, the settlement none.
    p = v.proj
    assert set(p.fold(events[:1])) == {("live_funding_rate", 396)}
    changed = set(v.proj.fold(events[1:]))
    v.log.extend(events)
    assert changed == keys(
        ("order_history", B),
        ("order_history", C),
        ("trade_history", B),
        ("trade_history", C),
        ("open_orders", B),
        ("orderbook", 396),
        ("best_price", 396),
        ("recent_trades", 396),
        ("positions", B),
        ("positions", C),
    )
    assert p.positions(C) == []
    assert bare(p.message("orderbook", 396)) == b'{"data":[],"message":"orderbook"}'
    assert p.open_orders(B) == []
    # C bought back 700 @ 6010 then 500 @ 7000 with liquidation-short orders (code 14).
    newest = json.loads(p.message("trade_history", C))["data"][:2]
    assert [(t["price"], t["size"], t["order_type"]) for t in newest] == [
        ("7000", "500", 14),
        ("6010", "700", 14),
    ]
    # Realised pnl on a short: cost basis released minus exit value. 700 of 1200 lots release
    # 7198000 * 700 // 1200 = 4198833 of cost; the rest is 2999167.
    assert [t["pnl"] for t in newest] == [str(2999167 - 3500000), str(4198833 - 4207000)]
    liq_order = p.order_history(C)[0]
    assert (liq_order.order_type, liq_order.status, liq_order.is_market_order) == (
        14,
        "Filled",
        True,
    )
    assert liq_order.order_value == str(6010 * 700 + 7000 * 500)
    (b_pos,) = p.positions(B)
    assert (b_pos.size, b_pos.value, b_pos.entry_price) == ("1200", "7707000", "6422.5")


def test_reference_examples_through_the_engine() -> None:
    v = Venue()
    trader = "0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770"
    # As if the venue had opened 893 positions before: the maker's slot is 894, the trader's 895.
    v.engine.position_counters[396] = 893
    v.feed(v.engine.deposit(trader, 10_000_000, ts=1_739_788_000_000))
    v.feed(v.engine.deposit(B, 10_000_000, ts=1_739_788_000_000))
    v.limit(B, True, 1000, 6050, 1_739_788_400_000)
    v.market(trader, False, 1000, 1_739_788_459_000)
    assert bare(v.proj.message("positions", trader)).decode() == POSITIONS_EXAMPLE
    assert bare(v.proj.message("trade_history", trader)).decode() == TRADE_EXAMPLE


def test_orderbook_levels_ordering_and_last_updated() -> None:
    v = Venue.funded(A, B, C, amount=1_000_000_000, ts=1_000)
    v.limit(A, True, 1000, 5990, 2_000)
    v.limit(A, True, 600, 6000, 3_000)
    v.limit(B, True, 700, 5990, 4_000)  # joins A's level
    v.limit(B, False, 800, 6030, 5_000)
    v.limit(A, False, 900, 6010, 6_000)
    v.limit(A, False, 500, 6020, 7_000)
    assert bare(v.proj.message("orderbook", 396)) == push(
        "orderbook",
        [
            book_level(True, "6", "6010", "900"),
            book_level(True, "7", "6020", "500"),
            book_level(True, "5", "6030", "800"),
            book_level(False, "3", "6000", "600"),
            book_level(False, "4", "5990", "1700"),
        ],
    )
    # C sells 1100: empties the 6000 level and takes 500 from A's 5990 order.
    v.market(C, False, 1100, 8_000)
    # C buys 900: takes all of 6010 (A's) — the 6020 level keeps its time.
    v.market(C, True, 900, 9_000)
    # B withdraws its 6030 ask: that level empties too.
    v.feed(v.engine.cancel_orders(B, 396, [4 << 64 | 6030 | 1 << 32], ts=10_000))
    assert bare(v.proj.message("orderbook", 396)) == push(
        "orderbook",
        [book_level(True, "7", "6020", "500"), book_level(False, "8", "5990", "1200")],
    )
    asks, bids = v.engine.books[396].levels()
    assert asks == [(6020, 500)]
    assert bids == [(5990, 1200)]
    assert v.proj.orderbook(397) == []
    assert bare(v.proj.message("orderbook", 999)) == b'{"data":[],"message":"orderbook"}'


def test_positions_ordered_by_market_then_long_first() -> None:
    v = Venue.funded(A, B, amount=10_000_000_000, ts=1_000)
    # A: short 396, short 397, long 397, long 396 (hedge mode), each against B's resting order.
    v.limit(B, True, 500, 6000, 2_000)
    v.market(A, False, 500, 2_100)
    v.limit(B, True, 10, 50_000, 3_000, market=397)
    v.market(A, False, 10, 3_100, market=397)
    v.limit(B, False, 10, 50_000, 4_000, market=397)
    v.market(A, True, 10, 4_100, market=397)
    v.limit(B, False, 500, 6000, 5_000)
    v.market(A, True, 500, 5_100)
    rows = v.proj.positions(A)
    assert [(r.market_id, r.is_long) for r in rows] == [
        ("396", True),
        ("396", False),
        ("397", True),
        ("397", False),
    ]
    # In each market the slots were made in order: B long 1, A short 2, B short 3, A long 4.
    assert [r.trade_id for r in rows] == [tid(4), tid(2), tid(4, 397), tid(2, 397)]
    check_message_types("positions", v.proj.message("positions", A))


def test_position_updates_change_only_positions() -> None:
    v = Venue.funded(A, B, amount=100_000_000, ts=1_000)
    v.limit(B, False, 1000, 6000, 2_000)
    v.market(A, True, 1000, 3_000)
    assert v.feed(v.engine.update_take_profit(A, 396, True, 6500, ts=4_000)) == keys(
        ("positions", A)
    )
    assert v.feed(v.engine.update_stop_loss(A, 396, True, 5500, ts=5_000)) == keys(("positions", A))
    (row,) = v.proj.positions(A)
    assert (row.tp, row.sl, row.last_updated) == ("6500", "5500", "5")
    assert v.feed(v.engine.add_margin(A, 396, True, 600_000, ts=6_000)) == keys(("positions", A))
    (row,) = v.proj.positions(A)
    # 600000 is 10 % of the 6000000 value: the long's cushion is 1/2 + 0.1.
    assert row.margin == "3600000"
    assert row.liq_price == repr(6000 * (1 - (1 / 2 + 0.1)) / (1 - 0.025))
    # A resting close order leaves the position's row alone.
    changed = v.limit(A, True, 600, 6100, 7_000, is_close=True)
    assert changed == keys(
        ("order_history", A), ("open_orders", A), ("orderbook", 396), ("best_price", 396)
    )
    assert v.proj.positions(A) == [row]
    assert v.feed(v.engine.deposit(A, 5, ts=8_000)) == keys(("deposit_withdraw_history", A))
    assert v.feed(v.engine.withdraw(A, 5, ts=9_000)) == keys(("deposit_withdraw_history", A))


def test_history_newest_first_with_limits() -> None:
    v = Venue.funded(A, B, amount=1_000_000_000, ts=1_000, history_limit=3)
    # A's bids 1..5, the oldest at the best price so that it fills first.
    for n in range(5):
        v.limit(A, True, 500, 6005 - n, (n + 2) * 1_000)
    ids = [oid(n + 1, 6005 - n) for n in range(5)]
    assert [r.order_id for r in v.proj.order_history(A)] == [ids[4], ids[3], ids[2]]
    assert [r.order_id for r in v.proj.order_history(A, limit=2)] == [ids[4], ids[3]]
    assert len(v.proj.open_orders(A)) == 5
    assert [r.order_id for r in v.proj.open_orders(A)] == ids  # oldest first
    # Filling the oldest order (no longer in memory) brings it back to the front.
    v.market(B, False, 500, 10_000)
    assert [r.order_id for r in v.proj.order_history(A)] == [ids[0], ids[4], ids[3]]
    assert v.proj.order_history(A)[0].status == "Filled"
    # Cancelling order 4, the oldest in memory, moves it to the front too.
    v.feed(v.engine.cancel_orders(A, 396, [int(ids[3])], ts=10_500))
    history = v.proj.order_history(A)
    assert [r.order_id for r in history] == [ids[3], ids[0], ids[4]]
    assert [r.status for r in history] == ["Cancelled", "Filled", "Open"]
    # Three more fills (orders 2, 3 and 5): A's trade history keeps the three newest.
    for n in range(1, 4):
        v.market(B, False, 500, (10 + n) * 1_000)
    trades = v.proj.trade_history(A)
    assert [(t.price, t.timestamp) for t in trades] == [
        ("6001", "13"),
        ("6003", "12"),
        ("6004", "11"),
    ]
    assert [t.price for t in v.proj.trade_history(A, limit=1)] == ["6001"]
    assert len(json.loads(v.proj.message("trade_history", B))["data"]) == 3
    assert v.proj.open_orders(A) == []


def test_messages_are_encoded_once_per_change(
    venue: Venue, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    rows: list[Any] = []

    def counting(topic: str, parts: Any, seq: int) -> bytes:
        calls.append(topic)
        return wire.join_message(topic, parts, seq)

    encode = projections._encode

    def counting_rows(entry: Any) -> bytes:
        rows.append(entry.row())
        return encode(entry)

    monkeypatch.setattr(projections, "join_message", counting)
    monkeypatch.setattr(projections, "_encode", counting_rows)
    p = venue.proj
    first = p.message("orderbook", 396)
    b_history = p.message("order_history", B)
    a_history = p.message("order_history", A)
    assert p.message("orderbook", 396) is first
    assert calls == ["orderbook", "order_history", "order_history"]
    assert len(rows) == len(p.orderbook(396)) + len(p.order_history(B)) + 2
    rows.clear()
    venue.feed(venue.engine.cancel_orders(A, 396, [2 << 64 | 5990], ts=6_000_000))
    assert p.message("order_history", B) is b_history  # B's view did not change
    again = p.message("orderbook", 396)
    assert again != first
    assert p.message("orderbook", 396) is again
    assert p.message("order_history", A) != a_history
    assert calls == ["orderbook", "order_history", "order_history", "orderbook", "order_history"]
    # Rows are immutable: a change encodes only the rows it made (the cancelled bid's level
    # went away; its order has a new history row).
    assert rows == [p.order_history(A)[0]]
    assert p.order_history(A)[0].status == "Cancelled"


def test_a_push_keeps_a_market_message_and_not_an_address_one(venue: Venue) -> None:
    p = venue.proj
    # A subscribe reads A's order history: kept until the view changes.
    kept = p.message("order_history", A)
    assert ("order_history", A) in p._messages
    venue.log.extend(more := venue.engine.cancel_orders(A, 396, [2 << 64 | 5990], ts=6_000_000))
    changed = p.fold(more)
    assert changed == {
        ("order_history", A): p.seq,
        ("open_orders", A): p.seq,
        ("orderbook", 396): p.seq,
        ("best_price", 396): p.seq,
    }
    assert ("order_history", A) not in p._messages  # the fold dropped it
    pushes = {key: p.push_message(*key, seq) for key, seq in changed.items()}
    # The same bytes as a read; a market's push is what later reads get, an address's is not.
    for key, data in pushes.items():
        assert p.message(*key, keep=False) == data
    assert p._messages.keys() == {("orderbook", 396), ("best_price", 396)}
    assert p.message("orderbook", 396) is pushes[("orderbook", 396)]
    history = pushes[("order_history", A)]
    assert history != kept and b'"Cancelled"' in history
    assert ("order_history", A) not in p._messages
    assert p.message("order_history", A) is not history
    # A view that never changed is the topic's empty message, and is not kept either.
    assert p.message("positions", "0x" + "9" * 64) == wire.encode_message("positions", [], 0)
    assert ("positions", "0x" + "9" * 64) not in p._messages


def test_sequence_gap_is_rejected_before_anything_changes(venue: Venue) -> None:
    events = venue.engine.cancel_orders(A, 396, [2 << 64 | 5990], ts=6_000_000)
    events += venue.engine.deposit(A, 1, ts=6_000_001)
    before = venue.proj.message("open_orders", A)
    seq = venue.proj.seq
    with pytest.raises(errors.SequenceGap) as info:
        venue.proj.fold([events[0], events[0]])
    assert (info.value.expected, info.value.got) == (seq + 2, seq + 1)
    with pytest.raises(errors.SequenceGap):
        venue.proj.apply(events[1])
    assert venue.proj.seq == seq
    assert venue.proj.message("open_orders", A) == before
    venue.proj.apply(events[0])
    assert venue.proj.seq == events[0].seq
    assert venue.proj.open_orders(A) == []
    with pytest.raises(errors.SequenceGap):
        Projections(MARKETS).apply(events[1])


def all_keys(addresses: list[str]) -> Iterator[tuple[str, str | int]]:
    for topic in sorted(wire.ADDRESS_TOPICS):
        for addr in addresses:
            yield topic, addr
    for topic in sorted(wire.MARKET_TOPICS):
        for market in MARKETS:
            yield topic, market


def all_messages(p: Projections, addresses: list[str]) -> dict[tuple[str, str | int], bytes]:
    return {key: p.message(*key) for key in all_keys(addresses)}


def test_snapshot_restore(venue: Venue) -> None:
    venue.feed(venue.engine.withdraw(B, 1_000, ts=5_500_000))
    venue.feed(funding_events(venue))
    data = venue.proj.snapshot()
    restored = Projections.restore(MARKETS, data)
    assert restored.seq == venue.proj.seq
    assert all_messages(restored, [A, B, C]) == all_messages(venue.proj, [A, B, C])
    for addr in (A, C):  # B holds no position: no funding
        assert restored.funding_history(addr) == venue.proj.funding_history(addr) != []
    for addr in (A, B, C):
        assert restored.deposit_withdraw_history(addr) == venue.proj.deposit_withdraw_history(addr)
    assert len(restored.deposit_withdraw_history(B)) == 2
    bid = 2 << 64 | 5990
    assert restored.order_status(396, bid) == venue.proj.order_status(396, bid) is not None
    assert restored.snapshot() == data
    # The restored models go on folding like the original.
    more = [MarkPriceSet(seq=venue.proj.seq + 1, ts=7_300_000, market_id=396, price=5990)]
    assert set(restored.fold(more)) == venue.feed(more) == {("live_funding_rate", 396)}
    assert all_messages(restored, [A, B, C]) == all_messages(venue.proj, [A, B, C])


def test_snapshot_restore_then_the_engine_goes_on(venue: Venue) -> None:
    data = venue.proj.snapshot()
    restored = Projections.restore(MARKETS, data)
    assert restored.seq == venue.proj.seq
    assert all_messages(restored, [A, B, C]) == all_messages(venue.proj, [A, B, C])
    # The restored models go on folding like the original.
    more = venue.engine.cancel_orders(A, 396, [2 << 64 | 5990], ts=6_000_000)
    more += venue.engine.place_limit_order(
        B, 396, is_long=True, is_close=False, size=500, price=5900, leverage=2, ts=6_500_000
    ).events
    assert set(restored.fold(more)) == venue.feed(more)
    assert all_messages(restored, [A, B, C]) == all_messages(venue.proj, [A, B, C])


def test_restore_rejects_bad_snapshots(venue: Venue) -> None:
    with pytest.raises(errors.IntegrityError, match="unreadable"):
        Projections.restore(MARKETS, b"\x00not msgpack")
    with pytest.raises(errors.IntegrityError, match="unknown market"):
        Projections.restore({396: MARKETS[396]}, venue.proj.snapshot())
    # A market known to the book but not to the newer views' data is caught too.
    only_396 = Projections({396: MARKETS[396]})
    only_396.fold(
        [
            Deposited(seq=1, ts=1_000, address=A, amount=5, collateral=5),
            MarkPriceSet(seq=2, ts=2_000, market_id=396, price=6000),
        ]
    )
    assert Projections.restore({396: MARKETS[396]}, only_396.snapshot()).seq == 2
    with pytest.raises(errors.IntegrityError, match="unknown market 396"):
        Projections.restore({397: MARKETS[397]}, only_396.snapshot())
    old = projections._Snapshot(1, 0, 100, {}, {}, {}, {}, {}, {}, [], {}, {}, {}, {}, {}, {})
    with pytest.raises(errors.IntegrityError, match="version 1 is not 4"):
        Projections.restore(MARKETS, projections._snapshot_encoder.encode(old))
    # Version 3 kept rows, in msgpack: refused, so a restart folds the log instead.
    v3 = [3, 0, 100, {}, {}, {}, {}, {}, {}, [], {}, {}, {}, {}, {}, {}]
    with pytest.raises(errors.IntegrityError, match="unreadable"):
        Projections.restore(MARKETS, msgspec.msgpack.encode(v3))
    with pytest.raises(errors.IntegrityError, match="version 3 is not 4"):
        Projections.restore(MARKETS, msgspec.json.encode(v3))


def test_unknown_topic_and_keys() -> None:
    p = Projections(MARKETS)
    with pytest.raises(KeyError):
        p.message("trades", A)
    assert bare(p.message("positions", A)) == b'{"data":[],"message":"positions"}'
    assert bare(p.message("orderbook", "396")) == b'{"data":[],"message":"orderbook"}'
    with pytest.raises(ValueError, match="history_limit"):
        Projections(MARKETS, history_limit=0)


# ---------------------------------------------------------------------- the newer topics


def row_of(message: bytes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(message)["data"]
    return rows


def seq_of(message: bytes) -> int:
    seq: int = json.loads(message)["seq"]
    return seq


def test_recent_trades_newest_first(venue: Venue) -> None:
    # The fixture's fills are events 11 and 12 (deposits 1-3, three orders placed and rested
    # 4-9, C's market order 10). C sold: the taker did not buy.
    trade = {
        "is_buy": False,
        "last_updated": "5000",
        "market_id": "396",
        "price": "5990",
        "size": "200",
        "timestamp": "5000",
        "transaction_version": "12",
    }
    older = {**trade, "price": "6000", "size": "1000", "transaction_version": "11"}
    assert venue.proj.message("recent_trades", 396) == push("recent_trades", [trade, older])[
        :-1
    ] + (b',"seq":12}')
    # A buys 500 more: it takes B's ask at 6010, a buy.
    venue.market(A, True, 500, 6_000_000)
    bought = {
        **trade,
        "is_buy": True,
        "last_updated": "6000",
        "price": "6010",
        "size": "500",
        "timestamp": "6000",
        "transaction_version": "14",
    }
    assert row_of(venue.proj.message("recent_trades", 396)) == [bought, trade, older]
    assert seq_of(venue.proj.message("recent_trades", 396)) == 14
    assert [r.transaction_version for r in venue.proj.recent_trades(396, limit=2)] == ["14", "12"]
    assert (
        bare(venue.proj.message("recent_trades", 397)) == b'{"data":[],"message":"recent_trades"}'
    )


def test_recent_trades_keep_the_newest_n() -> None:
    v = Venue.funded(A, B, amount=1_000_000_000, ts=1_000, history_limit=2)
    for n in range(3):
        v.limit(A, True, 500, 6000 + n, (n + 2) * 1_000)
    v.market(B, False, 1500, 9_000)  # takes 6002, 6001, 6000
    assert [(r.price, r.is_buy) for r in v.proj.recent_trades(396)] == [
        ("6000", False),
        ("6001", False),
    ]


def test_best_price_changes_only_with_the_top_of_the_book() -> None:
    v = Venue.funded(A, B, C, amount=1_000_000_000, ts=1_000)
    assert v.proj.message("best_price", 396) == b'{"data":[],"message":"best_price","seq":0}'
    v.limit(A, True, 1000, 6000, 2_000)
    best = {
        "best_ask_price": None,
        "best_ask_size": None,
        "best_bid_price": "6000",
        "best_bid_size": "1000",
        "last_updated": "2",
        "market_id": "396",
    }
    assert v.proj.message("best_price", 396) == (
        b'{"data":[{"best_ask_price":null,"best_ask_size":null,"best_bid_price":"6000",'
        b'"best_bid_size":"1000","last_updated":"2","market_id":"396"}],'
        b'"message":"best_price","seq":5}'
    )
    # A bid below the best and an ask: the ask side changes the row, the low bid does not.
    assert ("best_price", 396) not in v.limit(B, True, 600, 5990, 3_000)
    assert ("best_price", 396) in v.limit(B, False, 700, 6020, 4_000)
    best = {**best, "best_ask_price": "6020", "best_ask_size": "700", "last_updated": "4"}
    assert row_of(v.proj.message("best_price", 396)) == [best]
    assert seq_of(v.proj.message("best_price", 396)) == 9
    # More size at the best bid changes it; an ask behind the best does not.
    assert ("best_price", 396) in v.limit(C, True, 550, 6000, 5_000)
    assert ("best_price", 396) not in v.limit(C, False, 500, 6030, 6_000)
    best = {**best, "best_bid_size": "1550", "last_updated": "5"}
    assert row_of(v.proj.message("best_price", 396)) == [best]
    # A sell that empties the best bid level: the next bid becomes the best.
    v.market(B, False, 1550, 7_000)
    best = {**best, "best_bid_price": "5990", "best_bid_size": "600", "last_updated": "7"}
    assert row_of(v.proj.message("best_price", 396)) == [best]
    # Cancelling every ask empties that side.
    v.feed(v.engine.cancel_orders(B, 396, [3 << 64 | 6020 | 1 << 32], ts=8_000))
    best = {**best, "best_ask_price": "6030", "best_ask_size": "500", "last_updated": "8"}
    assert row_of(v.proj.message("best_price", 396)) == [best]
    v.feed(v.engine.cancel_orders(C, 396, [5 << 64 | 6030 | 1 << 32], ts=9_000))
    best = {**best, "best_ask_price": None, "best_ask_size": None, "last_updated": "9"}
    assert row_of(v.proj.message("best_price", 396)) == [best]
    asks, bids = v.engine.books[396].levels()
    assert (asks, bids[0]) == ([], (5990, 600))


def test_live_rows_one_per_change_in_event_order(venue: Venue) -> None:
    p = venue.proj
    # The fixture's last batch: C's market order (10) filled A's bids (11, 12).
    # A market order is placed with no price and value; each fill sets them.
    c_order = {**C_SELL, "order_value": "0", "price": "0", "status": "Open"}
    a_trade = {**A_TRADE_5990, "price": "6000", "size": "1000"}
    c_trade = {**a_trade, "address": C, "fee": "3000", "order_type": 2, "trade_id": tid(3)}
    expected = [
        ("live_order_history", C, 10, c_order),
        ("live_order_history", A, 11, A_BID_6000),
        ("live_trade_history", A, 11, a_trade),
        (
            "live_order_history",
            C,
            11,
            {**c_order, "order_value": "6000000", "price": "6000", "status": "Partially Filled"},
        ),
        ("live_trade_history", C, 11, c_trade),
        ("live_order_history", A, 12, A_BID_5990),
        ("live_trade_history", A, 12, A_TRADE_5990),
        ("live_order_history", C, 12, C_SELL),
        ("live_trade_history", C, 12, {**c_trade, "fee": "599", "price": "5990", "size": "200"}),
    ]
    assert [
        (stream[0], stream[1], seq, msgspec.to_builtins(row)) for stream, seq, row in p.live
    ] == expected
    # Encoded one message per row, each with its own seq, only for the streams wanted.
    messages = p.live_messages(lambda stream: stream[1] == A)
    assert messages == [
        (
            (topic, key),
            push(topic, [row])[:-1] + b',"seq":%d}' % seq,
        )
        for topic, key, seq, row in expected
        if key == A
    ]
    # A subscriber's first message is the newest row, with the seq of its change.
    assert p.message("live_trade_history", C) == push("live_trade_history", [expected[-1][3]])[
        :-1
    ] + (b',"seq":12}')
    assert p.message("live_order_history", A) == push("live_order_history", [A_BID_5990])[:-1] + (
        b',"seq":12}'
    )
    assert bare(p.message("live_order_history", B)) == push(
        "live_order_history",
        [
            {
                "address": B,
                "is_market_order": False,
                "last_updated": "4000",
                "leverage": 2,
                "market_id": "396",
                "order_id": oid(3, 6010 | 1 << 32),
                "order_type": 2,
                "order_value": "4207000",
                "price": "6010",
                "size": "700",
                "status": "Open",
                "timestamp": "4000",
                "trade_id": tid(2),
            }
        ],
    )
    assert p.message("live_trade_history", B) == (
        b'{"data":[],"message":"live_trade_history","seq":0}'
    )
    # The next batch starts a new list; a resting limit order pushes one row, not two (its
    # rested state shows nothing new), and live streams are not in the changed set.
    changed = venue.limit(B, True, 500, 5900, 6_000_000)
    assert [(s, seq, r.status) for s, seq, r in p.live] == [  # type: ignore[union-attr]
        (("live_order_history", B), 13, "Open")
    ]
    assert not {key for key in changed if key[0] in wire.LIVE_TOPICS}
    assert seq_of(p.message("live_order_history", B)) == 13
    venue.feed(venue.engine.deposit(A, 1, ts=6_100_000))
    assert p.live == []


def test_live_messages_of_a_batch_applied_at_once_or_event_by_event(venue: Venue) -> None:
    whole = Projections(MARKETS)
    whole.fold(venue.log)
    single = Projections(MARKETS)
    singles = []
    for event in venue.log:
        single.apply(event)
        singles.extend(single.live)
    assert singles == whole.live  # the whole log's live rows, in order
    assert len([s for s in singles if s[0][0] == "live_trade_history"]) == 4


def test_deposit_withdraw_history() -> None:
    v = Venue.funded(A, amount=10_000_000, ts=1_000_000, history_limit=2)
    v.feed(v.engine.withdraw(A, 2_500, ts=2_000_000))
    row = {
        "address": A,
        "amount": "2500",
        "is_deposit": False,
        "last_updated": "2000",
        "timestamp": "2000",
        "transaction_version": "2",
    }
    first = {
        **row,
        "amount": "10000000",
        "is_deposit": True,
        "last_updated": "1000",
        "timestamp": "1000",
        "transaction_version": "1",
    }
    assert v.proj.message("deposit_withdraw_history", A) == push(
        "deposit_withdraw_history", [row, first]
    )[:-1] + (b',"seq":2}')
    assert v.feed(v.engine.deposit(A, 7, ts=3_000_000)) == {("deposit_withdraw_history", A)}
    # history_limit 2: the oldest goes.
    assert [r.amount for r in v.proj.deposit_withdraw_history(A)] == ["7", "2500"]
    assert [r.amount for r in v.proj.deposit_withdraw_history(A, limit=1)] == ["7"]
    assert v.proj.deposit_withdraw_history(B) == []


def test_order_status_by_id(venue: Venue) -> None:
    p = venue.proj
    assert msgspec.to_builtins(p.order_status(396, 1 << 64 | 6000)) == A_BID_6000
    assert p.order_status(397, 1 << 64 | 6000) is None  # ids are global: wrong market
    assert p.order_status(396, 99 << 64) is None
    small = Venue.funded(A, B, amount=1_000_000_000, ts=1_000, history_limit=2)
    for n in range(3):
        small.limit(A, True, 500, 6000 - n, (n + 2) * 1_000)
    # The oldest of A's three orders left the window: projections no longer know it.
    assert small.proj.order_status(396, 1 << 64 | 6000) is None
    assert small.proj.order_status(396, 3 << 64 | 5998) is not None
    # Filling it brings it back.
    small.market(B, False, 500, 9_000)
    row = small.proj.order_status(396, 1 << 64 | 6000)
    assert row is not None and row.status == "Filled"
    assert small.proj.order_status(396, 2 << 64 | 5999) is None


def funding_events(v: Venue) -> list[AnyEvent]:
    """A settlement after the fixture: A (long 1200, value 7198000) pays C (short) 0.75 %."""
    seq, ts = v.proj.seq, 7_200_000
    a_pos = v.engine.positions[(A, 396, True)]
    c_pos = v.engine.positions[(C, 396, False)]
    return [
        IndexPriceSet(seq=seq + 1, ts=7_000_000, market_id=396, price=5900),
        MarkPriceSet(seq=seq + 2, ts=7_100_000, market_id=396, price=6030),
        FundingSettled(
            seq=seq + 3,
            ts=ts,
            market_id=396,
            mark=6030,
            index=5900,
            rate_num=3,
            rate_den=400,
            payments=[
                FundingPayment(
                    position=msgspec.structs.replace(
                        a_pos, margin=a_pos.margin - 53_985, updated=ts
                    ),
                    amount=-53_985,
                ),
                FundingPayment(
                    position=msgspec.structs.replace(
                        c_pos, margin=c_pos.margin + 53_985, updated=ts
                    ),
                    amount=53_985,
                ),
            ],
            dust=0,
            next_funding=10_800_000,
        ),
    ]


def test_live_funding_rate_from_marks_indexes_and_settlements(venue: Venue) -> None:
    p = venue.proj
    assert p.message("live_funding_rate", 396) == (
        b'{"data":[],"message":"live_funding_rate","seq":0}'
    )
    # A mark alone: no premium can be measured; the next funding is the next hour boundary
    # after the event (ts 6000 s: 7200 s).
    assert venue.feed(venue.engine.set_mark_price(396, 6030, ts=6_000_000)) == {
        ("live_funding_rate", 396)
    }
    assert p.message("live_funding_rate", 396) == (
        b'{"data":[{"funding_rate":"0","index_price":null,"last_updated":"6000",'
        b'"mark_price":"6030","market_id":"396","next_funding_time":"7200"}],'
        b'"message":"live_funding_rate","seq":13}'
    )
    seq = p.seq

    def funding(*events: AnyEvent) -> set[tuple[str, str | int]]:
        return venue.feed(list(events))

    # Index 6000: premium 30/6000 = 0.5 %, under the 0.75 % cap.
    assert funding(IndexPriceSet(seq=seq + 1, ts=6_500_000, market_id=396, price=6000)) == {
        ("live_funding_rate", 396)
    }
    row = {
        "funding_rate": "0.005",
        "index_price": "6000",
        "last_updated": "6500",
        "mark_price": "6030",
        "market_id": "396",
        "next_funding_time": "7200",
    }
    assert p.message("live_funding_rate", 396) == push("live_funding_rate", [row])[:-1] + (
        b',"seq":14}'
    )
    # Index 6029: 1/6029 = 0.000165864985901... does not end: 12 places, rounded.
    funding(IndexPriceSet(seq=seq + 2, ts=6_600_000, market_id=396, price=6029))
    assert row_of(p.message("live_funding_rate", 396)) == [
        {**row, "funding_rate": "0.000165864986", "index_price": "6029", "last_updated": "6600"}
    ]
    # Index 5900: 130/5900 = 2.2 % is clamped to the cap; mark 6100 vs index 7000 to -cap.
    funding(IndexPriceSet(seq=seq + 3, ts=6_700_000, market_id=396, price=5900))
    assert row_of(p.message("live_funding_rate", 396))[0]["funding_rate"] == "0.0075"
    # The same index again, later: nothing shown changes, so no push (and the seq stays).
    assert funding(IndexPriceSet(seq=seq + 4, ts=6_800_000, market_id=396, price=5900)) == set()
    assert seq_of(p.message("live_funding_rate", 396)) == seq + 3
    assert row_of(p.message("live_funding_rate", 396))[0]["last_updated"] == "6700"
    # The due time stays where the first price put it until a settlement moves it, even when
    # it has passed (as in the engine: it settles once it can, however late).
    assert funding(MarkPriceSet(seq=seq + 5, ts=7_300_000, market_id=396, price=6030)) == set()
    assert row_of(p.message("live_funding_rate", 396))[0]["next_funding_time"] == "7200"
    funding(IndexPriceSet(seq=seq + 6, ts=7_400_000, market_id=396, price=7000))
    assert row_of(p.message("live_funding_rate", 396))[0]["funding_rate"] == "-0.0075"
    # Other markets are untouched.
    assert p.live_funding_rate(397) == []


def test_funding_settlement_moves_margins_and_records_payments(venue: Venue) -> None:
    p = venue.proj
    events = funding_events(venue)
    assert venue.feed(events[:2]) == {("live_funding_rate", 396)}
    changed = venue.feed(events[2:])
    assert changed == keys(("positions", A), ("positions", C), ("live_funding_rate", 396))
    settle = events[2].seq
    # Margins moved by the payments; last_updated is the settlement's.
    (a_row,) = p.positions(A)
    (c_row,) = p.positions(C)
    assert (a_row.margin, a_row.last_updated) == (str(3_599_000 - 53_985), "7200")
    assert (c_row.margin, c_row.last_updated) == (str(1_799_500 + 53_985), "7200")
    # The rate shown is the settled one; the next funding time the settlement announced.
    assert p.message("live_funding_rate", 396) == (
        b'{"data":[{"funding_rate":"0.0075","index_price":"5900","last_updated":"7200",'
        b'"mark_price":"6030","market_id":"396","next_funding_time":"10800"}],'
        b'"message":"live_funding_rate","seq":%d}' % settle
    )
    payment = {
        "address": A,
        "amount": "-53985",
        "funding_rate": "0.0075",
        "is_long": True,
        "market_id": "396",
        "size": "1200",
        "timestamp": "7200",
        "trade_id": tid(1),
        "transaction_version": str(settle),
    }
    assert [msgspec.to_builtins(r) for r in p.funding_history(A)] == [payment]
    assert [msgspec.to_builtins(r) for r in p.funding_history(C)] == [
        {**payment, "address": C, "amount": "53985", "is_long": False, "trade_id": tid(3)}
    ]
    assert p.funding_history(B) == []
    # A later mark moves the rate, not the announced time (even once it has passed).
    venue.feed([MarkPriceSet(seq=settle + 1, ts=11_000_000, market_id=396, price=5900)])
    assert row_of(p.message("live_funding_rate", 396)) == [
        {
            "funding_rate": "0",
            "index_price": "5900",
            "last_updated": "11000",
            "mark_price": "5900",
            "market_id": "396",
            "next_funding_time": "10800",
        }
    ]
    # Funding rows keep the newest history_limit per address.
    small = Projections(MARKETS, history_limit=1)
    small.fold(venue.log)
    assert [r.transaction_version for r in small.funding_history(A)] == [str(settle)]


def test_funding_through_the_engine(venue: Venue) -> None:
    """The engine's index price, mark and settlement (A long 1200 pays C short 1200)."""
    p, engine = venue.proj, venue.engine
    # The index first: the market's first price sets when the first funding is due.
    venue.feed(engine.set_index_price(396, 6000, ts=6_000_000))
    row = {
        "funding_rate": "0",
        "index_price": "6000",
        "last_updated": "6000",
        "mark_price": None,
        "market_id": "396",
        "next_funding_time": "7200",
    }
    assert p.message("live_funding_rate", 396) == push("live_funding_rate", [row])[:-1] + (
        b',"seq":13}'
    )
    venue.feed(engine.set_mark_price(396, 6030, ts=6_500_000))
    row = {**row, "funding_rate": "0.005", "last_updated": "6500", "mark_price": "6030"}
    assert row_of(p.message("live_funding_rate", 396)) == [row]
    assert engine.settle_funding(396, ts=7_199_999) == []  # not due yet
    events = engine.settle_funding(396, ts=7_200_000)
    assert [type(e).__name__ for e in events] == ["FundingSettled"]
    assert venue.feed(events) == keys(
        ("positions", A), ("positions", C), ("live_funding_rate", 396)
    )
    # Longs pay ceil(1200 * 6030 * 0.005) = 36180 from their margin; C, the only short, gets it.
    (a_row,) = p.positions(A)
    (c_row,) = p.positions(C)
    assert (a_row.margin, c_row.margin) == (str(3_599_000 - 36_180), str(1_799_500 + 36_180))
    assert a_row == wire.position_row(engine.positions[(A, 396, True)], MARKETS[396])
    assert c_row == wire.position_row(engine.positions[(C, 396, False)], MARKETS[396])
    assert row_of(p.message("live_funding_rate", 396)) == [
        {**row, "last_updated": "7200", "next_funding_time": "10800"}
    ]
    assert seq_of(p.message("live_funding_rate", 396)) == events[0].seq
    assert [(r.address, r.amount, r.funding_rate) for r in p.funding_history(A)] == [
        (A, "-36180", "0.005")
    ]
    assert [(r.address, r.amount, r.is_long) for r in p.funding_history(C)] == [(C, "36180", False)]
    assert int(p.live_funding_rate(396)[0].next_funding_time) * 1000 == engine.funding_due[396]


# ---------------------------------------------------------------------- random command streams

TRADERS = [A, B, C]
# One flat draw per command; the kind picks the fields it needs. Limit orders come first and
# most often, so that shrinking leads to them and books fill up.
KINDS = [
    "limit",
    "limit",
    "limit",
    "market",
    "market",
    "cancel",
    "mark",
    "tp",
    "sl",
    "margin",
    "index",
    "settle",
]
# Market 396 with a 2 s funding interval, so that random streams settle funding often.
FAST = {**MARKETS, 396: msgspec.structs.replace(MARKETS[396], funding_interval_s=2)}
COMMAND = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 2),  # trader
    st.booleans(),  # long side
    st.sampled_from([False, False, True]),  # close: a close needs a position
    st.integers(500, 3000),  # lots
    st.integers(5985, 6015),  # limit price
    st.sampled_from([1, 2, 5, 10, 20]),  # leverage
    st.sampled_from([0, 0, 0, 1, 2, 3]),  # restriction
    st.one_of(st.none(), st.integers(5000, 7200)),  # mark or trigger price
    st.integers(1, 500_000),  # margin to add
)
COMMANDS = st.lists(COMMAND, min_size=10, max_size=60)
FUNDS = st.lists(st.integers(5_000_000, 100_000_000), min_size=3, max_size=3)


def run_command(engine: Engine, step: int, cmd: tuple[Any, ...], ts: int) -> list[AnyEvent]:
    """Run a drawn command. Trader and side rotate with the step, so that the draws Hypothesis
    prefers (zeros, False) still give several traders on both sides of the book."""
    kind, trader, side, is_close, size, price, leverage, restriction, level, amount = cmd
    addr = TRADERS[(trader + step) % 3]
    is_long = side != bool(step % 2)
    if kind == "limit":
        return engine.place_limit_order(
            addr,
            396,
            is_long=is_long,
            is_close=is_close,
            size=size,
            price=price,
            leverage=leverage,
            restriction=restriction,
            ts=ts,
        ).events
    if kind == "market":
        return engine.place_market_order(
            addr, 396, is_long=is_long, is_close=is_close, size=size, leverage=leverage, ts=ts
        ).events
    if kind == "cancel":
        mine = [o.order_id for o in engine.orders.values() if o.address == addr]
        ids = [mine[size % len(mine)]] if mine else []  # none: rejected, as it should be
        return engine.cancel_orders(addr, 396, ids, ts=ts)
    if kind == "mark":
        return engine.set_mark_price(396, level or price, ts=ts)
    if kind == "index":
        return engine.set_index_price(396, level or price, ts=ts)
    if kind == "settle":
        return engine.settle_funding(396, ts=ts)
    if kind == "margin":
        return engine.add_margin(addr, 396, is_long, amount, ts=ts)
    update = engine.update_take_profit if kind == "tp" else engine.update_stop_loss
    return update(addr, 396, is_long, level, ts=ts)


def check_against_engine(p: Projections, engine: Engine, log: list[AnyEvent]) -> None:
    asks, bids = engine.books[396].levels()
    rows = p.orderbook(396)
    assert [(int(r.price), int(r.size)) for r in rows if r.is_ask] == asks
    assert [(int(r.price), int(r.size)) for r in rows if not r.is_ask] == bids
    assert [r.is_ask for r in rows] == [True] * len(asks) + [False] * len(bids)
    best = p.best_price(396)
    if best:  # the book changed at least once
        (row,) = best
        assert (row.best_ask_price, row.best_ask_size) == (
            (str(asks[0][0]), str(asks[0][1])) if asks else (None, None)
        )
        assert (row.best_bid_price, row.best_bid_size) == (
            (str(bids[0][0]), str(bids[0][1])) if bids else (None, None)
        )
    else:
        assert not asks and not bids
    fills = [e for e in log if isinstance(e, Fill)]
    assert (
        p.recent_trades(396) == [wire.recent_trade_row(e) for e in fills[::-1]][: p.history_limit]
    )
    if 396 in engine.funding_due:  # a mark or index price was set
        (funding,) = p.live_funding_rate(396)
        mark, index = engine.marks.get(396), engine.index_prices.get(396)
        rate = engine.current_funding_rate(396) or Fraction(0)
        assert funding == wire.FundingRateRow(
            funding_rate=wire.format_rate(rate.numerator, rate.denominator),
            index_price=None if index is None else str(index),
            last_updated=funding.last_updated,
            mark_price=None if mark is None else str(mark),
            market_id="396",
            next_funding_time=str(engine.funding_due[396] // 1000),
        )
    else:
        assert p.live_funding_rate(396) == []
    latest = {}
    for event in log:
        if isinstance(event, OrderPlaced | OrderRested | OrderCancelled):
            latest[event.order.order_id] = event.order
        elif isinstance(event, Fill):
            for side in (event.maker, event.taker):
                latest[side.order.order_id] = side.order
    for addr in TRADERS:
        assert p.open_orders(addr) == [
            wire.open_order_row(o) for o in engine.orders.values() if o.address == addr
        ]
        slots = sorted(
            (pos for pos in engine.positions.values() if pos.address == addr and pos.size),
            key=lambda pos: (pos.market_id, not pos.is_long),
        )
        got = p.positions(addr)
        assert len(got) == len(slots)
        for row, pos in zip(got, slots, strict=True):
            # The engine also stamps `updated` for pending-order bookkeeping; the view's
            # last_updated is the last change of a field on the wire, never later.
            expected = wire.position_row(pos, MARKETS[396])
            assert int(row.last_updated) <= int(expected.last_updated)
            assert _without_time(row) == _without_time(expected)
        history = p.order_history(addr)
        ids = [r.order_id for r in history]
        mine = [o for o in latest.values() if o.address == addr]
        assert len(set(ids)) == len(ids) == min(len(mine), p.history_limit)
        for r in history:
            assert r == wire.order_history_row(latest[int(r.order_id)])
        fills = [
            wire.trade_row(side, e)
            for e in log
            if isinstance(e, Fill)
            for side in (e.maker, e.taker)
            if side.order.address == addr
        ]
        assert p.trade_history(addr) == fills[::-1][: p.history_limit]
        moves = [
            wire.deposit_withdraw_row(e)
            for e in log
            if isinstance(e, Deposited | Withdrew) and e.address == addr
        ]
        assert p.deposit_withdraw_history(addr) == moves[::-1][: p.history_limit]
        paid = [
            wire.funding_history_row(payment, e)
            for e in log
            if isinstance(e, FundingSettled)
            for payment in e.payments
            if payment.position.address == addr
        ]
        assert p.funding_history(addr) == paid[::-1][: p.history_limit]


def expected_live(log: list[AnyEvent]) -> list[projections.LiveRow]:
    """The live pushes of a log, computed independently: one per fill side, and one per order
    event whose history row differs from that order's previous row."""
    rows: dict[int, wire.OrderHistoryRow] = {}
    live: list[projections.LiveRow] = []

    def order_changed(order: Any, seq: int) -> None:
        row = wire.order_history_row(order)
        if rows.get(order.order_id) != row:
            rows[order.order_id] = row
            live.append((("live_order_history", order.address), seq, row))

    for event in log:
        if isinstance(event, OrderPlaced | OrderRested | OrderCancelled):
            order_changed(event.order, event.seq)
        elif isinstance(event, Fill):
            for side in (event.maker, event.taker):
                order_changed(side.order, event.seq)
                trade = wire.trade_row(side, event)
                live.append((("live_trade_history", side.order.address), event.seq, trade))
    return live


def _without_time(row: wire.PositionRow) -> tuple[Any, ...]:
    return tuple(getattr(row, f) for f in row.__struct_fields__ if f != "last_updated")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=COMMANDS, funds=FUNDS)
def test_random_streams_match_the_engine(commands: list[tuple[Any, ...]], funds: list[int]) -> None:
    engine = Engine(FAST)
    batched = Projections(FAST, history_limit=6)
    single = Projections(FAST, history_limit=6)
    log: list[AnyEvent] = []
    ts = 1_000
    batches = [
        engine.deposit(addr, amount, ts=ts) for addr, amount in zip(TRADERS, funds, strict=True)
    ]
    for step, cmd in enumerate(commands):
        ts += 700
        with contextlib.suppress(errors.CommandRejected):
            batches.append(run_command(engine, step, cmd, ts))
    live: list[projections.LiveRow] = []
    for events in batches:
        before = all_messages(batched, TRADERS)
        changed = set(batched.fold(events))
        live.extend(batched.live)
        after = all_messages(batched, TRADERS)
        live_streams = {stream for stream, _, _ in batched.live}
        assert {k for k in after if after[k] != before[k]} <= changed | live_streams
        assert not {k for k in changed if k[0] in wire.LIVE_TOPICS}
        for stream in live_streams:  # a live stream's message is its newest row
            newest = [row for s, _, row in batched.live if s == stream][-1]
            assert json.loads(after[stream])["data"] == [msgspec.to_builtins(newest)]
        for event in events:
            single.apply(event)
        log.extend(events)
    assert live == expected_live(log)
    check_against_engine(batched, engine, log)
    whole = Projections(FAST, history_limit=6)
    whole.fold(log)
    expected = all_messages(single, TRADERS)
    assert all_messages(batched, TRADERS) == expected
    assert all_messages(whole, TRADERS) == expected
    for topic, key in expected:
        check_message_types(topic, expected[topic, key])
    restored = Projections.restore(FAST, batched.snapshot())
    assert all_messages(restored, TRADERS) == expected


class EagerReference:
    """The order_history and positions views folded the straightforward way: every change's
    row built at once, and a change that leaves a row as it was told apart by comparing rows
    (the projections compare states and build rows only when read)."""

    def __init__(self, history_limit: int) -> None:
        self.limit = history_limit
        self.orders: dict[str, dict[int, wire.OrderHistoryRow]] = {}
        self.positions: dict[str, dict[tuple[int, bool], wire.PositionRow]] = {}

    def apply(self, event: AnyEvent) -> set[tuple[str, str | int]]:
        changed: set[tuple[str, str | int]] = set()
        if isinstance(event, OrderPlaced | OrderRested | OrderCancelled):
            self.order(event.order, changed)
        elif isinstance(event, Fill):
            for side in (event.maker, event.taker):
                self.order(side.order, changed)
                self.position(side.position, changed)
        elif isinstance(event, PositionUpdated):
            self.position(event.position, changed)
        elif isinstance(event, FundingSettled):
            for payment in event.payments:
                self.position(payment.position, changed)
        elif isinstance(event, PositionReleased):
            slots = self.positions.get(event.address, {})
            if slots.pop((event.market_id, event.is_long), None) is not None:
                changed.add(("positions", event.address))
        return changed

    def order(self, order: Any, changed: set[tuple[str, str | int]]) -> None:
        rows = self.orders.setdefault(order.address, {})
        row = wire.order_history_row(order)
        old = rows.pop(order.order_id, None)
        newest = next(reversed(rows), None) if old == row else None
        rows[order.order_id] = row  # the newest end
        if old != row or newest is not None:  # changed, or moved to the front
            changed.add(("order_history", order.address))
        if len(rows) > self.limit:
            del rows[next(iter(rows))]

    def position(self, pos: Any, changed: set[tuple[str, str | int]]) -> None:
        slots = self.positions.setdefault(pos.address, {})
        slot = (pos.market_id, pos.is_long)
        if not pos.size:
            if slots.pop(slot, None) is not None:
                changed.add(("positions", pos.address))
            return
        row = wire.position_row(pos, FAST[pos.market_id])
        if slots.get(slot) != row:
            slots[slot] = row
            changed.add(("positions", pos.address))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=COMMANDS, funds=FUNDS, batch=st.integers(1, 4))
def test_random_streams_match_an_eager_reference(
    commands: list[tuple[Any, ...]], funds: list[int], batch: int
) -> None:
    """After every batch: the history and position views and their changed keys are the
    eager reference's, and every message is ``encode_message`` of its view's rows."""
    engine = Engine(FAST)
    p = Projections(FAST, history_limit=6)
    reference = EagerReference(history_limit=6)
    events: list[AnyEvent] = []
    ts = 1_000
    for addr, amount in zip(TRADERS, funds, strict=True):
        events += engine.deposit(addr, amount, ts=ts)
    batches: list[list[AnyEvent]] = []
    for step, cmd in enumerate(commands):
        ts += 700
        with contextlib.suppress(errors.CommandRejected):
            events += run_command(engine, step, cmd, ts)
        if step % batch == 0:
            batches.append(events)
            events = []
    batches.append(events)
    for events in batches:
        for key in all_keys(TRADERS):
            p.message(*key)  # cached, as for watched streams
        changed = set(p.fold(events))
        expected: set[tuple[str, str | int]] = set()
        for event in events:
            expected |= reference.apply(event)
        assert {k for k in changed if k[0] in ("order_history", "positions")} == expected
        for addr in TRADERS:
            assert p.order_history(addr) == list(reference.orders.get(addr, {}).values())[::-1]
            slots = reference.positions.get(addr, {})
            assert p.positions(addr) == [
                slots[k] for k in sorted(slots, key=lambda k: (k[0], not k[1]))
            ]
        for topic, key in all_keys(TRADERS):
            seq = p.changed_at(topic, key)
            assert p.message(topic, key) == wire.encode_message(topic, p.view(topic, key), seq)
        for stream, seq, row in p.live:
            assert (stream, wire.encode_message(stream[0], [row], seq)) in p.live_messages(
                lambda s, stream=stream: s == stream
            )


def test_an_order_touched_without_a_new_row_moves_to_the_front() -> None:
    v = Venue.funded(A, B, amount=10**9, ts=1_000)
    v.limit(A, False, 2000, 6010, ts=10_000)
    v.market(B, True, 500, ts=10_100)  # A's ask: Partially Filled, last_updated "10"
    v.limit(A, False, 1000, 6020, ts=10_200)  # a newer order of A's
    ask, newer = (r.order_id for r in v.proj.order_history(A)[::-1])
    before = v.proj.order_history(A)[1]
    assert v.proj.order_history(A)[0].order_id == newer
    changed = v.market(B, True, 500, ts=10_300)  # the same row again, in the same second
    assert ("order_history", A) in changed
    assert [r.order_id for r in v.proj.order_history(A)] == [ask, newer]
    assert v.proj.order_history(A)[0] == before
    # Not a new row: no live_order_history push for A (B's market order has its own).
    assert {s for s, _, _ in v.proj.live if s[0] == "live_order_history"} == {
        ("live_order_history", B)
    }
    seq = v.log[-1].seq
    assert json.loads(v.proj.message("order_history", A))["seq"] == seq
    # Touched while newest already: no change at all.
    changed = v.market(B, True, 500, ts=10_400)
    assert ("order_history", A) not in changed


def test_a_failing_event_leaves_the_events_before_it_applied(venue: Venue) -> None:
    seq = venue.proj.seq
    deposit = Deposited(seq=seq + 1, ts=6_000_000, address=B, amount=1, collateral=1)
    fill = next(e for e in venue.log if isinstance(e, Fill))  # its maker order is gone now
    with pytest.raises(errors.IntegrityError, match="is not resting"):
        venue.proj.fold([deposit, msgspec.structs.replace(fill, seq=seq + 2)])
    assert venue.proj.seq == seq + 1
    assert venue.proj.changed_at("deposit_withdraw_history", B) == seq + 1
    assert json.loads(venue.proj.message("deposit_withdraw_history", B))["seq"] == seq + 1
