"""Read models: the event log folded into the WebSocket topics' current views.

Pure and deterministic (no I/O, no clock, no asyncio): the same events give the same views and
the same bytes. Events carry post-states, so each view is updated by assignment from the event,
never by repeating the engine's arithmetic. Rows are built once per change and each topic's push
is encoded once per change (lazily, on the first :meth:`Projections.message` after it), however
many subscribers read it.

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
are not in :meth:`Projections.apply_batch`'s result (a newer push must never replace one not yet
sent); :attr:`Projections.live` lists them, in event order, for the batch last applied, each with
the seq of its event. Their :meth:`Projections.message` is the newest single row (what a new
subscriber gets first).

The engine also stamps positions' ``updated`` when orders rest or are cancelled (its pending-order
bookkeeping); no wire field of the position changes then, so these views take positions from
fills and position updates only, and a position's ``last_updated`` is when a field shown on the
wire last changed.

A view's key is in :meth:`Projections.apply_batch`'s result when an event of the batch added,
removed or altered one of its rows, even if a later event of the batch restored it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Reversible, Sequence
from fractions import Fraction
from itertools import islice
from typing import Any, Final, TypeVar

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
    format_rate,
    funding_history_row,
    funding_rate_row,
    open_order_row,
    order_history_row,
    orderbook_row,
    position_row,
    recent_trade_row,
    trade_row,
)

Key = tuple[str, str | int]
"""A view: ``(topic, address)`` for the address topics, ``(topic, market_id)`` for the market
topics."""
LiveRow = tuple[Key, int, Row]
"""A live topic's push: its stream, the seq of its event and its one row."""

_T = TypeVar("_T")
_SNAPSHOT_VERSION: Final = 3
_EMPTY: Final = {topic: encode_message(topic, [], 0) for topic in ALL_TOPICS}


class _Level(msgspec.Struct, gc=False):
    """An aggregated price level: total remaining lots and the row shown for it."""

    size: int
    row: OrderBookRow


class _Funding(msgspec.Struct, array_like=True, gc=False):
    """A market's funding inputs and the row shown for them."""

    mark: int | None
    index: int | None
    due: int
    """When the next settlement is due (unix ms), as the engine keeps it: from the market's
    first mark or index price, the next interval boundary after it; after a settlement, the
    time it announced. It may be past while a price is missing (nothing settles then)."""
    row: FundingRateRow


class _Snapshot(msgspec.Struct, array_like=True):
    """The persisted read models: every list oldest (or lowest price) first."""

    version: int
    seq: int
    history_limit: int
    positions: dict[str, list[PositionRow]]
    open_orders: dict[str, list[OpenOrderRow]]
    order_history: dict[str, list[OrderHistoryRow]]
    trade_history: dict[str, list[TradeRow]]
    asks: dict[int, list[OrderBookRow]]
    bids: dict[int, list[OrderBookRow]]
    changed_at: list[tuple[str, str | int, int]]
    recent_trades: dict[int, list[RecentTradeRow]]
    best_price: dict[int, BestPriceRow]
    deposits: dict[str, list[DepositWithdrawRow]]
    funding: dict[int, _Funding]
    funding_history: dict[str, list[FundingHistoryRow]]
    live_orders: dict[str, OrderHistoryRow]


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(_Snapshot)


class Projections:
    """The topics' views, folded from the event log from ``seq`` 1 on."""

    def __init__(self, markets: Mapping[int, MarketSpec], history_limit: int = 100) -> None:
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, got {history_limit}")
        self.markets: dict[int, MarketSpec] = dict(markets)
        self.history_limit = history_limit
        self.seq = 0
        """The seq of the last applied event."""
        # address -> (market_id, is_long) -> row; only positions with a size are kept.
        self._positions: dict[str, dict[tuple[int, bool], PositionRow]] = {}
        # address -> order_id -> row, in the order the orders came to rest (oldest first).
        self._open: dict[str, dict[int, OpenOrderRow]] = {}
        # address -> order_id -> row, oldest change first; at most history_limit rows.
        self._orders: dict[str, dict[int, OrderHistoryRow]] = {}
        # address -> the order row of its newest live_order_history push.
        self._live_orders: dict[str, OrderHistoryRow] = {}
        # address -> fill rows, oldest first; at most history_limit rows.
        self._trades: dict[str, deque[TradeRow]] = {}
        # market_id -> price -> level; SortedDict so that a view is a walk, not a sort.
        self._asks: dict[int, Any] = {m: SortedDict() for m in self.markets}
        self._bids: dict[int, Any] = {m: SortedDict() for m in self.markets}
        # market_id -> public fill rows, oldest first; at most history_limit rows.
        self._recent: dict[int, deque[RecentTradeRow]] = {
            m: deque(maxlen=history_limit) for m in self.markets
        }
        # market_id -> best bid and ask row; from the market's first book change on.
        self._best: dict[int, BestPriceRow] = {}
        # market_id -> ((bid price, size) | None, (ask price, size) | None) the row shows.
        self._top: dict[int, tuple[tuple[int, int] | None, tuple[int, int] | None]] = {}
        # address -> deposit and withdrawal rows, oldest first; at most history_limit rows.
        self._deposits: dict[str, deque[DepositWithdrawRow]] = {}
        # market_id -> funding inputs and row; from the market's first price or settlement on.
        self._funding: dict[int, _Funding] = {}
        # address -> funding payment rows, oldest first; at most history_limit rows.
        self._funding_history: dict[str, deque[FundingHistoryRow]] = {}
        # order_id -> address, for every order in an order_history window (ids are global).
        self._order_owner: dict[int, str] = {}
        self.live: list[LiveRow] = []
        """The live topics' pushes of the batch last applied, in event order."""
        self._pending_live: list[tuple[Key, Row]] = []
        self._messages: dict[Key, bytes] = {}
        # (topic, key) -> seq of the batch that last changed the view: the "seq" of its pushes.
        self._changed_at: dict[Key, int] = {}
        self._appliers: dict[type[Event], Callable[[Any, set[Key]], None]] = {
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
        self.apply_batch((event,))

    def apply_batch(self, events: Iterable[AnyEvent]) -> set[Key]:
        """Fold events in order and return the views they changed (live topics aside: their
        pushes are in :attr:`live` afterwards).

        The sequence numbers are checked for the whole batch first, so a gap raises
        :class:`~perps_indexer.errors.SequenceGap` before anything is applied.
        """
        batch = list(events)
        for offset, event in enumerate(batch, self.seq + 1):
            if event.seq != offset:
                raise errors.SequenceGap(offset, event.seq)
        changed: set[Key] = set()
        changed_at = self._changed_at
        appliers = self._appliers
        pending = self._pending_live
        live: list[LiveRow] = []
        self.live = live
        messages = self._messages
        for event in batch:
            touched: set[Key] = set()
            appliers[type(event)](event, touched)
            # The view's seq is its last changing event's, whatever the batching.
            for key in touched:
                changed_at[key] = event.seq
            changed |= touched
            if pending:
                for stream, row in pending:
                    changed_at[stream] = event.seq
                    messages.pop(stream, None)
                    live.append((stream, event.seq, row))
                pending.clear()
            self.seq = event.seq
        for key in changed:
            messages.pop(key, None)
        return changed

    def live_messages(self, wanted: Callable[[Key], bool]) -> list[tuple[Key, bytes]]:
        """The encoded pushes of :attr:`live` whose stream is ``wanted`` (e.g. has watchers),
        in order: one message per row, each with its event's seq."""
        return [
            (stream, encode_message(stream[0], [row], seq))
            for stream, seq, row in self.live
            if wanted(stream)
        ]

    def _placed(self, ev: OrderPlaced, changed: set[Key]) -> None:
        self._set_history(ev.order, changed)

    def _rested(self, ev: OrderRested, changed: set[Key]) -> None:
        order = ev.order
        self._set_history(order, changed)
        self._open.setdefault(order.address, {})[order.order_id] = open_order_row(order)
        changed.add((OPEN_ORDERS, order.address))
        self._move_level(order, order.remaining, ev.ts, changed)

    def _cancelled(self, ev: OrderCancelled, changed: set[Key]) -> None:
        order = ev.order
        self._set_history(order, changed)
        if self._drop_open(order):
            changed.add((OPEN_ORDERS, order.address))
            self._move_level(order, -order.remaining, ev.ts, changed)

    def _fill(self, ev: Fill, changed: set[Key]) -> None:
        for side in (ev.maker, ev.taker):
            order = side.order
            address = order.address
            self._set_history(order, changed)
            trades = self._trades.get(address)
            if trades is None:
                trades = self._trades[address] = deque(maxlen=self.history_limit)
            row = trade_row(side, ev)
            trades.append(row)
            changed.add((TRADE_HISTORY, address))
            self._pending_live.append(((LIVE_TRADE_HISTORY, address), row))
            if side.is_maker:
                resting = self._open.get(address)
                if resting is None or order.order_id not in resting:
                    raise errors.IntegrityError(
                        f"fill seq {ev.seq}: maker order {order.order_id} is not resting"
                    )
                if order.remaining:
                    resting[order.order_id] = open_order_row(order)  # keeps its place
                else:
                    self._drop_open(order)
                changed.add((OPEN_ORDERS, address))
                self._move_level(order, -ev.size, ev.ts, changed)
            self._set_position(side.position, changed)
        self._recent[ev.market_id].append(recent_trade_row(ev))
        changed.add((RECENT_TRADES, ev.market_id))

    def _deposit(self, ev: Deposited | Withdrew, changed: set[Key]) -> None:
        rows = self._deposits.get(ev.address)
        if rows is None:
            rows = self._deposits[ev.address] = deque(maxlen=self.history_limit)
        rows.append(deposit_withdraw_row(ev))
        changed.add((DEPOSIT_WITHDRAW_HISTORY, ev.address))

    def _mark(self, ev: MarkPriceSet, changed: set[Key]) -> None:
        state = self._funding.get(ev.market_id)
        if state is None:
            due = self._first_due(ev.market_id, ev.ts)
            self._set_funding(ev.market_id, ev.ts, ev.price, None, due, None, changed)
        else:
            self._set_funding(ev.market_id, ev.ts, ev.price, state.index, state.due, None, changed)

    def _index(self, ev: IndexPriceSet, changed: set[Key]) -> None:
        state = self._funding.get(ev.market_id)
        if state is None:
            due = self._first_due(ev.market_id, ev.ts)
            self._set_funding(ev.market_id, ev.ts, None, ev.price, due, None, changed)
        else:
            self._set_funding(ev.market_id, ev.ts, state.mark, ev.price, state.due, None, changed)

    def _first_due(self, market_id: int, ts: int) -> int:
        """A market's first funding: the first interval boundary after its first price."""
        interval = self.markets[market_id].funding_interval_s * 1000
        return (ts // interval + 1) * interval

    def _funding_settled(self, ev: FundingSettled, changed: set[Key]) -> None:
        for payment in ev.payments:
            self._set_position(payment.position, changed)
            address = payment.position.address
            rows = self._funding_history.get(address)
            if rows is None:
                rows = self._funding_history[address] = deque(maxlen=self.history_limit)
            rows.append(funding_history_row(payment, ev))
        rate = Fraction(ev.rate_num, ev.rate_den)
        self._set_funding(ev.market_id, ev.ts, ev.mark, ev.index, ev.next_funding, rate, changed)

    def _set_funding(
        self,
        market_id: int,
        ts: int,
        mark: int | None,
        index: int | None,
        due: int,
        rate: Fraction | None,
        changed: set[Key],
    ) -> None:
        """Set a market's funding inputs; the view changes when a field other than
        last_updated does. ``rate`` None: the premium of ``mark`` over ``index``, clamped."""
        spec = self.markets[market_id]
        if rate is None:
            rate = Fraction(0)
            if mark is not None and index:
                cap = Fraction(spec.funding_cap_bps, BPS)
                rate = max(-cap, min(cap, Fraction(mark - index, index)))
        row = funding_rate_row(
            market_id, format_rate(rate.numerator, rate.denominator), mark, index, due, ts
        )
        old = self._funding.get(market_id)
        if old is not None and _same_but_time(old.row, row):
            row = old.row
        else:
            changed.add((LIVE_FUNDING_RATE, market_id))
        self._funding[market_id] = _Funding(mark, index, due, row)

    def _position_updated(self, ev: PositionUpdated, changed: set[Key]) -> None:
        self._set_position(ev.position, changed)

    def _released(self, ev: PositionReleased, changed: set[Key]) -> None:
        slots = self._positions.get(ev.address)
        if slots is not None and slots.pop((ev.market_id, ev.is_long), None) is not None:
            changed.add((POSITIONS, ev.address))
            if not slots:
                del self._positions[ev.address]

    def _set_position(self, pos: PositionState, changed: set[Key]) -> None:
        slot = (pos.market_id, pos.is_long)
        slots = self._positions.get(pos.address)
        if pos.size:
            row = position_row(pos, self.markets[pos.market_id])
            if slots is None:
                slots = self._positions[pos.address] = {}
            elif slots.get(slot) == row:
                return
            slots[slot] = row
        elif slots is None or slots.pop(slot, None) is None:
            return
        elif not slots:
            del self._positions[pos.address]
        changed.add((POSITIONS, pos.address))

    def _set_history(self, order: OrderState, changed: set[Key]) -> None:
        row = order_history_row(order)
        rows = self._orders.get(order.address)
        if rows is None:
            rows = self._orders[order.address] = {}
        else:
            old = rows.get(order.order_id)
            if old == row:
                # Same row, but the order was touched last: it moves to the front, as the
                # store-backed reads (deep history, since-resume) order by the last event.
                if next(reversed(rows)) != order.order_id:
                    del rows[order.order_id]
                    rows[order.order_id] = row
                    changed.add((ORDER_HISTORY, order.address))
                return
            if old is not None:
                del rows[order.order_id]  # re-inserted below at the newest end
        rows[order.order_id] = row
        self._order_owner[order.order_id] = order.address
        if len(rows) > self.history_limit:
            oldest = next(iter(rows))
            del rows[oldest]
            del self._order_owner[oldest]
        changed.add((ORDER_HISTORY, order.address))
        self._live_orders[order.address] = row
        self._pending_live.append(((LIVE_ORDER_HISTORY, order.address), row))

    def _drop_open(self, order: OrderState) -> bool:
        """Remove a resting order's row; False when it was not resting."""
        rows = self._open.get(order.address)
        if rows is None or rows.pop(order.order_id, None) is None:
            return False
        if not rows:
            del self._open[order.address]
        return True

    def _move_level(self, order: OrderState, delta: int, ts: int, changed: set[Key]) -> None:
        market_id = order.market_id
        side = self._asks[market_id] if order.is_ask else self._bids[market_id]
        level: _Level | None = side.get(order.price)
        size = (0 if level is None else level.size) + delta
        if size < 0:
            raise errors.IntegrityError(
                f"market {market_id} level {order.price} would hold {size} lots after "
                f"order {order.order_id} changed"
            )
        if size:
            side[order.price] = _Level(
                size, orderbook_row(market_id, order.is_ask, order.price, size, ts)
            )
        else:
            del side[order.price]
        changed.add((ORDERBOOK, market_id))
        self._set_best(market_id, order.is_ask, order.price, ts, changed)

    def _set_best(
        self, market_id: int, is_ask: bool, price: int, ts: int, changed: set[Key]
    ) -> None:
        """After the level at ``price`` changed: the best price row, if the change reached it."""
        top = self._top.get(market_id)
        bid, ask = (None, None) if top is None else top
        if is_ask:
            if ask is not None and price > ask[0]:
                return  # behind the best ask
            asks = self._asks[market_id]
            best, level = asks.peekitem(0) if asks else (0, None)
            ask = None if level is None else (best, level.size)
        else:
            if bid is not None and price < bid[0]:
                return  # behind the best bid
            bids = self._bids[market_id]
            best, level = bids.peekitem(-1) if bids else (0, None)
            bid = None if level is None else (best, level.size)
        if top != (bid, ask):
            self._top[market_id] = (bid, ask)
            self._best[market_id] = best_price_row(market_id, bid, ask, ts)
            changed.add((BEST_PRICE, market_id))

    # ------------------------------------------------------------------ views

    def positions(self, address: str) -> list[PositionRow]:
        """Open positions of ``address``: by market, the long before the short."""
        slots = self._positions.get(address)
        if not slots:
            return []
        return [slots[k] for k in sorted(slots, key=lambda k: (k[0], not k[1]))]

    def open_orders(self, address: str) -> list[OpenOrderRow]:
        """Resting orders of ``address``, oldest first."""
        return list(self._open.get(address, {}).values())

    def order_history(self, address: str, limit: int | None = None) -> list[OrderHistoryRow]:
        """Orders of ``address`` in any status, the most recently changed first."""
        return _newest(self._orders.get(address, {}).values(), limit)

    def trade_history(self, address: str, limit: int | None = None) -> list[TradeRow]:
        """Fills of ``address``, newest first."""
        return _newest(self._trades.get(address, ()), limit)

    def orderbook(self, market_id: int) -> list[OrderBookRow]:
        """Aggregated levels of a market: asks by ascending price, then bids descending."""
        asks = self._asks.get(market_id)
        if asks is None:
            return []
        rows = [level.row for level in asks.values()]
        rows.extend(level.row for level in reversed(self._bids[market_id].values()))
        return rows

    def recent_trades(self, market_id: int, limit: int | None = None) -> list[RecentTradeRow]:
        """Public fills of a market, newest first."""
        return _newest(self._recent.get(market_id, ()), limit)

    def best_price(self, market_id: int) -> list[BestPriceRow]:
        """The market's best bid and ask as one row; none before its first book change."""
        row = self._best.get(market_id)
        return [] if row is None else [row]

    def live_funding_rate(self, market_id: int) -> list[FundingRateRow]:
        """The market's funding row; none before its first price or settlement."""
        state = self._funding.get(market_id)
        return [] if state is None else [state.row]

    def live_trade_history(self, address: str) -> list[TradeRow]:
        """The address's newest fill row (what a new live_trade_history subscriber gets)."""
        return self.trade_history(address, 1)

    def live_order_history(self, address: str) -> list[OrderHistoryRow]:
        """The address's order whose row changed last (a new live_order_history subscriber's
        first message: the newest live push)."""
        row = self._live_orders.get(address)
        return [] if row is None else [row]

    def deposit_withdraw_history(
        self, address: str, limit: int | None = None
    ) -> list[DepositWithdrawRow]:
        """Deposits and withdrawals of ``address``, newest first."""
        return _newest(self._deposits.get(address, ()), limit)

    def funding_history(self, address: str, limit: int | None = None) -> list[FundingHistoryRow]:
        """Funding payments of ``address``'s positions, newest first."""
        return _newest(self._funding_history.get(address, ()), limit)

    def order_status(self, market_id: int, order_id: int) -> OrderHistoryRow | None:
        """An order's history row if it is in its address's window (else ask the store)."""
        address = self._order_owner.get(order_id)
        if address is None:
            return None
        row = self._orders[address][order_id]
        return row if row.market_id == str(market_id) else None

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

    def message(self, topic: str, key: str | int) -> bytes:
        """The encoded push of a view's current state, encoded once per change.

        It carries ``"seq"``: the sequence number of the last event that changed the view, so
        a subscriber's messages of one stream carry increasing seqs.
        """
        cache_key = (topic, key)
        data = self._messages.get(cache_key)
        if data is None:
            seq = self._changed_at.get(cache_key)
            if seq is None:
                # Not cached: subscribers to unknown addresses must not grow the cache.
                return _EMPTY[topic]
            rows = self.view(topic, key)
            data = self._messages[cache_key] = encode_message(topic, rows, seq)
        return data

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> bytes:
        """The read models as msgpack, for :meth:`restore`."""
        snap = _Snapshot(
            version=_SNAPSHOT_VERSION,
            seq=self.seq,
            history_limit=self.history_limit,
            positions={a: list(s.values()) for a, s in self._positions.items()},
            open_orders={a: list(rows.values()) for a, rows in self._open.items()},
            order_history={a: list(rows.values()) for a, rows in self._orders.items()},
            trade_history={a: list(rows) for a, rows in self._trades.items()},
            asks={m: [lv.row for lv in side.values()] for m, side in self._asks.items()},
            bids={m: [lv.row for lv in side.values()] for m, side in self._bids.items()},
            changed_at=[(t, k, seq) for (t, k), seq in self._changed_at.items()],
            recent_trades={m: list(rows) for m, rows in self._recent.items()},
            best_price=dict(self._best),
            deposits={a: list(rows) for a, rows in self._deposits.items()},
            funding=dict(self._funding),
            funding_history={a: list(rows) for a, rows in self._funding_history.items()},
            live_orders=dict(self._live_orders),
        )
        return _snapshot_encoder.encode(snap)

    @classmethod
    def restore(cls, markets: Mapping[int, MarketSpec], data: bytes) -> Projections:
        """Rebuild projections from :meth:`snapshot` bytes; corrupt data raises IntegrityError."""
        try:
            snap = _snapshot_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise errors.IntegrityError(f"projection snapshot is unreadable: {exc}") from None
        if snap.version != _SNAPSHOT_VERSION:
            raise errors.IntegrityError(
                f"projection snapshot version {snap.version} is not {_SNAPSHOT_VERSION}"
            )
        self = cls(markets, snap.history_limit)
        self.seq = snap.seq
        self._changed_at = {(topic, key): seq for topic, key, seq in snap.changed_at}
        for address, positions in snap.positions.items():
            self._positions[address] = {(int(r.market_id), r.is_long): r for r in positions}
        for address, opens in snap.open_orders.items():
            self._open[address] = {int(r.order_id): r for r in opens}
        self._live_orders = dict(snap.live_orders)
        for address, orders in snap.order_history.items():
            self._orders[address] = {int(r.order_id): r for r in orders}
            self._order_owner.update(dict.fromkeys(self._orders[address], address))
        for address, trades in snap.trade_history.items():
            self._trades[address] = deque(trades, maxlen=snap.history_limit)
        for books, levels in ((self._asks, snap.asks), (self._bids, snap.bids)):
            for market_id, rows in levels.items():
                if market_id not in books:
                    raise errors.IntegrityError(
                        f"projection snapshot has unknown market {market_id}"
                    )
                books[market_id].update((int(r.price), _Level(int(r.size), r)) for r in rows)
        per_market: tuple[dict[int, Any], ...] = (snap.recent_trades, snap.best_price, snap.funding)
        for views in per_market:
            unknown = set(views) - set(self.markets)
            if unknown:
                raise errors.IntegrityError(
                    f"projection snapshot has unknown market {min(unknown)}"
                )
        for market_id, recent in snap.recent_trades.items():
            self._recent[market_id].extend(recent)
        self._best = dict(snap.best_price)
        for market_id, row in self._best.items():
            bid = (
                None
                if row.best_bid_price is None
                else (int(row.best_bid_price), int(row.best_bid_size or 0))
            )
            ask = (
                None
                if row.best_ask_price is None
                else (int(row.best_ask_price), int(row.best_ask_size or 0))
            )
            self._top[market_id] = (bid, ask)
        self._funding = dict(snap.funding)
        for address, moves in snap.deposits.items():
            self._deposits[address] = deque(moves, maxlen=snap.history_limit)
        for address, payments in snap.funding_history.items():
            self._funding_history[address] = deque(payments, maxlen=snap.history_limit)
        return self


def _unchanged(event: Event, changed: set[Key]) -> None:
    """Events that change no view (liquidation payouts)."""


def _same_but_time(old: FundingRateRow, new: FundingRateRow) -> bool:
    """True when two rows differ at most in ``last_updated``."""
    return msgspec.structs.replace(new, last_updated=old.last_updated) == old


def _newest(rows: Reversible[_T], limit: int | None) -> list[_T]:
    newest = reversed(rows)
    return list(newest) if limit is None else list(islice(newest, limit))


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
