"""Typed rows from the reference examples, and the order book helper."""

from __future__ import annotations

import json
from decimal import Decimal

import msgspec
import pytest

from perps_indexer.client import BookLevel, Message, OrderBook, OrderBooks, Position
from perps_indexer.client.aio import canonical_key, infer_code, merge_history
from perps_indexer.client.rows import decode_rows

POSITION = (
    '{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
    '"entry_price":"6050","is_long":false,"last_updated":"1739788459","leverage":2,'
    '"liq_price":"8853.658536585366","margin":"3025000","market_id":"396","size":"1000",'
    '"sl":null,"tp":null,"trade_id":"16509835945970048696716","value":"6050000"}'
)
OPEN_ORDER = (
    '{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
    '"last_updated":"1739790733","leverage":2,"market_id":"396",'
    '"order_id":"12907057702855018828273522","order_type":1,"order_value":"6002000",'
    '"price":"6002","remaining_size":"1000","timestamp":"1739790733","total_size":"1000",'
    '"trade_id":"16528282690043758248332"}'
)


def test_reference_rows_decode_to_exact_values() -> None:
    (pos,) = decode_rows("positions", [json.loads(POSITION)])
    assert isinstance(pos, Position)
    assert pos.entry_price == Decimal("6050")
    assert pos.liq_price == Decimal("8853.658536585366")  # exact, not a float
    assert pos.trade_id == 16509835945970048696716 == (895 << 64) | 396
    assert (pos.margin, pos.value, pos.size, pos.market_id) == (3025000, 6050000, 1000, 396)
    assert pos.last_updated == 1739788459 and pos.sl is None and pos.is_long is False
    (order,) = decode_rows("open_orders", [json.loads(OPEN_ORDER)])
    assert order.order_id == 12907057702855018828273522  # beyond 64 bits, exact
    with pytest.raises(AttributeError):
        order.price = 1


def test_unknown_fields_are_ignored_and_unknown_topics_stay_dicts() -> None:
    row = {**json.loads(POSITION), "transaction_version": "123", "new_thing": [1]}
    (pos,) = decode_rows("positions", [row])
    assert pos.size == 1000
    assert decode_rows("a_future_topic", [{"rate": "1"}]) == ({"rate": "1"},)
    with pytest.raises(msgspec.ValidationError):
        decode_rows("positions", [{**row, "size": "1.5"}])


def level(is_ask: bool, price: int, size: int) -> BookLevel:
    return BookLevel(is_ask=is_ask, last_updated=0, market_id=396, price=price, size=size)


def test_book_best_spread_and_depth() -> None:
    book = OrderBook(
        396,
        [level(True, 6040, 5), level(True, 6036, 10), level(False, 6031, 7), level(False, 6027, 3)],
    )
    assert book.best_bid() == level(False, 6031, 7)
    assert book.best_ask() == level(True, 6036, 10)
    assert book.spread() == 5
    assert book.size_at(6040) == 5 and book.size_at(6030) == 0
    assert book.depth(6036, is_ask=True) == 10
    assert book.depth(6040, is_ask=True) == 15
    assert book.depth(6027, is_ask=False) == 10
    assert book.depth(6032, is_ask=False) == 0
    empty = OrderBook(396)
    assert empty.best_bid() is None and empty.spread() is None


def test_books_follow_messages_per_market() -> None:
    class Sub:
        topic, address, id = "orderbook", None, 1

        def __init__(self, market: object) -> None:
            self.market_id = market

    books = OrderBooks()
    rows = (level(True, 6036, 10), level(False, 6031, 7))
    books.apply(Message("orderbook", rows, "", 4, True, Sub("396"), 0.0))
    assert books[396].spread() == 5
    books.apply(Message("orderbook", (), "", 5, False, Sub(396), 0.0))  # emptied
    assert books[396].best_bid() is None and books[396].seq == 5
    assert books.get(397) is None
    with pytest.raises(ValueError):
        books.apply(Message("positions", (), "", None, True, Sub(1), 0.0))


def test_keys_compare_like_the_server_normalises_them() -> None:
    assert canonical_key("address", "0x00AB") == canonical_key("address", "0x" + "0" * 62 + "ab")
    assert canonical_key("market_id", 396) == canonical_key("market_id", "0396")


def test_v1_error_sentences_get_codes() -> None:
    assert infer_code("address '0xZZ' contains characters that are not hex digits") == (
        "invalid_address"
    )
    assert infer_code("unknown market_id '999'; markets are 396") == "unknown_market"
    assert infer_code("unknown topic 'fills'; topics are positions") == "unknown_topic"
    assert infer_code("rate limit: at most 20 messages per second") == "rate_limited"
    assert infer_code("internal error, could not fetch data") == "error"


def test_resume_merge_rebuilds_the_window() -> None:
    class Row(msgspec.Struct, frozen=True):
        order_id: int
        status: str

    base = (Row(3, "Open"), Row(2, "Open"), Row(1, "Filled"))
    delta = (Row(4, "Open"), Row(2, "Filled"))
    assert merge_history("order_history", delta, base, 3) == (
        Row(4, "Open"),
        Row(2, "Filled"),
        Row(3, "Open"),
    )
    assert merge_history("trade_history", ("t5",), ("t4", "t3"), 0) == ("t5", "t4", "t3")
