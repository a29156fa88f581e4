"""The event log: every state change of the venue as an immutable, serialisable event.

Events carry the *post-state* of what they change (an order, a position slot, a balance), so
folding them is assignment: the engine, the projections and a remote gateway all reach the same
state without repeating the engine's arithmetic. ``seq`` is global and gap-free from 1; ``ts`` is
the command's timestamp in unix milliseconds, as given by the caller (the engine reads no clock).

Money fields are integer quote sub-units, prices integer ticks, sizes integer lots.

Every struct here is ``gc=False``: they hold only numbers, strings and other such structs, so
they cannot form reference cycles, and a venue keeps millions of them; leaving them out of the
cyclic garbage collector's scans removes long collector pauses.
"""

from __future__ import annotations

from typing import Final

import msgspec

# Order status strings, as the venue prints them (reference §4).
OPEN: Final = "Open"
PARTIALLY_FILLED: Final = "Partially Filled"
FILLED: Final = "Filled"
CANCELLED: Final = "Cancelled"

# Restrictions (reference §4).
NO_RESTRICTION: Final = 0
FILL_OR_ABORT: Final = 1
IMMEDIATE_OR_CANCEL: Final = 2
POST_OR_ABORT: Final = 3


class OrderState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An order as it stands after an event."""

    order_id: int
    market_id: int
    address: str
    is_long: bool
    """tradeSide: the position side the order acts on (long or short)."""
    is_close: bool
    """direction: False opens or increases, True decreases or closes."""
    is_market: bool
    restriction: int
    order_type: int
    price: int
    """Limit price; for a market order, the last fill's price (0 before any fill)."""
    size: int
    remaining: int
    leverage: int
    trade_id: int
    status: str
    value: int
    """``price * size`` for a limit order; the sum of fill values for a market order."""
    tp: int | None = None
    sl: int | None = None
    reserved_margin: int = 0
    """Collateral held back for the unfilled part of a resting open order."""
    reserved_fee: int = 0
    """Collateral held back for the maker fee of the unfilled part."""
    created: int
    updated: int

    @property
    def is_ask(self) -> bool:
        """True when the order sells: opening a short or closing a long."""
        return self.is_long == self.is_close


class PositionState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A position slot (one per address, market and side: hedge mode) after an event.

    A slot exists while it has a size or resting orders; ``size == 0`` means no position but a
    reserved ``trade_id`` for the resting open orders that will open it.
    """

    address: str
    market_id: int
    is_long: bool
    trade_id: int
    leverage: int
    size: int
    value: int
    """Cost basis: the sum of ``price * size`` over the lots held, so entry = value / size."""
    margin: int
    added_margin: int = 0
    tp: int | None = None
    sl: int | None = None
    pending_opens: int = 0
    """Number of resting open orders for this slot."""
    pending_close: int = 0
    """Lots in resting close orders; never more than ``size``."""
    updated: int


class FillSide(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One party's side of a fill, with its post-states."""

    order: OrderState
    position: PositionState
    collateral: int
    """The party's free collateral after the fill."""
    fee: int
    pnl: int
    """Realised pnl of this fill (0 when opening or increasing)."""
    is_maker: bool


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of every event: global gap-free ``seq`` and the command's ``ts`` (unix ms)."""

    seq: int
    ts: int


class Deposited(Event, frozen=True, kw_only=True, tag="deposit"):
    address: str
    amount: int
    collateral: int


class Withdrew(Event, frozen=True, kw_only=True, tag="withdraw"):
    address: str
    amount: int
    collateral: int


class MarkPriceSet(Event, frozen=True, kw_only=True, tag="mark"):
    market_id: int
    price: int


class OrderPlaced(Event, frozen=True, kw_only=True, tag="order_placed"):
    """An order was accepted. Its fills, resting or cancellation follow in the same batch."""

    order: OrderState
    position: PositionState


class OrderRested(Event, frozen=True, kw_only=True, tag="order_rested"):
    """The order's unfilled part went on the book, holding its reservation."""

    order: OrderState
    position: PositionState
    collateral: int


class OrderCancelled(Event, frozen=True, kw_only=True, tag="order_cancelled"):
    """The order left the book or its unfilled remainder was dropped."""

    order: OrderState
    position: PositionState
    collateral: int
    reason: str


class Fill(Event, frozen=True, kw_only=True, tag="fill"):
    """A trade between a taker and a resting maker at the maker's price."""

    market_id: int
    price: int
    size: int
    taker: FillSide
    maker: FillSide
    fee_account: int
    """The venue's fee account after the fill."""


class PositionUpdated(Event, frozen=True, kw_only=True, tag="position_updated"):
    """Take-profit, stop-loss or added margin changed on a position."""

    position: PositionState
    collateral: int
    reason: str


class PositionReleased(Event, frozen=True, kw_only=True, tag="position_released"):
    """A slot emptied (no size, no resting orders): its trade_id is retired."""

    address: str
    market_id: int
    is_long: bool
    trade_id: int


class LiquidationSettled(Event, frozen=True, kw_only=True, tag="liquidation"):
    """What remained of a liquidated part's collateral was split 20/30/50 (reference §2).

    ``remaining`` is released margin + realised pnl - fees of the liquidation fills; when it is
    negative the insurance fund paid the shortfall and the shares are zero.
    """

    address: str
    market_id: int
    is_long: bool
    trade_id: int
    closed_size: int
    remaining: int
    to_insurance: int
    to_liquidator: int
    to_trader: int
    insurance_fund: int
    liquidator: int
    collateral: int


class IndexPriceSet(Event, frozen=True, kw_only=True, tag="index"):
    """The oracle (index) price of a market; funding follows the mark's premium over it."""

    market_id: int
    price: int


class FundingPayment(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One position's funding: ``amount`` is signed (negative paid, positive received) and
    moves the position's margin; ``position`` is the slot after it."""

    position: PositionState
    amount: int


class FundingSettled(Event, frozen=True, kw_only=True, tag="funding"):
    """A market's periodic funding between longs and shorts.

    The rate is ``rate_num / rate_den`` exactly: the mark's premium over the index, clamped to
    the market's cap; a positive rate means longs pay shorts. Payers pay from their position
    margin (at most all of it); receivers share what was paid pro rata by size, rounded down,
    and the remainder goes to the dust account, so no unit of money is created or lost.
    """

    market_id: int
    mark: int
    index: int
    rate_num: int
    rate_den: int
    payments: list[FundingPayment]
    dust: int
    """The dust account after this settlement."""
    next_funding: int
    """When the next settlement is due, unix milliseconds."""


AnyEvent = (
    Deposited
    | Withdrew
    | MarkPriceSet
    | OrderPlaced
    | OrderRested
    | OrderCancelled
    | Fill
    | PositionUpdated
    | PositionReleased
    | LiquidationSettled
    | IndexPriceSet
    | FundingSettled
)

_json_encoder = msgspec.json.Encoder()
_json_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def to_json(event: Event) -> bytes:
    """Canonical JSON of an event: the same event always gives the same bytes."""
    return _json_encoder.encode(event)


def to_json_into(event: Event, buffer: bytearray) -> None:
    """Append :func:`to_json` of ``event`` to ``buffer``: the same bytes, without allocating
    a ``bytes`` object per event (the store packs many bodies into one buffer)."""
    _json_encoder.encode_into(event, buffer, -1)


def from_json(data: bytes | bytearray | memoryview | str) -> AnyEvent:
    return _json_decoder.decode(data)
