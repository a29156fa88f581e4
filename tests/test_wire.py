"""Wire rows and the envelope against the venue's published examples (reference README §1)."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from perps_indexer import wire
from perps_indexer.events import (
    FILLED,
    OPEN,
    Deposited,
    Fill,
    FillSide,
    FundingPayment,
    FundingSettled,
    OrderState,
    PositionState,
    Withdrew,
)
from perps_indexer.markets import default_markets

ADDR = "0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770"
OTHER = "0x00000000000000000000000000000000000000000000000000000000000000aa"
SPEC = default_markets()[396]

# The venue's example pushes, copied from the reference. The trade_history example lacks the
# closing bracket of "data" in the reference text; it is restored here.
POSITIONS_EXAMPLE = (
    '{"data":[{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
    '"entry_price":"6050","is_long":false,"last_updated":"1739788459","leverage":2,'
    '"liq_price":"8853.658536585366","margin":"3025000","market_id":"396","size":"1000",'
    '"sl":null,"tp":null,"trade_id":"16509835945970048696716","value":"6050000"}],'
    '"message":"positions"}'
)
TRADE_EXAMPLE = (
    '{"data":[{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
    '"fee":"3025","last_updated":"1739788459","market_id":"396","order_type":2,"pnl":"0",'
    '"price":"6050","size":"1000","timestamp":"1739788459",'
    '"trade_id":"16509835945970048696716"}],"message":"trade_history"}'
)
OPEN_ORDERS_EXAMPLE = (
    '{"data":[{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
    '"last_updated":"1739790733","leverage":2,"market_id":"396",'
    '"order_id":"12907057702855018828273522","order_type":1,"order_value":"6002000",'
    '"price":"6002","remaining_size":"1000","timestamp":"1739790733","total_size":"1000",'
    '"trade_id":"16528282690043758248332"}],"message":"open_orders"}'
)
ORDER_HISTORY_EXAMPLE = (
    '{"data":[{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
    '"is_market_order":false,"last_updated":"1739790733","leverage":2,"market_id":"396",'
    '"order_id":"12907057702855018828273522","order_type":1,"order_value":"6002000",'
    '"price":"6002","size":"1000","status":"Open","timestamp":"1739790733",'
    '"trade_id":"16528282690043758248332"},'
    '{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
    '"is_market_order":false,"last_updated":"1739790700","leverage":2,"market_id":"396",'
    '"order_id":"12906965467445688751095808","order_type":4,"order_value":"6002000",'
    '"price":"6002","size":"1000","status":"Filled","timestamp":"1739790700",'
    '"trade_id":"16509835945970048696716"}],"message":"order_history"}'
)
ORDERBOOK_EXAMPLE = (
    '{"data":[{"is_ask":true,"last_updated":"1739790988","market_id":"396","price":"6036",'
    '"size":"169320"},{"is_ask":true,"last_updated":"1739758360","market_id":"396",'
    '"price":"8000","size":"500"},{"is_ask":false,"last_updated":"1739790990",'
    '"market_id":"396","price":"6002","size":"1000"}],"message":"orderbook"}'
)

# JSON types per field, transcribed from the reference README §1 table.
S, INT, B, N = str, int, bool, type(None)
ORDER_FIELDS: dict[str, tuple[type, ...]] = {
    "address": (S,),
    "last_updated": (S,),
    "leverage": (INT,),
    "market_id": (S,),
    "order_id": (S,),
    "order_type": (INT,),
    "order_value": (S,),
    "price": (S,),
    "timestamp": (S,),
    "trade_id": (S,),
}
"""The fields open_orders and order_history share."""
FIELD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    wire.POSITIONS: {
        "address": (S,),
        "entry_price": (S,),
        "is_long": (B,),
        "last_updated": (S,),
        "leverage": (INT,),
        "liq_price": (S,),
        "margin": (S,),
        "market_id": (S,),
        "size": (S,),
        "sl": (S, N),
        "tp": (S, N),
        "trade_id": (S,),
        "value": (S,),
    },
    wire.TRADE_HISTORY: {
        "address": (S,),
        "fee": (S,),
        "last_updated": (S,),
        "market_id": (S,),
        "order_type": (INT,),
        "pnl": (S,),
        "price": (S,),
        "size": (S,),
        "timestamp": (S,),
        "trade_id": (S,),
    },
    wire.OPEN_ORDERS: {
        **ORDER_FIELDS,
        "remaining_size": (S,),
        "total_size": (S,),
    },
    wire.ORDER_HISTORY: {
        **ORDER_FIELDS,
        "is_market_order": (B,),
        "size": (S,),
        "status": (S,),
    },
    wire.ORDERBOOK: {
        "is_ask": (B,),
        "last_updated": (S,),
        "market_id": (S,),
        "price": (S,),
        "size": (S,),
    },
    # The later generations' topics (reference §6), as this project defines their rows.
    wire.RECENT_TRADES: {
        "is_buy": (B,),
        "last_updated": (S,),
        "market_id": (S,),
        "price": (S,),
        "size": (S,),
        "timestamp": (S,),
        "transaction_version": (S,),
    },
    wire.BEST_PRICE: {
        "best_ask_price": (S, N),
        "best_ask_size": (S, N),
        "best_bid_price": (S, N),
        "best_bid_size": (S, N),
        "last_updated": (S,),
        "market_id": (S,),
    },
    wire.DEPOSIT_WITHDRAW_HISTORY: {
        "address": (S,),
        "amount": (S,),
        "is_deposit": (B,),
        "last_updated": (S,),
        "timestamp": (S,),
        "transaction_version": (S,),
    },
    wire.LIVE_FUNDING_RATE: {
        "funding_rate": (S,),
        "index_price": (S, N),
        "last_updated": (S,),
        "mark_price": (S, N),
        "market_id": (S,),
        "next_funding_time": (S,),
    },
}
# The live topics reuse the history rows, one per push.
FIELD_TYPES[wire.LIVE_TRADE_HISTORY] = FIELD_TYPES[wire.TRADE_HISTORY]
FIELD_TYPES[wire.LIVE_ORDER_HISTORY] = FIELD_TYPES[wire.ORDER_HISTORY]


def check_message_types(topic: str, message: bytes) -> list[dict[str, object]]:
    """Assert a push's envelope, key order and every row's field set and JSON types."""
    doc = json.loads(message)
    # Protocol v2 appends "seq" after the original keys.
    assert list(doc) in (["data", "message"], ["data", "message", "seq"])
    assert isinstance(doc.get("seq", 0), int)
    assert doc["message"] == topic
    fields = FIELD_TYPES[topic]
    for row in doc["data"]:
        assert list(row) == sorted(fields), "fields are alphabetical, as in the examples"
        for name, value in row.items():
            # bool is a subclass of int: compare exact types.
            assert type(value) in fields[name], (topic, name, value)
    rows: list[dict[str, object]] = doc["data"]
    return rows


def position(**changes: object) -> PositionState:
    pos = PositionState(
        address=ADDR,
        market_id=396,
        is_long=False,
        trade_id=(895 << 64) | 396,
        leverage=2,
        size=1000,
        value=6_050_000,
        margin=3_025_000,
        updated=1_739_788_459_000,
    )
    return msgspec.structs.replace(pos, **changes)


def order(**changes: object) -> OrderState:
    base = OrderState(
        order_id=12907057702855018828273522,
        market_id=396,
        address=ADDR,
        is_long=True,
        is_close=False,
        is_market=False,
        restriction=0,
        order_type=1,
        price=6002,
        size=1000,
        remaining=1000,
        leverage=2,
        trade_id=16528282690043758248332,
        status=OPEN,
        value=6_002_000,
        created=1_739_790_733_000,
        updated=1_739_790_733_000,
    )
    return msgspec.structs.replace(base, **changes)


def test_positions_example_byte_for_byte() -> None:
    row = wire.position_row(position(), SPEC)
    assert row.trade_id == "16509835945970048696716"
    assert wire.encode_message(wire.POSITIONS, [row]).decode() == POSITIONS_EXAMPLE


def test_long_position_liquidation_price_from_reference() -> None:
    row = wire.position_row(position(is_long=True), SPEC)
    assert (row.liq_price, row.entry_price, row.is_long) == ("3102.5641025641025", "6050", True)


def test_position_row_with_fraction_entry_triggers_and_added_margin() -> None:
    # 6050500 / 1000 = 6050.5; added margin 605050 is 10 % of the value, so the short's cushion
    # is 1/2 + 0.1 and liq = 6050.5 * 1.6 / 1.025.
    pos = position(value=6_050_500, added_margin=605_050, margin=3_630_300, tp=5000, sl=7000)
    row = wire.position_row(pos, SPEC)
    assert row.entry_price == "6050.5"
    assert row.liq_price == repr(6050.5 * (1 + 1 / 2 + 0.1) / (1 + 0.025))
    assert (row.tp, row.sl, row.margin, row.value) == ("5000", "7000", "3630300", "6050500")
    check_message_types(wire.POSITIONS, wire.encode_message(wire.POSITIONS, [row]))


def test_position_row_rejects_an_empty_slot() -> None:
    with pytest.raises(ValueError, match="no size"):
        wire.position_row(position(size=0, value=0, margin=0), SPEC)


def example_fill(taker_order: OrderState, seq: int) -> Fill:
    """The reference's fill: a taker (paying 3025) against OTHER's resting bid, 1000 @ 6050."""
    taker = FillSide(
        order=taker_order, position=position(), collateral=0, fee=3025, pnl=0, is_maker=False
    )
    maker = FillSide(
        order=order(address=OTHER),
        position=position(address=OTHER, is_long=True, trade_id=16528282690043758248332),
        collateral=0,
        fee=0,
        pnl=0,
        is_maker=True,
    )
    return Fill(
        seq=seq,
        ts=1_739_788_459_999,  # milliseconds are dropped, not rounded
        market_id=396,
        price=6050,
        size=1000,
        taker=taker,
        maker=maker,
        fee_account=3025,
    )


def test_trade_history_example_byte_for_byte() -> None:
    sell = order(
        order_id=5 << 64,
        is_long=False,
        is_market=True,
        order_type=2,
        price=6050,
        remaining=0,
        status=FILLED,
        value=6_050_000,
        trade_id=(895 << 64) | 396,
    )
    fill = example_fill(sell, 7)
    taker, maker = fill.taker, fill.maker
    row = wire.trade_row(taker, fill)
    assert wire.encode_message(wire.TRADE_HISTORY, [row]).decode() == TRADE_EXAMPLE
    maker_row = wire.trade_row(maker, fill)
    assert (maker_row.address, maker_row.fee, maker_row.order_type) == (OTHER, "0", 1)
    assert maker_row.trade_id == "16528282690043758248332"


def test_open_orders_example_byte_for_byte() -> None:
    row = wire.open_order_row(order())
    assert wire.encode_message(wire.OPEN_ORDERS, [row]).decode() == OPEN_ORDERS_EXAMPLE


def test_open_order_row_distinguishes_created_updated_total_and_remaining() -> None:
    row = wire.open_order_row(order(remaining=400, updated=1_739_790_800_500))
    assert (row.timestamp, row.last_updated) == ("1739790733", "1739790800")
    assert (row.total_size, row.remaining_size) == ("1000", "400")


def test_order_history_example_byte_for_byte() -> None:
    filled = order(
        order_id=12906965467445688751095808,
        is_long=False,
        order_type=4,
        remaining=0,
        status=FILLED,
        trade_id=16509835945970048696716,
        created=1_739_790_700_000,
        updated=1_739_790_700_000,
    )
    rows = [wire.order_history_row(order()), wire.order_history_row(filled)]
    assert wire.encode_message(wire.ORDER_HISTORY, rows).decode() == ORDER_HISTORY_EXAMPLE


def test_order_history_row_of_a_market_order() -> None:
    row = wire.order_history_row(order(is_market=True, size=1200, value=7_198_000))
    assert (row.is_market_order, row.size, row.order_value) == (True, "1200", "7198000")


def test_orderbook_rows_byte_for_byte() -> None:
    rows = [
        wire.orderbook_row(396, True, 6036, 169_320, 1_739_790_988_000),
        wire.orderbook_row(396, True, 8000, 500, 1_739_758_360_001),
        wire.orderbook_row(396, False, 6002, 1000, 1_739_790_990_999),
    ]
    assert wire.encode_message(wire.ORDERBOOK, rows).decode() == ORDERBOOK_EXAMPLE


@pytest.mark.parametrize(
    ("topic", "example"),
    [
        (wire.POSITIONS, POSITIONS_EXAMPLE),
        (wire.TRADE_HISTORY, TRADE_EXAMPLE),
        (wire.OPEN_ORDERS, OPEN_ORDERS_EXAMPLE),
        (wire.ORDER_HISTORY, ORDER_HISTORY_EXAMPLE),
        (wire.ORDERBOOK, ORDERBOOK_EXAMPLE),
    ],
)
def test_examples_match_the_field_table(topic: str, example: str) -> None:
    # Guards the transcribed table against the examples, so both checks mean something.
    assert check_message_types(topic, example.encode())


def test_empty_push() -> None:
    assert wire.encode_message(wire.OPEN_ORDERS, []) == b'{"data":[],"message":"open_orders"}'


def test_topic_sets() -> None:
    address_topics = {
        "positions",
        "trade_history",
        "open_orders",
        "order_history",
        "live_trade_history",
        "live_order_history",
        "deposit_withdraw_history",
    }
    assert address_topics == wire.ADDRESS_TOPICS
    assert {"orderbook", "recent_trades", "best_price", "live_funding_rate"} == wire.MARKET_TOPICS
    assert {"live_trade_history", "live_order_history"} == wire.LIVE_TOPICS
    assert set(FIELD_TYPES) == wire.ADDRESS_TOPICS | wire.MARKET_TOPICS


def test_rows_are_frozen() -> None:
    row = wire.open_order_row(order())
    with pytest.raises(AttributeError):
        row.price = "1"  # type: ignore[misc]


def test_recent_trade_row_byte_for_byte() -> None:
    # The taker opens a short: it sells.
    fill = example_fill(order(order_id=5 << 64, is_long=False, order_type=2), 41)
    sold = wire.recent_trade_row(fill)
    assert wire.encode_message(wire.RECENT_TRADES, [sold], 41) == (
        b'{"data":[{"is_buy":false,"last_updated":"1739788459","market_id":"396",'
        b'"price":"6050","size":"1000","timestamp":"1739788459","transaction_version":"41"}],'
        b'"message":"recent_trades","seq":41}'
    )
    # A taker closing a short buys.
    closing = msgspec.structs.replace(
        fill.taker, order=order(order_id=6 << 64, is_long=False, is_close=True, order_type=8)
    )
    bought = wire.recent_trade_row(msgspec.structs.replace(fill, taker=closing))
    assert bought.is_buy is True


def test_best_price_row_with_an_empty_side() -> None:
    row = wire.best_price_row(396, (6002, 1000), None, 1_739_790_990_999)
    assert wire.encode_message(wire.BEST_PRICE, [row]) == (
        b'{"data":[{"best_ask_price":null,"best_ask_size":null,"best_bid_price":"6002",'
        b'"best_bid_size":"1000","last_updated":"1739790990","market_id":"396"}],'
        b'"message":"best_price"}'
    )
    both = wire.best_price_row(397, (50_000, 3), (50_010, 7), 1_000)
    assert (both.best_ask_price, both.best_ask_size, both.market_id) == ("50010", "7", "397")
    check_message_types(wire.BEST_PRICE, wire.encode_message(wire.BEST_PRICE, [row, both]))


def test_deposit_withdraw_rows() -> None:
    deposit = Deposited(seq=3, ts=1_739_788_000_500, address=ADDR, amount=10_000_000, collateral=1)
    withdrawal = Withdrew(seq=9, ts=1_739_788_100_000, address=ADDR, amount=2_500, collateral=0)
    rows = [wire.deposit_withdraw_row(withdrawal), wire.deposit_withdraw_row(deposit)]
    assert wire.encode_message(wire.DEPOSIT_WITHDRAW_HISTORY, rows, 9).decode() == (
        '{"data":[{"address":"' + ADDR + '","amount":"2500","is_deposit":false,'
        '"last_updated":"1739788100","timestamp":"1739788100","transaction_version":"9"},'
        '{"address":"' + ADDR + '","amount":"10000000","is_deposit":true,'
        '"last_updated":"1739788000","timestamp":"1739788000","transaction_version":"3"}],'
        '"message":"deposit_withdraw_history","seq":9}'
    )


@pytest.mark.parametrize(
    ("numerator", "denominator", "text"),
    [
        (0, 7, "0"),
        (75, 10_000, "0.0075"),
        (-75, 10_000, "-0.0075"),
        (50, 6000, "0.008333333333"),  # 1/120: does not end, 12 places
        (-50, 6000, "-0.008333333333"),
        (2, 3, "0.666666666667"),  # rounded up at the 12th place
        (1, 2 * 10**12, "0"),  # exactly half a unit of the 12th place: half-even, down
        (3, 2 * 10**12, "0.000000000002"),  # 1.5 units: half-even, up
        (-1, 3 * 10**12, "0"),  # no "-0"
        (12, 4, "3"),
        (1, -4, "-0.25"),
        (123456789012345678901234567890, 10**13, "12345678901234567.890123456789"),
    ],
)
def test_format_rate_is_exact(numerator: int, denominator: int, text: str) -> None:
    assert wire.format_rate(numerator, denominator) == text


def test_format_rate_rejects_zero_denominator() -> None:
    with pytest.raises(ValueError, match="denominator"):
        wire.format_rate(1, 0)


def test_funding_rows() -> None:
    row = wire.funding_rate_row(396, "-0.0075", 5950, 6000, 1_739_790_000_000, 1_739_788_459_400)
    assert wire.encode_message(wire.LIVE_FUNDING_RATE, [row], 12) == (
        b'{"data":[{"funding_rate":"-0.0075","index_price":"6000","last_updated":"1739788459",'
        b'"mark_price":"5950","market_id":"396","next_funding_time":"1739790000"}],'
        b'"message":"live_funding_rate","seq":12}'
    )
    unknown = wire.funding_rate_row(396, "0", 5950, None, 1_739_790_000_000, 1_739_788_459_400)
    assert unknown.index_price is None
    check_message_types(wire.LIVE_FUNDING_RATE, wire.encode_message("live_funding_rate", [unknown]))
    settled = FundingSettled(
        seq=30,
        ts=1_739_790_000_000,
        market_id=396,
        mark=6010,
        index=6000,
        rate_num=1,
        rate_den=600,
        payments=[
            FundingPayment(position=position(is_long=True, margin=3_014_917), amount=-10_083),
            FundingPayment(position=position(address=OTHER, margin=3_035_083), amount=10_083),
        ],
        dust=0,
        next_funding=1_739_793_600_000,
    )
    rows = [wire.funding_history_row(p, settled) for p in settled.payments]
    assert msgspec.json.encode(rows).decode() == (
        '[{"address":"' + ADDR + '","amount":"-10083","funding_rate":"0.001666666667",'
        '"is_long":true,"market_id":"396","size":"1000","timestamp":"1739790000",'
        '"trade_id":"16509835945970048696716","transaction_version":"30"},'
        '{"address":"' + OTHER + '","amount":"10083","funding_rate":"0.001666666667",'
        '"is_long":false,"market_id":"396","size":"1000","timestamp":"1739790000",'
        '"trade_id":"16509835945970048696716","transaction_version":"30"}]'
    )


# Rows with text that JSON must escape, numbers beyond 64 bits and nulls: join_message must
# give encode_message's bytes for any of them.
TEXT = st.text(max_size=8)
NUMBER = st.integers(-(1 << 80), 1 << 80).map(str)
ROWS = st.one_of(
    st.builds(
        wire.TradeRow,
        address=TEXT,
        fee=NUMBER,
        last_updated=NUMBER,
        market_id=NUMBER,
        order_type=st.integers(0, 5),
        pnl=NUMBER,
        price=NUMBER,
        size=NUMBER,
        timestamp=NUMBER,
        trade_id=NUMBER,
    ),
    st.builds(
        wire.BestPriceRow,
        best_ask_price=st.none() | NUMBER,
        best_ask_size=st.none() | NUMBER,
        best_bid_price=st.none() | NUMBER,
        best_bid_size=st.none() | NUMBER,
        last_updated=NUMBER,
        market_id=TEXT,
    ),
    st.builds(
        wire.PositionRow,
        address=TEXT,
        entry_price=NUMBER,
        is_long=st.booleans(),
        last_updated=NUMBER,
        leverage=st.integers(1, 100),
        liq_price=st.floats(allow_nan=False).map(repr),
        margin=NUMBER,
        market_id=NUMBER,
        size=NUMBER,
        sl=st.none() | NUMBER,
        tp=st.none() | NUMBER,
        trade_id=NUMBER,
        value=NUMBER,
    ),
)


@given(
    topic=st.sampled_from(wire.ALL_TOPICS) | TEXT,
    rows=st.lists(ROWS, max_size=5),
    seq=st.integers(0, 1 << 62),
)
def test_join_message_is_encode_message_byte_for_byte(
    topic: str, rows: list[wire.Row], seq: int
) -> None:
    parts = [wire.encode_row(row) for row in rows]
    assert wire.join_message(topic, parts, seq) == wire.encode_message(topic, rows, seq)


# Few values per field, so that states often share a row or differ in one field only.
ORDERS = st.builds(
    order,
    status=st.sampled_from([OPEN, FILLED]),
    value=st.sampled_from([6_002_000, 6_003_000]),
    price=st.sampled_from([6002, 6003]),
    updated=st.sampled_from([1_739_790_733_000, 1_739_790_733_999, 1_739_790_734_000]),
    created=st.sampled_from([1_739_790_733_000, 1_739_790_733_500]),
    remaining=st.sampled_from([0, 1000]),
    reserved_margin=st.sampled_from([0, 7]),
    size=st.sampled_from([1000, 2000]),
    leverage=st.sampled_from([2, 3]),
    order_type=st.sampled_from([1, 2]),
    is_market=st.booleans(),
    trade_id=st.sampled_from([1, 1 << 70]),
)


@given(a=ORDERS, b=ORDERS)
def test_same_order_history_row_is_row_equality(a: OrderState, b: OrderState) -> None:
    same = wire.order_history_row(a) == wire.order_history_row(b)
    assert wire.same_order_history_row(a, b) == same


POSITIONS = st.builds(
    position,
    is_long=st.booleans(),
    size=st.sampled_from([1000, 3000]),
    # The largest value makes 1 unit of added margin too small to move liq_price's text.
    value=st.sampled_from([6_050_000, 6_050_500, 6_050_000 * 10**9]),
    margin=st.sampled_from([3_025_000, 3_630_300]),
    added_margin=st.sampled_from([0, 1, 605_050]),
    updated=st.sampled_from([1_739_788_459_000, 1_739_788_459_999, 1_739_788_460_000]),
    pending_opens=st.sampled_from([0, 2]),
    sl=st.sampled_from([None, 7000]),
    tp=st.sampled_from([None, 5000]),
    leverage=st.sampled_from([2, 5]),
)


@given(a=POSITIONS, b=POSITIONS)
def test_same_position_row_is_row_equality(a: PositionState, b: PositionState) -> None:
    same = wire.position_row(a, SPEC) == wire.position_row(b, SPEC)
    assert wire.same_position_row(a, b, SPEC) == same


def test_added_margin_alone_may_or_may_not_change_a_position_row() -> None:
    # It shows only through the float liq_price: 1 unit on a value of 6.05e15 is below a
    # float's precision.
    big = 6_050_000 * 10**9
    assert wire.same_position_row(position(value=big), position(value=big, added_margin=1), SPEC)
    assert not wire.same_position_row(position(), position(added_margin=1), SPEC)


# Any int a field may hold (negative pnl, trade ids past 64 bits), any string an address or a
# status may be (quotes, backslashes, control characters and non-ASCII need JSON escaping).
ANY_INT = st.integers(-(10**30), 10**30)
ANY_STR = st.text(max_size=70)


@given(
    ints=st.lists(ANY_INT, min_size=11, max_size=11),
    flags=st.lists(st.booleans(), min_size=3, max_size=3),
    address=ANY_STR,
    status=ANY_STR,
)
def test_order_rows_written_straight_to_json_are_the_encoded_rows(
    ints: list[int], flags: list[bool], address: str, status: str
) -> None:
    order_id, market_id, order_type, price, size, remaining, leverage, trade_id, value = ints[:9]
    created, updated = ints[9:]
    order = OrderState(
        order_id=order_id,
        market_id=market_id,
        address=address,
        is_long=flags[0],
        is_close=flags[1],
        is_market=flags[2],
        restriction=0,
        order_type=order_type,
        price=price,
        size=size,
        remaining=remaining,
        leverage=leverage,
        trade_id=trade_id,
        status=status,
        value=value,
        created=created,
        updated=updated,
    )
    assert wire.order_history_json(order) == wire.encode_row(wire.order_history_row(order))
    assert wire.open_order_json(order) == wire.encode_row(wire.open_order_row(order))


@given(ints=st.lists(ANY_INT, min_size=8, max_size=8), address=ANY_STR, is_ask=st.booleans())
def test_trade_and_level_rows_written_straight_to_json_are_the_encoded_rows(
    ints: list[int], address: str, is_ask: bool
) -> None:
    fee, market_id, order_type, pnl, price, size, ts, trade_id = ints
    values = (address, fee, market_id, order_type, pnl, price, size, ts, trade_id)
    assert wire.trade_json(*values) == wire.encode_row(wire.trade_row_of(*values))
    level = (market_id, is_ask, price, size, ts)
    assert wire.orderbook_json(*level) == wire.encode_row(wire.orderbook_row(*level))
    assert json.loads(wire.trade_json(*values))["address"] == address  # escaped, not raw


@given(
    value=ANY_INT,
    size=st.integers(1, 10**30),
    leverage=st.integers(1, 1_000),
    added_margin=st.integers(0, 10**30),
    others=st.lists(ANY_INT, min_size=4, max_size=4),
    stops=st.lists(st.none() | ANY_INT, min_size=2, max_size=2),
    is_long=st.booleans(),
    address=ANY_STR,
)
def test_position_rows_written_straight_to_json_are_the_encoded_rows(
    value: int,
    size: int,
    leverage: int,
    added_margin: int,
    others: list[int],
    stops: list[int | None],
    is_long: bool,
    address: str,
) -> None:
    margin, market_id, trade_id, updated = others
    pos = position(
        address=address,
        market_id=market_id,
        is_long=is_long,
        trade_id=trade_id,
        leverage=leverage,
        size=size,
        value=value,
        margin=margin,
        added_margin=added_margin,
        sl=stops[0],
        tp=stops[1],
        updated=updated,
    )
    try:
        expected = wire.encode_row(wire.position_row(pos, SPEC))
    except (ArithmeticError, ValueError) as exc:  # a value of 0 with margin added, overflow
        with pytest.raises(type(exc)):
            wire.position_json(pos, SPEC)
    else:
        assert wire.position_json(pos, SPEC) == expected


def test_a_position_with_no_size_has_no_row_either_way() -> None:
    with pytest.raises(ValueError, match="no size"):
        wire.position_json(position(size=0), SPEC)
