"""The five WebSocket topics' row types, their builders and the message envelope.

Rows keep the venue's field names and JSON types exactly (reference README §1): numbers and ids
as strings (ids exceed 64 bits), ``leverage`` and ``order_type`` as integers, ``sl``/``tp`` as a
string or null, timestamps as strings of unix seconds. Fields are declared in alphabetical order,
the order of the venue's examples, because msgspec encodes them in declaration order.

Builders take the post-states that events carry; event timestamps are unix milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from perps_indexer.events import Fill, FillSide, OrderState, PositionState
from perps_indexer.markets import MarketSpec
from perps_indexer.units import format_float, format_ratio, liquidation_price

POSITIONS: Final = "positions"
TRADE_HISTORY: Final = "trade_history"
OPEN_ORDERS: Final = "open_orders"
ORDER_HISTORY: Final = "order_history"
ORDERBOOK: Final = "orderbook"

ADDRESS_TOPICS: Final = frozenset({POSITIONS, TRADE_HISTORY, OPEN_ORDERS, ORDER_HISTORY})
"""Topics subscribed with an ``address``."""
MARKET_TOPICS: Final = frozenset({ORDERBOOK})
"""Topics subscribed with a ``market_id``."""


# gc=False: rows hold only str, int, bool and None, so they cannot form reference cycles, and
# thousands of them should not slow the garbage collector down.
class PositionRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One open position (``positions`` topic)."""

    address: str
    entry_price: str
    is_long: bool
    last_updated: str
    leverage: int
    liq_price: str
    margin: str
    market_id: str
    size: str
    sl: str | None
    tp: str | None
    trade_id: str
    value: str


class TradeRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One party's side of a fill (``trade_history`` topic)."""

    address: str
    fee: str
    last_updated: str
    market_id: str
    order_type: int
    pnl: str
    price: str
    size: str
    timestamp: str
    trade_id: str


class OpenOrderRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One resting order (``open_orders`` topic)."""

    address: str
    last_updated: str
    leverage: int
    market_id: str
    order_id: str
    order_type: int
    order_value: str
    price: str
    remaining_size: str
    timestamp: str
    total_size: str
    trade_id: str


class OrderHistoryRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One order in any status (``order_history`` topic)."""

    address: str
    is_market_order: bool
    last_updated: str
    leverage: int
    market_id: str
    order_id: str
    order_type: int
    order_value: str
    price: str
    size: str
    status: str
    timestamp: str
    trade_id: str


class OrderBookRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One aggregated price level (``orderbook`` topic)."""

    is_ask: bool
    last_updated: str
    market_id: str
    price: str
    size: str


Row = PositionRow | TradeRow | OpenOrderRow | OrderHistoryRow | OrderBookRow


class _Envelope(msgspec.Struct):
    # Field order gives the venue's key order: {"data":[...],"message":"<topic>"}.
    data: Sequence[Any]
    message: str


class _SeqEnvelope(msgspec.Struct):
    # Protocol v2 appends "seq" after the original keys, so v1 parsers see what they expect.
    data: Sequence[Any]
    message: str
    seq: int


_encoder = msgspec.json.Encoder()


def encode_message(topic: str, rows: Sequence[Row], seq: int | None = None) -> bytes:
    """The push for ``topic``: compact ``{"data":[...],"message":"<topic>"}``, with
    ``,"seq":N`` appended when ``seq`` is given."""
    if seq is None:
        return _encoder.encode(_Envelope(rows, topic))
    return _encoder.encode(_SeqEnvelope(rows, topic, seq))


def seconds(ts_ms: int) -> str:
    """A wire timestamp: unix milliseconds to a string of whole unix seconds."""
    return str(ts_ms // 1000)


def _opt(value: int | None) -> str | None:
    return None if value is None else str(value)


def position_row(pos: PositionState, spec: MarketSpec) -> PositionRow:
    """The row of an open position; ``pos.size`` must be positive."""
    if pos.size <= 0:
        raise ValueError(f"position {pos.trade_id} has no size: it is not an open position")
    liq = liquidation_price(
        pos.value,
        pos.size,
        pos.leverage,
        pos.is_long,
        spec.maintenance_margin_bps,
        pos.added_margin,
    )
    return PositionRow(
        address=pos.address,
        entry_price=format_ratio(pos.value, pos.size),
        is_long=pos.is_long,
        last_updated=seconds(pos.updated),
        leverage=pos.leverage,
        liq_price=format_float(liq),
        margin=str(pos.margin),
        market_id=str(pos.market_id),
        size=str(pos.size),
        sl=_opt(pos.sl),
        tp=_opt(pos.tp),
        trade_id=str(pos.trade_id),
        value=str(pos.value),
    )


def _order_fields(order: OrderState) -> dict[str, Any]:
    """The fields open_orders and order_history rows share."""
    return {
        "address": order.address,
        "last_updated": seconds(order.updated),
        "leverage": order.leverage,
        "market_id": str(order.market_id),
        "order_id": str(order.order_id),
        "order_type": order.order_type,
        "order_value": str(order.value),
        "price": str(order.price),
        "timestamp": seconds(order.created),
        "trade_id": str(order.trade_id),
    }


def open_order_row(order: OrderState) -> OpenOrderRow:
    """The row of a resting order."""
    return OpenOrderRow(
        remaining_size=str(order.remaining), total_size=str(order.size), **_order_fields(order)
    )


def order_history_row(order: OrderState) -> OrderHistoryRow:
    """The history row of an order in any status."""
    return OrderHistoryRow(
        is_market_order=order.is_market,
        size=str(order.size),
        status=order.status,
        **_order_fields(order),
    )


def trade_row(side: FillSide, fill: Fill) -> TradeRow:
    """One party's row of a fill: the fill's price and size, that side's fee, pnl and ids."""
    ts = seconds(fill.ts)
    return TradeRow(
        address=side.order.address,
        fee=str(side.fee),
        last_updated=ts,
        market_id=str(fill.market_id),
        order_type=side.order.order_type,
        pnl=str(side.pnl),
        price=str(fill.price),
        size=str(fill.size),
        timestamp=ts,
        trade_id=str(side.position.trade_id),
    )


def orderbook_row(market_id: int, is_ask: bool, price: int, size: int, ts_ms: int) -> OrderBookRow:
    """The row of an aggregated level; ``ts_ms`` is when the level last changed."""
    return OrderBookRow(
        is_ask=is_ask,
        last_updated=seconds(ts_ms),
        market_id=str(market_id),
        price=str(price),
        size=str(size),
    )
