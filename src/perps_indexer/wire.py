"""The WebSocket topics' row types, their builders and the message envelope.

Rows keep the venue's field names and JSON types exactly (reference README §1): numbers and ids
as strings (ids exceed 64 bits), ``leverage`` and ``order_type`` as integers, ``sl``/``tp`` as a
string or null, timestamps as strings of unix seconds. Fields are declared in alphabetical order,
the order of the venue's examples, because msgspec encodes them in declaration order.

The topics of the venue's later generations (reference §6) follow the same rules; their rows
carry ``transaction_version``, the ``seq`` of the event that made the row, as a string.

Builders take the post-states that events carry; event timestamps are unix milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from perps_indexer.events import (
    Deposited,
    Fill,
    FillSide,
    FundingPayment,
    FundingSettled,
    OrderState,
    PositionState,
    Withdrew,
)
from perps_indexer.markets import MarketSpec
from perps_indexer.units import format_float, format_ratio, liquidation_price

POSITIONS: Final = "positions"
TRADE_HISTORY: Final = "trade_history"
OPEN_ORDERS: Final = "open_orders"
ORDER_HISTORY: Final = "order_history"
ORDERBOOK: Final = "orderbook"
# The later generations' topics (reference §6).
RECENT_TRADES: Final = "recent_trades"
BEST_PRICE: Final = "best_price"
LIVE_TRADE_HISTORY: Final = "live_trade_history"
LIVE_ORDER_HISTORY: Final = "live_order_history"
DEPOSIT_WITHDRAW_HISTORY: Final = "deposit_withdraw_history"
LIVE_FUNDING_RATE: Final = "live_funding_rate"

ALL_TOPICS: Final = (
    POSITIONS,
    TRADE_HISTORY,
    OPEN_ORDERS,
    ORDER_HISTORY,
    ORDERBOOK,
    RECENT_TRADES,
    BEST_PRICE,
    LIVE_TRADE_HISTORY,
    LIVE_ORDER_HISTORY,
    DEPOSIT_WITHDRAW_HISTORY,
    LIVE_FUNDING_RATE,
)
"""Every topic: the original five, then the later generations' six."""
ADDRESS_TOPICS: Final = frozenset(
    {
        POSITIONS,
        TRADE_HISTORY,
        OPEN_ORDERS,
        ORDER_HISTORY,
        LIVE_TRADE_HISTORY,
        LIVE_ORDER_HISTORY,
        DEPOSIT_WITHDRAW_HISTORY,
    }
)
"""Topics subscribed with an ``address``."""
MARKET_TOPICS: Final = frozenset({ORDERBOOK, RECENT_TRADES, BEST_PRICE, LIVE_FUNDING_RATE})
"""Topics subscribed with a ``market_id``."""
LIVE_TOPICS: Final = frozenset({LIVE_TRADE_HISTORY, LIVE_ORDER_HISTORY})
"""Event streams, not states: every push holds one new row and none may replace another."""

FUNDING_RATE_PLACES: Final = 12
"""Decimal places of a funding rate whose decimal expansion does not end sooner."""


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


class RecentTradeRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One public fill of a market (``recent_trades`` topic): no addresses, no fees."""

    is_buy: bool
    """True when the taker bought (the resting maker sold)."""
    last_updated: str
    market_id: str
    price: str
    size: str
    timestamp: str
    transaction_version: str


class BestPriceRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A market's best bid and best ask with their sizes (``best_price`` topic); a side's
    fields are null while that side of the book is empty."""

    best_ask_price: str | None
    best_ask_size: str | None
    best_bid_price: str | None
    best_bid_size: str | None
    last_updated: str
    market_id: str


class DepositWithdrawRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One deposit or withdrawal (``deposit_withdraw_history`` topic)."""

    address: str
    amount: str
    is_deposit: bool
    last_updated: str
    timestamp: str
    transaction_version: str


class FundingRateRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A market's current funding rate (``live_funding_rate`` topic).

    ``funding_rate`` is per funding interval, the mark's premium over the index clamped to the
    market's cap, as exact decimal text; positive means longs pay shorts. It is "0" while the
    mark or the index price is not known yet (that price is then null).
    """

    funding_rate: str
    index_price: str | None
    last_updated: str
    mark_price: str | None
    market_id: str
    next_funding_time: str


class FundingHistoryRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One position's funding payment (REST ``getFundingHistory``); ``amount`` is signed:
    negative paid, positive received."""

    address: str
    amount: str
    funding_rate: str
    is_long: bool
    market_id: str
    size: str
    timestamp: str
    trade_id: str
    transaction_version: str


Row = (
    PositionRow
    | TradeRow
    | OpenOrderRow
    | OrderHistoryRow
    | OrderBookRow
    | RecentTradeRow
    | BestPriceRow
    | DepositWithdrawRow
    | FundingRateRow
    | FundingHistoryRow
)


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


encode_row: Final[Callable[[Row], bytes]] = _encoder.encode
"""One row's JSON, exactly as :func:`encode_message` writes it inside ``"data"``. The encoder's
own method, not a function around it: one Python call less for every pushed row."""


# The busiest rows, written straight to JSON: each ``*_json`` function below returns what
# encode_row(<its row function>(...)) returns, byte for byte, without building the row struct.
# Building it (keyword arguments, a str() per number) was about 60 % of a row's cost, and the
# projections encode one or more such rows for every order change and fill. The structs stay
# the schema: tests/test_wire.py checks the two agree for any values. Strings go through the
# encoder (JSON escaping); every other field is an int, which "%d" writes as str() does, except a
# position's entry and liquidation prices, decimal texts that hold nothing JSON escapes.
_ORDER_HISTORY_JSON: Final = (
    b'{"address":%b,"is_market_order":%b,"last_updated":"%d","leverage":%d,"market_id":"%d",'
    b'"order_id":"%d","order_type":%d,"order_value":"%d","price":"%d","size":"%d",'
    b'"status":%b,"timestamp":"%d","trade_id":"%d"}'
)
_OPEN_ORDER_JSON: Final = (
    b'{"address":%b,"last_updated":"%d","leverage":%d,"market_id":"%d","order_id":"%d",'
    b'"order_type":%d,"order_value":"%d","price":"%d","remaining_size":"%d","timestamp":"%d",'
    b'"total_size":"%d","trade_id":"%d"}'
)
_TRADE_JSON: Final = (
    b'{"address":%b,"fee":"%d","last_updated":"%d","market_id":"%d","order_type":%d,'
    b'"pnl":"%d","price":"%d","size":"%d","timestamp":"%d","trade_id":"%d"}'
)
_LEVEL_JSON: Final = b'{"is_ask":%b,"last_updated":"%d","market_id":"%d","price":"%d","size":"%d"}'
_POSITION_JSON: Final = (
    b'{"address":%b,"entry_price":"%b","is_long":%b,"last_updated":"%d","leverage":%d,'
    b'"liq_price":"%b","margin":"%d","market_id":"%d","size":"%d","sl":%b,"tp":%b,'
    b'"trade_id":"%d","value":"%d"}'
)
_encode_str: Final[Callable[[str], bytes]] = _encoder.encode
_JSON_BOOL: Final = (b"false", b"true")  # indexed by the bool


def order_history_json(order: OrderState) -> bytes:
    """``encode_row(order_history_row(order))``, without building the row."""
    o = order
    return _ORDER_HISTORY_JSON % (
        _encode_str(o.address),
        _JSON_BOOL[o.is_market],
        o.updated // 1000,
        o.leverage,
        o.market_id,
        o.order_id,
        o.order_type,
        o.value,
        o.price,
        o.size,
        _encode_str(o.status),
        o.created // 1000,
        o.trade_id,
    )


def open_order_json(order: OrderState) -> bytes:
    """``encode_row(open_order_row(order))``, without building the row."""
    o = order
    return _OPEN_ORDER_JSON % (
        _encode_str(o.address),
        o.updated // 1000,
        o.leverage,
        o.market_id,
        o.order_id,
        o.order_type,
        o.value,
        o.price,
        o.remaining,
        o.created // 1000,
        o.size,
        o.trade_id,
    )


def trade_json(
    address: str,
    fee: int,
    market_id: int,
    order_type: int,
    pnl: int,
    price: int,
    size: int,
    ts_ms: int,
    trade_id: int,
) -> bytes:
    """``encode_row(trade_row_of(...))`` of the same values, without building the row."""
    ts = ts_ms // 1000
    return _TRADE_JSON % (
        _encode_str(address),
        fee,
        ts,
        market_id,
        order_type,
        pnl,
        price,
        size,
        ts,
        trade_id,
    )


def orderbook_json(market_id: int, is_ask: bool, price: int, size: int, ts_ms: int) -> bytes:
    """``encode_row(orderbook_row(...))`` of the same values, without building the row."""
    return _LEVEL_JSON % (_JSON_BOOL[is_ask], ts_ms // 1000, market_id, price, size)


def position_json(pos: PositionState, spec: MarketSpec) -> bytes:
    """``encode_row(position_row(pos, spec))``, without building the row."""
    entry, liq = _position_prices(pos, spec)
    sl, tp = pos.sl, pos.tp
    return _POSITION_JSON % (
        _encode_str(pos.address),
        entry.encode(),  # decimal texts: nothing in them needs JSON escaping
        _JSON_BOOL[pos.is_long],
        pos.updated // 1000,
        pos.leverage,
        liq.encode(),
        pos.margin,
        pos.market_id,
        pos.size,
        b"null" if sl is None else b'"%d"' % sl,
        b"null" if tp is None else b'"%d"' % tp,
        pos.trade_id,
        pos.value,
    )


def _tail(topic: str) -> bytes:
    return b'],"message":' + _encoder.encode(topic) + b',"seq":'


_TAILS: Final = {topic: _tail(topic) for topic in ALL_TOPICS}


def join_message(topic: str, parts: Sequence[bytes], seq: int) -> bytes:
    """``encode_message(topic, rows, seq)``, byte for byte, from the rows' :func:`encode_row`
    bytes: rows are immutable, so a window's push re-encodes only its new rows."""
    # One %-format makes the message in one allocation (this runs for every push): cheaper
    # than concatenating, or than framing the first and last rows and joining, for windows of
    # one row and of a hundred alike.
    return b'{"data":[%b%b%d}' % (b",".join(parts), _TAILS.get(topic) or _tail(topic), seq)


def seconds(ts_ms: int) -> str:
    """A wire timestamp: unix milliseconds to a string of whole unix seconds."""
    return str(ts_ms // 1000)


def _opt(value: int | None) -> str | None:
    return None if value is None else str(value)


def _position_prices(pos: PositionState, spec: MarketSpec) -> tuple[str, str]:
    """An open position's entry and liquidation price texts; ``pos.size`` must be positive."""
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
    return format_ratio(pos.value, pos.size), format_float(liq)


def position_row(pos: PositionState, spec: MarketSpec) -> PositionRow:
    """The row of an open position; ``pos.size`` must be positive."""
    entry, liq = _position_prices(pos, spec)
    return PositionRow(
        address=pos.address,
        entry_price=entry,
        is_long=pos.is_long,
        last_updated=seconds(pos.updated),
        leverage=pos.leverage,
        liq_price=liq,
        margin=str(pos.margin),
        market_id=str(pos.market_id),
        size=str(pos.size),
        sl=_opt(pos.sl),
        tp=_opt(pos.tp),
        trade_id=str(pos.trade_id),
        value=str(pos.value),
    )


def same_position_row(a: PositionState, b: PositionState, spec: MarketSpec) -> bool:
    """``position_row(a, spec) == position_row(b, spec)`` for open positions, building the
    rows only when the states differ in ``added_margin`` alone (it shows only through
    ``liq_price``, whose text may not move)."""
    if a.size != b.size or _position_key(a) != _position_key(b):
        return False
    return a.added_margin == b.added_margin or position_row(a, spec) == position_row(b, spec)


def _position_key(pos: PositionState) -> tuple[object, ...]:
    # Every field position_row shows directly, each injectively (times in whole seconds).
    return (
        pos.value,
        pos.margin,
        pos.updated // 1000,
        pos.sl,
        pos.tp,
        pos.leverage,
        pos.trade_id,
        pos.is_long,
        pos.market_id,
        pos.address,
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


def same_order_history_row(a: OrderState, b: OrderState) -> bool:
    """``order_history_row(a) == order_history_row(b)``, without building the rows."""
    # Every field order_history_row shows, each shown injectively (times in whole seconds),
    # compared one by one, those a fill or a cancel changes first: this runs for every order
    # event, and two tuples of the fields built to compare cost about twice as much.
    return (
        a.status == b.status
        and a.value == b.value
        and a.price == b.price
        and a.updated // 1000 == b.updated // 1000
        and a.size == b.size
        and a.leverage == b.leverage
        and a.order_type == b.order_type
        and a.is_market == b.is_market
        and a.created // 1000 == b.created // 1000
        and a.trade_id == b.trade_id
        and a.market_id == b.market_id
        and a.order_id == b.order_id
        and a.address == b.address
    )


def trade_row(side: FillSide, fill: Fill) -> TradeRow:
    """One party's row of a fill: the fill's price and size, that side's fee, pnl and ids."""
    order = side.order
    return trade_row_of(
        order.address,
        side.fee,
        fill.market_id,
        order.order_type,
        side.pnl,
        fill.price,
        fill.size,
        fill.ts,
        side.position.trade_id,
    )


def trade_row_of(
    address: str,
    fee: int,
    market_id: int,
    order_type: int,
    pnl: int,
    price: int,
    size: int,
    ts_ms: int,
    trade_id: int,
) -> TradeRow:
    """:func:`trade_row` from the values it shows (what the projections keep of a fill)."""
    ts = seconds(ts_ms)
    return TradeRow(
        address=address,
        fee=str(fee),
        last_updated=ts,
        market_id=str(market_id),
        order_type=order_type,
        pnl=str(pnl),
        price=str(price),
        size=str(size),
        timestamp=ts,
        trade_id=str(trade_id),
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


def recent_trade_row(fill: Fill) -> RecentTradeRow:
    """The public row of a fill: its price and size and which side the taker was on."""
    ts = seconds(fill.ts)
    return RecentTradeRow(
        is_buy=not fill.taker.order.is_ask,
        last_updated=ts,
        market_id=str(fill.market_id),
        price=str(fill.price),
        size=str(fill.size),
        timestamp=ts,
        transaction_version=str(fill.seq),
    )


def best_price_row(
    market_id: int, bid: tuple[int, int] | None, ask: tuple[int, int] | None, ts_ms: int
) -> BestPriceRow:
    """The best-price row from the best ``(price, size)`` of each side (None: side empty)."""
    return BestPriceRow(
        best_ask_price=None if ask is None else str(ask[0]),
        best_ask_size=None if ask is None else str(ask[1]),
        best_bid_price=None if bid is None else str(bid[0]),
        best_bid_size=None if bid is None else str(bid[1]),
        last_updated=seconds(ts_ms),
        market_id=str(market_id),
    )


def deposit_withdraw_row(event: Deposited | Withdrew) -> DepositWithdrawRow:
    ts = seconds(event.ts)
    return DepositWithdrawRow(
        address=event.address,
        amount=str(event.amount),
        is_deposit=isinstance(event, Deposited),
        last_updated=ts,
        timestamp=ts,
        transaction_version=str(event.seq),
    )


def format_rate(numerator: int, denominator: int) -> str:
    """Exact decimal text of a rate ``numerator / denominator``.

    The quotient is exact when its decimal expansion ends within :data:`FUNDING_RATE_PLACES`
    places; otherwise it is rounded half-even to that many places, in integers (no float, no
    intermediate rounding).
    """
    if not denominator:
        raise ValueError("a rate's denominator must not be 0")
    if denominator < 0:
        numerator, denominator = -numerator, -denominator
    sign = "-" if numerator < 0 else ""
    scale = 10**FUNDING_RATE_PLACES
    quotient, rest = divmod(abs(numerator) * scale, denominator)
    if 2 * rest > denominator or (2 * rest == denominator and quotient % 2):
        quotient += 1
    whole, fraction = divmod(quotient, scale)
    if not fraction:
        return f"{sign}{whole}" if whole else "0"
    digits = str(fraction).rjust(FUNDING_RATE_PLACES, "0").rstrip("0")
    return f"{sign}{whole}.{digits}"


def funding_rate_row(
    market_id: int,
    rate: str,
    mark: int | None,
    index: int | None,
    next_funding_ms: int,
    ts_ms: int,
) -> FundingRateRow:
    """The live funding row: ``rate`` as :func:`format_rate` text, prices None when unknown."""
    return FundingRateRow(
        funding_rate=rate,
        index_price=_opt(index),
        last_updated=seconds(ts_ms),
        mark_price=_opt(mark),
        market_id=str(market_id),
        next_funding_time=seconds(next_funding_ms),
    )


def funding_history_row(payment: FundingPayment, event: FundingSettled) -> FundingHistoryRow:
    """One position's row of a settlement: its signed amount and size at the settlement."""
    pos = payment.position
    return FundingHistoryRow(
        address=pos.address,
        amount=str(payment.amount),
        funding_rate=format_rate(event.rate_num, event.rate_den),
        is_long=pos.is_long,
        market_id=str(event.market_id),
        size=str(pos.size),
        timestamp=seconds(event.ts),
        trade_id=str(pos.trade_id),
        transaction_version=str(event.seq),
    )
