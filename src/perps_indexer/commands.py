"""Engine commands as data, so the REST API, the demo simulator and tests share one path.

A command is a frozen struct; :func:`execute` runs it on an :class:`~perps_indexer.engine.Engine`
at the given timestamp and returns the events it produced (or raises
:class:`~perps_indexer.errors.CommandRejected`, leaving the engine unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from perps_indexer.engine import Engine, OrderResult
from perps_indexer.events import NO_RESTRICTION, AnyEvent


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="op"):
    """Base of every command."""


class Deposit(Command, frozen=True, kw_only=True, tag="deposit"):
    address: str
    amount: int


class Withdraw(Command, frozen=True, kw_only=True, tag="withdraw"):
    address: str
    amount: int


class PlaceLimitOrder(Command, frozen=True, kw_only=True, tag="place_limit_order"):
    address: str
    market_id: int
    is_long: bool
    is_close: bool
    size: int
    price: int
    leverage: int
    restriction: int = NO_RESTRICTION
    take_profit: int | None = None
    stop_loss: int | None = None


class PlaceMarketOrder(Command, frozen=True, kw_only=True, tag="place_market_order"):
    address: str
    market_id: int
    is_long: bool
    is_close: bool
    size: int
    leverage: int
    take_profit: int | None = None
    stop_loss: int | None = None


class CancelOrders(Command, frozen=True, kw_only=True, tag="cancel_orders"):
    address: str
    market_id: int
    order_ids: tuple[int, ...]


class UpdateTakeProfit(Command, frozen=True, kw_only=True, tag="update_take_profit"):
    address: str
    market_id: int
    is_long: bool
    price: int | None


class UpdateStopLoss(Command, frozen=True, kw_only=True, tag="update_stop_loss"):
    address: str
    market_id: int
    is_long: bool
    price: int | None


class AddMargin(Command, frozen=True, kw_only=True, tag="add_margin"):
    address: str
    market_id: int
    is_long: bool
    amount: int


class SetMarkPrice(Command, frozen=True, kw_only=True, tag="set_mark_price"):
    market_id: int
    price: int


class SetIndexPrice(Command, frozen=True, kw_only=True, tag="set_index_price"):
    market_id: int
    price: int


class SettleFunding(Command, frozen=True, kw_only=True, tag="settle_funding"):
    """Settle the market's funding if it is due; no events (and no change) otherwise."""

    market_id: int


AnyCommand = (
    Deposit
    | Withdraw
    | PlaceLimitOrder
    | PlaceMarketOrder
    | CancelOrders
    | UpdateTakeProfit
    | UpdateStopLoss
    | AddMargin
    | SetMarkPrice
    | SetIndexPrice
    | SettleFunding
)


class Outcome(msgspec.Struct, frozen=True):
    """What a command produced: its events and, for orders, the order result."""

    events: list[AnyEvent]
    order: OrderResult | None = None


def _order(result: OrderResult) -> Outcome:
    return Outcome(result.events, result)


def _events(events: list[AnyEvent]) -> Outcome:
    return Outcome(events)


_DISPATCH: dict[type[Command], Callable[[Engine, Any, int], Outcome]] = {
    Deposit: lambda e, c, ts: _events(e.deposit(c.address, c.amount, ts=ts)),
    Withdraw: lambda e, c, ts: _events(e.withdraw(c.address, c.amount, ts=ts)),
    PlaceLimitOrder: lambda e, c, ts: _order(
        e.place_limit_order(
            c.address,
            c.market_id,
            is_long=c.is_long,
            is_close=c.is_close,
            size=c.size,
            price=c.price,
            leverage=c.leverage,
            restriction=c.restriction,
            take_profit=c.take_profit,
            stop_loss=c.stop_loss,
            ts=ts,
        )
    ),
    PlaceMarketOrder: lambda e, c, ts: _order(
        e.place_market_order(
            c.address,
            c.market_id,
            is_long=c.is_long,
            is_close=c.is_close,
            size=c.size,
            leverage=c.leverage,
            take_profit=c.take_profit,
            stop_loss=c.stop_loss,
            ts=ts,
        )
    ),
    CancelOrders: lambda e, c, ts: _events(
        e.cancel_orders(c.address, c.market_id, c.order_ids, ts=ts)
    ),
    UpdateTakeProfit: lambda e, c, ts: _events(
        e.update_take_profit(c.address, c.market_id, c.is_long, c.price, ts=ts)
    ),
    UpdateStopLoss: lambda e, c, ts: _events(
        e.update_stop_loss(c.address, c.market_id, c.is_long, c.price, ts=ts)
    ),
    AddMargin: lambda e, c, ts: _events(
        e.add_margin(c.address, c.market_id, c.is_long, c.amount, ts=ts)
    ),
    SetMarkPrice: lambda e, c, ts: _events(e.set_mark_price(c.market_id, c.price, ts=ts)),
    SetIndexPrice: lambda e, c, ts: _events(e.set_index_price(c.market_id, c.price, ts=ts)),
    SettleFunding: lambda e, c, ts: _events(e.settle_funding(c.market_id, ts=ts)),
}


def execute(engine: Engine, command: AnyCommand, ts: int) -> Outcome:
    """Run ``command`` on ``engine`` at ``ts`` (unix ms); raises ``CommandRejected``."""
    return _DISPATCH[type(command)](engine, command, ts)
