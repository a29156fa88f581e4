"""The original positions example (reference §2) reproduced by the engine."""

from perps_indexer.engine import Engine
from perps_indexer.events import Fill
from perps_indexer.markets import default_markets
from perps_indexer.units import U64_MASK, format_float

TRADER = "0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770"
MAKER = "0x00000000000000000000000000000000000000000000000000000000000000aa"


def test_short_market_order_against_resting_long_bid() -> None:
    engine = Engine(default_markets())
    engine.deposit(TRADER, 10_000_000, ts=1_000)
    engine.deposit(MAKER, 10_000_000, ts=1_000)
    bid = engine.place_limit_order(
        MAKER, 396, is_long=True, is_close=False, size=1000, price=6050, leverage=2, ts=2_000
    )
    assert bid.status == "Open"
    result = engine.place_market_order(
        TRADER, 396, is_long=False, is_close=False, size=1000, leverage=2, ts=3_000
    )
    assert result.status == "Filled"

    short = engine.positions[(TRADER, 396, False)]
    assert (short.size, short.value, short.margin) == (1000, 6050000, 3025000)
    assert short.value // short.size == 6050
    assert format_float(engine.liq_price(short)) == "8853.658536585366"

    long = engine.positions[(MAKER, 396, True)]
    assert format_float(engine.liq_price(long)) == "3102.5641025641025"

    (fill,) = [e for e in result.events if isinstance(e, Fill)]
    assert fill.taker.fee == 3025
    assert fill.maker.fee == 0
    assert fill.taker.order.order_type == 2  # open short
    assert short.trade_id & U64_MASK == 396
    assert long.trade_id & U64_MASK == 396
    # A market order that filled completely on arrival has key 0 in its id.
    assert result.order_id & U64_MASK == 0
    # The resting bid's id carries its price in the low bits (reference §3).
    assert bid.order_id & U64_MASK == 6050
