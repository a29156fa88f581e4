"""Read models: the event log folded into the WebSocket topics' current views.

Pure and deterministic (no I/O, no clock, no asyncio): the same events give the same views and
the same bytes. Events carry post-states, so each view is updated by assignment from the event,
never by repeating the engine's arithmetic. Views keep what their rows are made of (post-states,
or the few numbers a row shows), not rows: a row is built, and its JSON kept with it, when it is
first read or pushed, so folding formats nothing and a history window's push encodes only its
new rows. A market view's message is built once per change (lazily, on the first
:meth:`Projections.message` after it) and kept, however many subscribers read it; an address
view's push is built for its watchers and not kept (:meth:`Projections.push_message`).

Which events change which view:

* ``OrderPlaced`` — order_history (a new row).
* ``OrderRested`` — open_orders (a new row) and orderbook (the level grows by the remainder).
* ``OrderCancelled`` — order_history (status Cancelled); if the order was resting, it leaves
  open_orders and its level shrinks by its remainder.
* ``Fill`` — for both sides: order_history, trade_history and positions; for the maker: its
  open_orders row (remaining size, or gone when filled) and its level shrinks by the fill size;
  the market's recent_trades (a new row).
* ``PositionUpdated`` — positions (take-profit, stop-loss, added margin).
* ``PositionReleased`` — positions (the slot is gone).
* ``Deposited``, ``Withdrew`` — deposit_withdraw_history (a new row).
* ``MarkPriceSet``, ``IndexPriceSet`` — live_funding_rate (when the rate, a price or the next
  funding time shown changes).
* ``FundingSettled`` — positions (each payment moves a position's margin), live_funding_rate, and
  one funding history row per payment (REST only).
* ``LiquidationSettled`` — none.
* best_price changes when an orderbook change moves a side's best price or its size.

The live topics (``wire.LIVE_TOPICS``) are event streams, not states: live_trade_history gets one
row per fill side, live_order_history one row per change of an order's history row. Their pushes
are not in :meth:`Projections.fold`'s result (a newer push must never replace one not yet
sent); :attr:`Projections.live` lists them, in event order, for the batch last applied, each with
the seq of its event. Their :meth:`Projections.message` is the newest single row (what a new
subscriber gets first).

The engine also stamps positions' ``updated`` when orders rest or are cancelled (its pending-order
bookkeeping); no wire field of the position changes then, so these views take positions from
fills and position updates only, and a position's ``last_updated`` is when a field shown on the
wire last changed.

A view's key is in :meth:`Projections.fold`'s result when an event of the batch added,
removed or altered one of its rows, even if a later event of the batch restored it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Reversible, Sequence
from fractions import Fraction
from itertools import islice
from typing import Any, Final, Protocol, TypeVar

import msgspec
from sortedcontainers import SortedDict

from perps_indexer import errors
from perps_indexer.events import (
    AnyEvent,
    Deposited,
    Event,
    Fill,
    FundingSettled,
    IndexPriceSet,
    LiquidationSettled,
    MarkPriceSet,
    OrderCancelled,
    OrderPlaced,
    OrderRested,
    OrderState,
    PositionReleased,
    PositionState,
    PositionUpdated,
    Withdrew,
)
from perps_indexer.markets import MarketSpec
from perps_indexer.units import BPS
from perps_indexer.wire import (
    ALL_TOPICS,
    BEST_PRICE,
    DEPOSIT_WITHDRAW_HISTORY,
    LIVE_FUNDING_RATE,
    LIVE_ORDER_HISTORY,
    LIVE_TRADE_HISTORY,
    OPEN_ORDERS,
    ORDER_HISTORY,
    ORDERBOOK,
    POSITIONS,
    RECENT_TRADES,
    TRADE_HISTORY,
    BestPriceRow,
    DepositWithdrawRow,
    FundingHistoryRow,
    FundingRateRow,
    OpenOrderRow,
    OrderBookRow,
    OrderHistoryRow,
    PositionRow,
    RecentTradeRow,
    Row,
    TradeRow,
    best_price_row,
    deposit_withdraw_row,
    encode_message,
    encode_row,
    format_rate,
    funding_history_row,
    funding_rate_row,
    join_message,
    open_order_json,
    open_order_row,
    order_history_json,
    order_history_row,
    orderbook_json,
    orderbook_row,
    position_json,
    position_row,
    recent_trade_row,
    same_order_history_row,
    same_position_row,
    trade_json,
    trade_row_of,
)

Key = tuple[str, str | int]
"""A view: ``(topic, address)`` for the address topics, ``(topic, market_id)`` for the market
topics."""
LiveRow = tuple[Key, int, Row]
"""A live topic's push: its stream, the seq of its event and its one row."""

_T = TypeVar("_T")
_SNAPSHOT_VERSION: Final = 4
_EMPTY: Final = {topic: encode_message(topic, [], 0) for topic in ALL_TOPICS}

# The views keep what their rows are made of, not the rows: the fold only assigns, and a row
# is built (and its JSON cached in ``data``) when a view is read or pushed. Most views are never
# read between two of their changes during an ingest, and a pushed window re-encodes only its
# new rows. Entries are replaced, never changed, except for filling in ``data``.


class _Entry(Protocol):
    data: bytes | None

    def row(self) -> Row: ...

    def encode(self) -> bytes:
        """``encode_row(self.row())``: the row's JSON (the busiest entries write it without
        building the row)."""
        ...


class _RowEntry(msgspec.Struct, gc=False):
    """Base of the entries: the row's JSON through the row struct, for those without a way
    around it (see :func:`perps_indexer.wire.order_history_json`)."""

    def row(self) -> Row:
        raise NotImplementedError

    def encode(self) -> bytes:
        return encode_row(self.row())


class _Order(_RowEntry, gc=False):
    """An order's history row."""

    state: OrderState
    data: bytes | None = None

    def row(self) -> OrderHistoryRow:
        return order_history_row(self.state)

    def encode(self) -> bytes:
        return order_history_json(self.state)


class _Open(_RowEntry, gc=False):
    """A resting order's open_orders row."""

    state: OrderState
    data: bytes | None = None

    def row(self) -> OpenOrderRow:
        return open_order_row(self.state)

    def encode(self) -> bytes:
        return open_order_json(self.state)


class _Position(_RowEntry, gc=False):
    """An open position's row."""

    state: PositionState
    spec: MarketSpec
    data: bytes | None = None

    def row(self) -> PositionRow:
        return position_row(self.state, self.spec)

    def encode(self) -> bytes:
        return position_json(self.state, self.spec)


class _Trade(_RowEntry, gc=False):
    """One party's side of a fill: the values its trade_history row shows (not the event,
    which would keep both parties' order and position states alive)."""

    address: str
    fee: int
    market_id: int
    order_type: int
    pnl: int
    price: int
    size: int
    ts: int
    trade_id: int
    data: bytes | None = None

    def row(self) -> TradeRow:
        return trade_row_of(self.address, *_trade_values(self))

    def encode(self) -> bytes:  # the pushes' path: the fields one by one, no tuple
        return trade_json(
            self.address,
            self.fee,
            self.market_id,
            self.order_type,
            self.pnl,
            self.price,
            self.size,
            self.ts,
            self.trade_id,
        )


class _Recent(_RowEntry, gc=False):
    """A market's public fill."""

    fill: Fill
    data: bytes | None = None

    def row(self) -> RecentTradeRow:
        return recent_trade_row(self.fill)


class _Level(_RowEntry, gc=False):
    """An aggregated price level: total remaining lots and when it last changed."""

    market_id: int
    is_ask: bool
    price: int
    size: int
    ts: int
    data: bytes | None = None

    def row(self) -> OrderBookRow:
        return orderbook_row(self.market_id, self.is_ask, self.price, self.size, self.ts)

    def encode(self) -> bytes:
        return orderbook_json(self.market_id, self.is_ask, self.price, self.size, self.ts)


class _Best(_RowEntry, gc=False):
    """A market's best ``(price, size)`` of each side (None: that side is empty)."""

    market_id: int
    bid: tuple[int, int] | None
    ask: tuple[int, int] | None
    ts: int
    data: bytes | None = None

    def row(self) -> BestPriceRow:
        return best_price_row(self.market_id, self.bid, self.ask, self.ts)


class _Deposit(_RowEntry, gc=False):
    """A deposit or a withdrawal."""

    event: Deposited | Withdrew
    data: bytes | None = None

    def row(self) -> DepositWithdrawRow:
        return deposit_withdraw_row(self.event)


class _Funding(msgspec.Struct, array_like=True, gc=False):
    """A market's funding inputs and the row shown for them."""

    mark: int | None
    index: int | None
    due: int
    """When the next settlement is due (unix ms), as the engine keeps it: from the market's
    first mark or index price, the next interval boundary after it; after a settlement, the
    time it announced. It may be past while a price is missing (nothing settles then)."""
    row: FundingRateRow


_TradeValues = tuple[int, int, int, int, int, int, int, int]
"""A ``_Trade`` without its address and cache, as snapshots keep it."""
_LevelValues = tuple[int, int, int]
"""A ``_Level`` as snapshots keep it: price, size and when it last changed."""


class _Version(msgspec.Struct, array_like=True):
    """The head of every snapshot version, read before the rest."""

    version: int


class _Snapshot(msgspec.Struct, array_like=True):
    """The persisted read models: every list oldest (or lowest price) first."""

    version: int
    seq: int
    history_limit: int
    positions: dict[str, list[PositionState]]
    open_orders: dict[str, list[OrderState]]
    order_history: dict[str, list[OrderState]]
    trade_history: dict[str, list[_TradeValues]]
    asks: dict[int, list[_LevelValues]]
    bids: dict[int, list[_LevelValues]]
    changed_at: list[tuple[str, str | int, int]]
    recent_trades: dict[int, list[Fill]]
    best_price: dict[int, tuple[tuple[int, int] | None, tuple[int, int] | None, int]]
    deposits: dict[str, list[Deposited | Withdrew]]
    funding: dict[int, _Funding]
    funding_history: dict[str, list[FundingHistoryRow]]
    live_orders: dict[str, OrderState]


# JSON, not msgpack: the states hold ids beyond 64 bits.
_snapshot_encoder = msgspec.json.Encoder()
_snapshot_decoder = msgspec.json.Decoder(_Snapshot)
_version_decoder = msgspec.json.Decoder(_Version)


class Projections:
    """The topics' views, folded from the event log from ``seq`` 1 on."""

    def __init__(self, markets: Mapping[int, MarketSpec], history_limit: int = 100) -> None:
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, got {history_limit}")
        self.markets: dict[int, MarketSpec] = dict(markets)
        self.history_limit = history_limit
        self.seq = 0
        """The seq of the last applied event."""
        # address -> (market_id, is_long) -> position; only positions with a size are kept.
        self._positions: dict[str, dict[tuple[int, bool], _Position]] = {}
        # address -> order_id -> order, in the order the orders came to rest (oldest first).
        self._open: dict[str, dict[int, _Open]] = {}
        # address -> order_id -> order, oldest change first; at most history_limit orders.
        self._orders: dict[str, dict[int, _Order]] = {}
        # address -> the order of its newest live_order_history push.
        self._live_orders: dict[str, _Order] = {}
        # address -> fills, oldest first; at most history_limit.
        self._trades: dict[str, deque[_Trade]] = {}
        # market_id -> price -> level; SortedDict so that a view is a walk, not a sort.
        self._asks: dict[int, Any] = {m: SortedDict() for m in self.markets}
        self._bids: dict[int, Any] = {m: SortedDict() for m in self.markets}
        # market_id -> public fills, oldest first; at most history_limit.
        self._recent: dict[int, deque[_Recent]] = {
            m: deque(maxlen=history_limit) for m in self.markets
        }
        # market_id -> best bid and ask; from the market's first book change on.
        self._best: dict[int, _Best] = {}
        # address -> deposits and withdrawals, oldest first; at most history_limit.
        self._deposits: dict[str, deque[_Deposit]] = {}
        # market_id -> funding inputs and row; from the market's first price or settlement on.
        self._funding: dict[int, _Funding] = {}
        # address -> funding payment rows, oldest first; at most history_limit rows.
        self._funding_history: dict[str, deque[FundingHistoryRow]] = {}
        # order_id -> address, for every order in an order_history window (ids are global).
        self._order_owner: dict[int, str] = {}
        # The live pushes of the batch last applied: stream, seq and the row's entry.
        self._live: list[tuple[Key, int, _Entry]] = []
        self._messages: dict[Key, bytes] = {}
        # (topic, key) -> seq of the batch that last changed the view: the "seq" of its pushes.
        self._changed_at: dict[Key, int] = {}
        self._appliers: dict[type[Event], Callable[[Any, dict[Key, int]], None]] = {
            OrderPlaced: self._placed,
            OrderRested: self._rested,
            OrderCancelled: self._cancelled,
            Fill: self._fill,
            PositionUpdated: self._position_updated,
            PositionReleased: self._released,
            Deposited: self._deposit,
            Withdrew: self._deposit,
            MarkPriceSet: self._mark,
            IndexPriceSet: self._index,
            FundingSettled: self._funding_settled,
            LiquidationSettled: _unchanged,
        }

    # ------------------------------------------------------------------ folding

    def apply(self, event: AnyEvent) -> None:
        """Fold one event; its ``seq`` must be the next one."""
        self.fold((event,))

    def fold(self, events: Iterable[AnyEvent]) -> dict[Key, int]:
        """Fold events in order and return the views they changed, each with the seq of the
        last event that changed it (what :meth:`push_message` takes); live topics aside: their
        pushes are in :attr:`live` afterwards.

        The sequence numbers are checked for the whole batch first, so a gap raises
        :class:`~perps_indexer.errors.SequenceGap` before anything is applied.
        """
        batch = list(events)
        first = self.seq + 1
        if [event.seq for event in batch] != list(range(first, first + len(batch))):
            for offset, event in enumerate(batch, first):
                if event.seq != offset:
                    raise errors.SequenceGap(offset, event.seq)
        # The appliers note each view they change with their event's seq: a view's seq is its
        # last changing event's, whatever the batching.
        changed: dict[Key, int] = {}
        live: list[tuple[Key, int, _Entry]] = []
        self._live = live
        appliers = self._appliers
        try:
            for event in batch:
                appliers[type(event)](event, changed)
        except BaseException:
            self.seq = event.seq - 1  # the events before the failing one stay applied
            raise
        else:
            if batch:
                self.seq = batch[-1].seq
        finally:
            changed_at = self._changed_at
            messages = self._messages
            changed_at.update(changed)
            for stream, seq, _ in live:
                changed_at[stream] = seq
            if messages:  # else nothing to drop (no view was read since it last changed)
                for key in changed:
                    messages.pop(key, None)
                for stream, _, _ in live:
                    messages.pop(stream, None)
        return changed

    @property
    def live(self) -> list[LiveRow]:
        """The live topics' pushes of the batch last applied, in event order."""
        return [(stream, seq, entry.row()) for stream, seq, entry in self._live]

    def live_messages(self, wanted: Callable[[Key], bool]) -> list[tuple[Key, bytes]]:
        """The encoded pushes of :attr:`live` whose stream is ``wanted`` (e.g. has watchers),
        in order: one message per row, each with its event's seq."""
        return [
            (stream, join_message(stream[0], _encoded((entry,)), seq))
            for stream, seq, entry in self._live
            if wanted(stream)
        ]

    def _placed(self, ev: OrderPlaced, changed: dict[Key, int]) -> None:
        self._set_history(ev.order, ev.seq, changed)

    def _rested(self, ev: OrderRested, changed: dict[Key, int]) -> None:
        order = ev.order
        seq = ev.seq
        self._set_history(order, seq, changed)
        address = order.address
        resting = self._open.get(address)
        if resting is None:
            resting = self._open[address] = {}
        resting[order.order_id] = _Open(order)
        changed[(OPEN_ORDERS, address)] = seq
        self._move_level(order, order.remaining, ev.ts, seq, changed)

    def _cancelled(self, ev: OrderCancelled, changed: dict[Key, int]) -> None:
        order = ev.order
        self._set_history(order, ev.seq, changed)
        if self._drop_open(order):
            changed[(OPEN_ORDERS, order.address)] = ev.seq
            self._move_level(order, -order.remaining, ev.ts, ev.seq, changed)

    def _fill(self, ev: Fill, changed: dict[Key, int]) -> None:
        # The hottest applier (every fill, both sides): the maps and the fill's fields are
        # looked up once.
        seq = ev.seq
        live = self._live
        all_trades = self._trades
        market_id, price, size, ts = ev.market_id, ev.price, ev.size, ev.ts
        for side in (ev.maker, ev.taker):
            order = side.order
            address = order.address
            self._set_history(order, seq, changed)
            trades = all_trades.get(address)
            if trades is None:
                trades = all_trades[address] = deque(maxlen=self.history_limit)
            trade = _Trade(
                address,
                side.fee,
                market_id,
                order.order_type,
                side.pnl,
                price,
                size,
                ts,
                side.position.trade_id,
            )
            trades.append(trade)
            changed[(TRADE_HISTORY, address)] = seq
            live.append(((LIVE_TRADE_HISTORY, address), seq, trade))
            if side.is_maker:
                order_id = order.order_id
                resting = self._open.get(address)
                if resting is None or order_id not in resting:
                    raise errors.IntegrityError(
                        f"fill seq {seq}: maker order {order_id} is not resting"
                    )
                if order.remaining:
                    resting[order_id] = _Open(order)  # keeps its place
                else:
                    self._drop_open(order)
                changed[(OPEN_ORDERS, address)] = seq
                self._move_level(order, -size, ts, seq, changed)
            self._set_position(side.position, seq, changed)
        self._recent[market_id].append(_Recent(ev))
        changed[(RECENT_TRADES, market_id)] = seq

    def _deposit(self, ev: Deposited | Withdrew, changed: dict[Key, int]) -> None:
        rows = self._deposits.get(ev.address)
        if rows is None:
            rows = self._deposits[ev.address] = deque(maxlen=self.history_limit)
        rows.append(_Deposit(ev))
        changed[(DEPOSIT_WITHDRAW_HISTORY, ev.address)] = ev.seq

    def _mark(self, ev: MarkPriceSet, changed: dict[Key, int]) -> None:
        state = self._funding.get(ev.market_id)
        if state is None:
            due = self._first_due(ev.market_id, ev.ts)
            self._set_funding(ev, ev.price, None, due, None, changed)
        else:
            self._set_funding(ev, ev.price, state.index, state.due, None, changed)

    def _index(self, ev: IndexPriceSet, changed: dict[Key, int]) -> None:
        state = self._funding.get(ev.market_id)
        if state is None:
            due = self._first_due(ev.market_id, ev.ts)
            self._set_funding(ev, None, ev.price, due, None, changed)
        else:
            self._set_funding(ev, state.mark, ev.price, state.due, None, changed)

    def _first_due(self, market_id: int, ts: int) -> int:
        """A market's first funding: the first interval boundary after its first price."""
        interval = self.markets[market_id].funding_interval_s * 1000
        return (ts // interval + 1) * interval

    def _funding_settled(self, ev: FundingSettled, changed: dict[Key, int]) -> None:
        for payment in ev.payments:
            self._set_position(payment.position, ev.seq, changed)
            address = payment.position.address
            rows = self._funding_history.get(address)
            if rows is None:
                rows = self._funding_history[address] = deque(maxlen=self.history_limit)
            rows.append(funding_history_row(payment, ev))
        rate = Fraction(ev.rate_num, ev.rate_den)
        self._set_funding(ev, ev.mark, ev.index, ev.next_funding, rate, changed)

    def _set_funding(
        self,
        ev: MarkPriceSet | IndexPriceSet | FundingSettled,
        mark: int | None,
        index: int | None,
        due: int,
        rate: Fraction | None,
        changed: dict[Key, int],
    ) -> None:
        """Set a market's funding inputs; the view changes when a field other than
        last_updated does. ``rate`` None: the premium of ``mark`` over ``index``, clamped."""
        market_id = ev.market_id
        spec = self.markets[market_id]
        if rate is None:
            rate = Fraction(0)
            if mark is not None and index:
                cap = Fraction(spec.funding_cap_bps, BPS)
                rate = max(-cap, min(cap, Fraction(mark - index, index)))
        row = funding_rate_row(
            market_id, format_rate(rate.numerator, rate.denominator), mark, index, due, ev.ts
        )
        old = self._funding.get(market_id)
        if old is not None and _same_but_time(old.row, row):
            row = old.row
        else:
            changed[(LIVE_FUNDING_RATE, market_id)] = ev.seq
        self._funding[market_id] = _Funding(mark, index, due, row)

    def _position_updated(self, ev: PositionUpdated, changed: dict[Key, int]) -> None:
        self._set_position(ev.position, ev.seq, changed)

    def _released(self, ev: PositionReleased, changed: dict[Key, int]) -> None:
        slots = self._positions.get(ev.address)
        if slots is not None and slots.pop((ev.market_id, ev.is_long), None) is not None:
            changed[(POSITIONS, ev.address)] = ev.seq
            if not slots:
                del self._positions[ev.address]

    def _set_position(self, pos: PositionState, seq: int, changed: dict[Key, int]) -> None:
        address = pos.address
        slot = (pos.market_id, pos.is_long)
        slots = self._positions.get(address)
        if pos.size:
            if slots is None:
                slots = self._positions[address] = {}
            else:
                old = slots.get(slot)
                if old is not None and same_position_row(old.state, pos, old.spec):
                    return  # no change, no push
            slots[slot] = _Position(pos, self.markets[pos.market_id])
        elif slots is None or slots.pop(slot, None) is None:
            return
        elif not slots:
            del self._positions[address]
        changed[(POSITIONS, address)] = seq

    def _set_history(self, order: OrderState, seq: int, changed: dict[Key, int]) -> None:
        address = order.address
        order_id = order.order_id
        rows = self._orders.get(address)
        if rows is None:
            rows = self._orders[address] = {}
            old = None
        else:
            old = rows.get(order_id)
        if old is not None:
            if same_order_history_row(old.state, order):
                # Same row, but the order was touched last: it moves to the front, as the
                # store-backed reads (deep history, since-resume) order by the last event.
                if next(reversed(rows)) != order_id:
                    del rows[order_id]
                    rows[order_id] = old
                    changed[(ORDER_HISTORY, address)] = seq
                return
            del rows[order_id]  # re-inserted below at the newest end
        entry = rows[order_id] = _Order(order)
        if old is None:
            self._order_owner[order_id] = address
            if len(rows) > self.history_limit:
                oldest = next(iter(rows))
                del rows[oldest]
                del self._order_owner[oldest]
        changed[(ORDER_HISTORY, address)] = seq
        self._live_orders[address] = entry
        self._live.append(((LIVE_ORDER_HISTORY, address), seq, entry))

    def _drop_open(self, order: OrderState) -> bool:
        """Remove a resting order's row; False when it was not resting."""
        rows = self._open.get(order.address)
        if rows is None or rows.pop(order.order_id, None) is None:
            return False
        if not rows:
            del self._open[order.address]
        return True

    def _move_level(
        self, order: OrderState, delta: int, ts: int, seq: int, changed: dict[Key, int]
    ) -> None:
        market_id = order.market_id
        is_ask = order.is_ask
        price = order.price
        side = self._asks[market_id] if is_ask else self._bids[market_id]
        level: _Level | None = side.get(price)
        size = (0 if level is None else level.size) + delta
        if size < 0:
            raise errors.IntegrityError(
                f"market {market_id} level {price} would hold {size} lots after "
                f"order {order.order_id} changed"
            )
        if size:
            side[price] = _Level(market_id, is_ask, price, size, ts)
        else:
            del side[price]
        changed[(ORDERBOOK, market_id)] = seq
        self._set_best(market_id, is_ask, price, size, ts, seq, changed)

    def _set_best(
        self,
        market_id: int,
        is_ask: bool,
        price: int,
        size: int,
        ts: int,
        seq: int,
        changed: dict[Key, int],
    ) -> None:
        """After the level at ``price`` changed to ``size`` lots: the best price row, if the
        change reached it."""
        top = self._best.get(market_id)
        bid, ask = (None, None) if top is None else (top.bid, top.ask)
        if is_ask:
            if ask is not None and price > ask[0]:
                return  # behind the best ask
            if size:
                ask = (price, size)  # at or before the best ask: the best now
            else:
                asks = self._asks[market_id]
                best, level = asks.peekitem(0) if asks else (0, None)
                ask = None if level is None else (best, level.size)
        else:
            if bid is not None and price < bid[0]:
                return  # behind the best bid
            if size:
                bid = (price, size)
            else:
                bids = self._bids[market_id]
                best, level = bids.peekitem(-1) if bids else (0, None)
                bid = None if level is None else (best, level.size)
        if top is None or bid != top.bid or ask != top.ask:
            self._best[market_id] = _Best(market_id, bid, ask, ts)
            changed[(BEST_PRICE, market_id)] = seq

    # ------------------------------------------------------------------ views

    def positions(self, address: str) -> list[PositionRow]:
        """Open positions of ``address``: by market, the long before the short."""
        return [p.row() for p in self._position_entries(address)]

    def _position_entries(self, address: str) -> list[_Position]:
        slots = self._positions.get(address)
        if not slots:
            return []
        if len(slots) == 1:  # the common case, without a sort
            return list(slots.values())
        return [slots[k] for k in sorted(slots, key=lambda k: (k[0], not k[1]))]

    def open_orders(self, address: str) -> list[OpenOrderRow]:
        """Resting orders of ``address``, oldest first."""
        return [o.row() for o in self._open_entries(address)]

    def _open_entries(self, address: str) -> Iterable[_Open]:
        return self._open.get(address, {}).values()

    def order_history(self, address: str, limit: int | None = None) -> list[OrderHistoryRow]:
        """Orders of ``address`` in any status, the most recently changed first."""
        return [o.row() for o in _newest(self._orders.get(address, {}).values(), limit)]

    def _order_entries(self, address: str) -> Iterator[_Order]:
        # The ``_entries`` read by messages: ``reversed``, not ``_newest(rows, None)``, is a
        # call less on every push.
        return reversed(self._orders.get(address, {}).values())

    def trade_history(self, address: str, limit: int | None = None) -> list[TradeRow]:
        """Fills of ``address``, newest first."""
        return [t.row() for t in _newest(self._trades.get(address, ()), limit)]

    def _trade_entries(self, address: str) -> Iterator[_Trade]:
        return reversed(self._trades.get(address, ()))

    def orderbook(self, market_id: int) -> list[OrderBookRow]:
        """Aggregated levels of a market: asks by ascending price, then bids descending."""
        return [level.row() for level in self._level_entries(market_id)]

    def _level_entries(self, market_id: int) -> list[_Level]:
        asks = self._asks.get(market_id)
        if asks is None:
            return []
        # Walks of the sorted keys: a SortedDict's values view reversed goes by position,
        # a B-tree lookup per level (7.9 us for a book of 40 levels, against 1.8 us so).
        levels = list(map(asks.__getitem__, asks))
        bids = self._bids[market_id]
        levels.extend(map(bids.__getitem__, reversed(bids)))
        return levels

    def recent_trades(self, market_id: int, limit: int | None = None) -> list[RecentTradeRow]:
        """Public fills of a market, newest first."""
        return [t.row() for t in _newest(self._recent.get(market_id, ()), limit)]

    def _recent_entries(self, market_id: int) -> Iterator[_Recent]:
        return reversed(self._recent.get(market_id, ()))

    def best_price(self, market_id: int) -> list[BestPriceRow]:
        """The market's best bid and ask as one row; none before its first book change."""
        return [best.row() for best in self._best_entries(market_id)]

    def _best_entries(self, market_id: int) -> list[_Best]:
        best = self._best.get(market_id)
        return [] if best is None else [best]

    def live_funding_rate(self, market_id: int) -> list[FundingRateRow]:
        """The market's funding row; none before its first price or settlement."""
        state = self._funding.get(market_id)
        return [] if state is None else [state.row]

    def live_trade_history(self, address: str) -> list[TradeRow]:
        """The address's newest fill row (what a new live_trade_history subscriber gets)."""
        return self.trade_history(address, 1)

    def _live_trade_entries(self, address: str) -> Iterator[_Trade]:
        return _newest(self._trades.get(address, ()), 1)

    def live_order_history(self, address: str) -> list[OrderHistoryRow]:
        """The address's order whose row changed last (a new live_order_history subscriber's
        first message: the newest live push)."""
        return [o.row() for o in self._live_order_entries(address)]

    def _live_order_entries(self, address: str) -> list[_Order]:
        entry = self._live_orders.get(address)
        return [] if entry is None else [entry]

    def deposit_withdraw_history(
        self, address: str, limit: int | None = None
    ) -> list[DepositWithdrawRow]:
        """Deposits and withdrawals of ``address``, newest first."""
        return [d.row() for d in _newest(self._deposits.get(address, ()), limit)]

    def _deposit_entries(self, address: str) -> Iterator[_Deposit]:
        return reversed(self._deposits.get(address, ()))

    def funding_history(self, address: str, limit: int | None = None) -> list[FundingHistoryRow]:
        """Funding payments of ``address``'s positions, newest first."""
        return list(_newest(self._funding_history.get(address, ()), limit))

    def order_status(self, market_id: int, order_id: int) -> OrderHistoryRow | None:
        """An order's history row if it is in its address's window (else ask the store)."""
        address = self._order_owner.get(order_id)
        if address is None:
            return None
        entry = self._orders[address][order_id]
        return entry.row() if entry.state.market_id == market_id else None

    def view(self, topic: str, key: str | int) -> Sequence[Row]:
        """The rows of one view (``key`` an address or a market id, as the topic wants)."""
        market_view = _MARKET_VIEWS.get(topic)
        if market_view is not None:
            return market_view(self, key) if isinstance(key, int) else []
        if topic not in _ADDRESS_VIEWS:
            raise KeyError(f"unknown topic {topic!r}")
        return _ADDRESS_VIEWS[topic](self, key) if isinstance(key, str) else []

    def changed_at(self, topic: str, key: str | int) -> int:
        """The seq of the last event that changed a view (0 if none ever did)."""
        return self._changed_at.get((topic, key), 0)

    def message(self, topic: str, key: str | int, *, keep: bool = True) -> bytes:
        """The encoded push of a view's current state, kept until the view changes (with
        ``keep`` False, built if it is not kept already, and not kept).

        It carries ``"seq"``: the sequence number of the last event that changed the view, so
        a subscriber's messages of one stream carry increasing seqs. Each row's JSON is kept
        with the row, so a change encodes only the rows it made.
        """
        cache_key = (topic, key)
        data = self._messages.get(cache_key)
        if data is None:
            seq = self._changed_at.get(cache_key)
            if seq is None:
                # Not cached: subscribers to unknown addresses must not grow the cache.
                return _EMPTY[topic]
            data = self._build(topic, key, seq)
            if keep:
                self._messages[cache_key] = data
        return data

    def push_message(self, topic: str, key: str | int, seq: int) -> bytes:
        """:meth:`message` for the push of a view that the batch last folded changed, with
        the seq :meth:`fold` gave it: the same bytes, but kept for later reads only when the
        view is a market's.

        The fold dropped the view's kept message and gave its seq, so neither is looked up:
        the two maps hold an entry per stream of every address, and a lookup in them is a
        cache miss more often than not (each push paid two).

        A market view (an order book) is read by many subscribers. An address view's push
        goes to its few watchers at once and is seldom read again before it changes (a
        subscribe then builds it from the rows' kept JSON). Keeping every address stream's
        newest push held one message of up to ``history_limit`` rows per stream, for as long
        as the stream did not change, and each new one was a fresh page of memory."""
        data = self._build(topic, key, seq)
        if isinstance(key, int):
            self._messages[(topic, key)] = data
        return data

    def _build(self, topic: str, key: str | int, seq: int) -> bytes:
        """A changed view's message, from its rows' kept JSON where the topic has entries
        (its key has the topic's type: changed views hold no other)."""
        entries = _ENTRIES.get(topic)
        if entries is None:
            return encode_message(topic, self.view(topic, key), seq)
        return join_message(topic, _encoded(entries(self, key)), seq)

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> bytes:
        """The read models as JSON, for :meth:`restore`."""
        snap = _Snapshot(
            version=_SNAPSHOT_VERSION,
            seq=self.seq,
            history_limit=self.history_limit,
            positions={a: [p.state for p in s.values()] for a, s in self._positions.items()},
            open_orders={a: [o.state for o in rows.values()] for a, rows in self._open.items()},
            order_history={a: [o.state for o in rows.values()] for a, rows in self._orders.items()},
            trade_history={a: [_trade_values(t) for t in rows] for a, rows in self._trades.items()},
            asks={m: [_level_values(lv) for lv in side.values()] for m, side in self._asks.items()},
            bids={m: [_level_values(lv) for lv in side.values()] for m, side in self._bids.items()},
            changed_at=[(t, k, seq) for (t, k), seq in self._changed_at.items()],
            recent_trades={m: [t.fill for t in rows] for m, rows in self._recent.items()},
            best_price={m: (b.bid, b.ask, b.ts) for m, b in self._best.items()},
            deposits={a: [d.event for d in rows] for a, rows in self._deposits.items()},
            funding=dict(self._funding),
            funding_history={a: list(rows) for a, rows in self._funding_history.items()},
            live_orders={a: o.state for a, o in self._live_orders.items()},
        )
        return _snapshot_encoder.encode(snap)

    @classmethod
    def restore(cls, markets: Mapping[int, MarketSpec], data: bytes) -> Projections:
        """Rebuild projections from :meth:`snapshot` bytes; corrupt data, or a snapshot of
        another version (a restart then folds the log), raises IntegrityError."""
        try:
            version = _version_decoder.decode(data).version
            if version != _SNAPSHOT_VERSION:
                raise errors.IntegrityError(
                    f"projection snapshot version {version} is not {_SNAPSHOT_VERSION}"
                )
            snap = _snapshot_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise errors.IntegrityError(f"projection snapshot is unreadable: {exc}") from None
        self = cls(markets, snap.history_limit)
        self.seq = snap.seq
        self._changed_at = {(topic, key): seq for topic, key, seq in snap.changed_at}
        per_market: tuple[Iterable[int], ...] = (
            (p.market_id for states in snap.positions.values() for p in states),
            snap.asks,
            snap.bids,
            snap.recent_trades,
            snap.best_price,
            snap.funding,
        )
        for market_ids in per_market:
            unknown = set(market_ids) - set(self.markets)
            if unknown:
                raise errors.IntegrityError(
                    f"projection snapshot has unknown market {min(unknown)}"
                )
        for address, positions in snap.positions.items():
            self._positions[address] = {
                (p.market_id, p.is_long): _Position(p, self.markets[p.market_id]) for p in positions
            }
        for address, opens in snap.open_orders.items():
            self._open[address] = {o.order_id: _Open(o) for o in opens}
        self._live_orders = {a: _Order(o) for a, o in snap.live_orders.items()}
        for address, orders in snap.order_history.items():
            self._orders[address] = {o.order_id: _Order(o) for o in orders}
            self._order_owner.update(dict.fromkeys(self._orders[address], address))
        for address, trades in snap.trade_history.items():
            self._trades[address] = deque(
                (_Trade(address, *t) for t in trades), maxlen=snap.history_limit
            )
        for books, is_ask, levels in (
            (self._asks, True, snap.asks),
            (self._bids, False, snap.bids),
        ):
            for market_id, values in levels.items():
                books[market_id].update(
                    (price, _Level(market_id, is_ask, price, size, ts))
                    for price, size, ts in values
                )
        for market_id, recent in snap.recent_trades.items():
            self._recent[market_id].extend(_Recent(fill) for fill in recent)
        self._best = {m: _Best(m, bid, ask, ts) for m, (bid, ask, ts) in snap.best_price.items()}
        self._funding = dict(snap.funding)
        for address, moves in snap.deposits.items():
            self._deposits[address] = deque(map(_Deposit, moves), maxlen=snap.history_limit)
        for address, payments in snap.funding_history.items():
            self._funding_history[address] = deque(payments, maxlen=snap.history_limit)
        return self


def _unchanged(event: Event, changed: dict[Key, int]) -> None:
    """Events that change no view (liquidation payouts)."""


def _same_but_time(old: FundingRateRow, new: FundingRateRow) -> bool:
    """True when two rows differ at most in ``last_updated``."""
    return msgspec.structs.replace(new, last_updated=old.last_updated) == old


def _newest(rows: Reversible[_T], limit: int | None) -> Iterator[_T]:
    newest = reversed(rows)
    return newest if limit is None else islice(newest, limit)


def _encoded(entries: Iterable[_Entry]) -> list[bytes]:
    """The rows' JSON, each encoded on its first read and kept with the row."""
    return [entry.data or _encode(entry) for entry in entries]


def _encode(entry: _Entry) -> bytes:
    data = entry.data = entry.encode()
    return data


def _trade_values(trade: _Trade) -> _TradeValues:
    t = trade
    return (t.fee, t.market_id, t.order_type, t.pnl, t.price, t.size, t.ts, t.trade_id)


def _level_values(level: _Level) -> _LevelValues:
    return (level.price, level.size, level.ts)


_ADDRESS_VIEWS: Final[dict[str, Callable[[Projections, str], Sequence[Row]]]] = {
    POSITIONS: Projections.positions,
    OPEN_ORDERS: Projections.open_orders,
    ORDER_HISTORY: Projections.order_history,
    TRADE_HISTORY: Projections.trade_history,
    LIVE_TRADE_HISTORY: Projections.live_trade_history,
    LIVE_ORDER_HISTORY: Projections.live_order_history,
    DEPOSIT_WITHDRAW_HISTORY: Projections.deposit_withdraw_history,
}
_MARKET_VIEWS: Final[dict[str, Callable[[Projections, int], Sequence[Row]]]] = {
    ORDERBOOK: Projections.orderbook,
    RECENT_TRADES: Projections.recent_trades,
    BEST_PRICE: Projections.best_price,
    LIVE_FUNDING_RATE: Projections.live_funding_rate,
}
# The entries of each view's rows, in the view's order (live_funding_rate keeps its row).
_ENTRIES: Final[dict[str, Callable[[Projections, Any], Iterable[_Entry]]]] = {
    POSITIONS: Projections._position_entries,
    OPEN_ORDERS: Projections._open_entries,
    ORDER_HISTORY: Projections._order_entries,
    TRADE_HISTORY: Projections._trade_entries,
    LIVE_TRADE_HISTORY: Projections._live_trade_entries,
    LIVE_ORDER_HISTORY: Projections._live_order_entries,
    DEPOSIT_WITHDRAW_HISTORY: Projections._deposit_entries,
    ORDERBOOK: Projections._level_entries,
    RECENT_TRADES: Projections._recent_entries,
    BEST_PRICE: Projections._best_entries,
}
