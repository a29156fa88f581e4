"""Typed rows and the delivered message.

Each topic's rows decode into a frozen struct with the wire's field names: ids, prices, sizes
and money as exact ``int`` (they arrive as decimal strings), ``entry_price``, ``liq_price`` and
``funding_rate`` as ``Decimal``, timestamps as ``int`` unix seconds. Unknown fields are ignored,
so rows of newer servers still decode; the raw JSON text of every message stays on
:attr:`Message.raw`.

The live topics (``live_trade_history``, ``live_order_history``) are event streams: each message
holds one new row (a :class:`Trade`, an :class:`OrderHistory`), not a state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Generic, Protocol, TypeVar

import msgspec

from perps_indexer import wire


# gc=False: rows hold only scalars, so they cannot form reference cycles.
class Position(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One open position (``positions``)."""

    address: str
    entry_price: Decimal
    is_long: bool
    last_updated: int
    leverage: int
    liq_price: Decimal
    margin: int
    market_id: int
    size: int
    sl: int | None = None
    tp: int | None = None
    trade_id: int
    value: int


class Trade(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One party's side of a fill (``trade_history``)."""

    address: str
    fee: int
    last_updated: int
    market_id: int
    order_type: int
    pnl: int
    price: int
    size: int
    timestamp: int
    trade_id: int


class OpenOrder(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One resting order (``open_orders``)."""

    address: str
    last_updated: int
    leverage: int
    market_id: int
    order_id: int
    order_type: int
    order_value: int
    price: int
    remaining_size: int
    timestamp: int
    total_size: int
    trade_id: int


class OrderHistory(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One order in any status (``order_history``)."""

    address: str
    is_market_order: bool
    last_updated: int
    leverage: int
    market_id: int
    order_id: int
    order_type: int
    order_value: int
    price: int
    size: int
    status: str
    timestamp: int
    trade_id: int


class BookLevel(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One aggregated price level (``orderbook``)."""

    is_ask: bool
    last_updated: int
    market_id: int
    price: int
    size: int


class RecentTrade(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One public fill of a market (``recent_trades``)."""

    is_buy: bool
    """True when the taker bought."""
    last_updated: int
    market_id: int
    price: int
    size: int
    timestamp: int
    transaction_version: int
    """The seq of the fill's event: unique per fill."""


class BestPrice(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A market's best bid and ask with their sizes (``best_price``); None: that side is
    empty."""

    best_ask_price: int | None = None
    best_ask_size: int | None = None
    best_bid_price: int | None = None
    best_bid_size: int | None = None
    last_updated: int
    market_id: int


class DepositWithdraw(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One deposit or withdrawal (``deposit_withdraw_history``)."""

    address: str
    amount: int
    is_deposit: bool
    last_updated: int
    timestamp: int
    transaction_version: int


class FundingRate(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A market's current funding rate (``live_funding_rate``): per interval, positive when
    longs pay shorts; a price is None while the server does not know it."""

    funding_rate: Decimal
    index_price: int | None = None
    last_updated: int
    mark_price: int | None = None
    market_id: int
    next_funding_time: int


ROW_TYPES: Final[dict[str, type[Any]]] = {
    wire.POSITIONS: Position,
    wire.TRADE_HISTORY: Trade,
    wire.OPEN_ORDERS: OpenOrder,
    wire.ORDER_HISTORY: OrderHistory,
    wire.ORDERBOOK: BookLevel,
    wire.RECENT_TRADES: RecentTrade,
    wire.BEST_PRICE: BestPrice,
    wire.LIVE_TRADE_HISTORY: Trade,
    wire.LIVE_ORDER_HISTORY: OrderHistory,
    wire.DEPOSIT_WITHDRAW_HISTORY: DepositWithdraw,
    wire.LIVE_FUNDING_RATE: FundingRate,
}
"""The row type of each known topic (the topic names are the protocol's, from
:mod:`perps_indexer.wire`); rows of other topics stay plain dicts."""
_ROW_TUPLES: Final[dict[str, Any]] = {
    topic: tuple[t, ...]  # type: ignore[valid-type]
    for topic, t in ROW_TYPES.items()
}
"""``tuple[row type, ...]`` of each known topic, built once rather than per message."""

R = TypeVar("R")


def decode_rows(topic: str, data: Sequence[Any]) -> tuple[Any, ...]:
    """The rows of a ``data`` list, typed for known topics; raises ``msgspec.ValidationError``."""
    rows_type = _ROW_TUPLES.get(topic)
    if rows_type is None:
        return tuple(data)
    # strict=False: numbers arrive as decimal strings and must become int / Decimal.
    rows: tuple[Any, ...] = msgspec.convert(data, rows_type, strict=False)
    return rows


class SubscriptionInfo(Protocol):
    """What a message says about the subscription it belongs to."""

    @property
    def topic(self) -> str: ...
    @property
    def address(self) -> str | None: ...
    @property
    def market_id(self) -> str | int | None: ...
    @property
    def id(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Message(Generic[R]):
    """One data message of one subscription."""

    topic: str
    rows: tuple[R, ...]
    raw: str
    """The message exactly as the server sent it (JSON text)."""
    seq: int | None
    """Sequence number of the last event reflected (protocol v2), else None."""
    snapshot: bool
    """True for the first message after a (re)subscribe: a fresh full state."""
    subscription: SubscriptionInfo
    received_at: float
    """Unix time (seconds) the message arrived."""
    resumed: tuple[R, ...] | None = None
    """After a resume with ``since`` (protocol v2, history topics): the rows that changed
    since, as the server sent them (``raw``); ``rows`` is then that merged into the previous
    window. None otherwise."""

    @property
    def data(self) -> list[Any]:
        """The ``data`` list of ``raw`` as plain JSON values (after a resume: the delta)."""
        decoded = msgspec.json.decode(self.raw)
        return list(decoded["data"])
