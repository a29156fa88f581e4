"""Read models: the event log folded into the five WebSocket topics' current views.

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
  open_orders row (remaining size, or gone when filled) and its level shrinks by the fill size.
* ``PositionUpdated`` — positions (take-profit, stop-loss, added margin).
* ``PositionReleased`` — positions (the slot is gone).
* ``Deposited``, ``Withdrew``, ``MarkPriceSet``, ``LiquidationSettled`` — none.

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
from perps_indexer.wire import (
    OPEN_ORDERS,
    ORDER_HISTORY,
    ORDERBOOK,
    POSITIONS,
    TRADE_HISTORY,
    OpenOrderRow,
    OrderBookRow,
    OrderHistoryRow,
    PositionRow,
    Row,
    TradeRow,
    encode_message,
    open_order_row,
    order_history_row,
    orderbook_row,
    position_row,
    trade_row,
)

Key = tuple[str, str | int]
"""A view: ``(topic, address)`` for the address topics, ``(ORDERBOOK, market_id)``."""

_T = TypeVar("_T")
_SNAPSHOT_VERSION: Final = 1
_EMPTY: Final = {
    topic: encode_message(topic, [], 0)
    for topic in (POSITIONS, TRADE_HISTORY, OPEN_ORDERS, ORDER_HISTORY, ORDERBOOK)
}


class _Level(msgspec.Struct, gc=False):
    """An aggregated price level: total remaining lots and the row shown for it."""

    size: int
    row: OrderBookRow


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


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(_Snapshot)


class Projections:
    """The five topics' views, folded from the event log from ``seq`` 1 on."""

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
        # address -> fill rows, oldest first; at most history_limit rows.
        self._trades: dict[str, deque[TradeRow]] = {}
        # market_id -> price -> level; SortedDict so that a view is a walk, not a sort.
        self._asks: dict[int, Any] = {m: SortedDict() for m in self.markets}
        self._bids: dict[int, Any] = {m: SortedDict() for m in self.markets}
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
            Deposited: _unchanged,
            Withdrew: _unchanged,
            MarkPriceSet: _unchanged,
            LiquidationSettled: _unchanged,
        }

    # ------------------------------------------------------------------ folding

    def apply(self, event: AnyEvent) -> None:
        """Fold one event; its ``seq`` must be the next one."""
        self.apply_batch((event,))

    def apply_batch(self, events: Iterable[AnyEvent]) -> set[Key]:
        """Fold events in order and return the views they changed.

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
        for event in batch:
            touched: set[Key] = set()
            appliers[type(event)](event, touched)
            # The view's seq is its last changing event's, whatever the batching.
            for key in touched:
                changed_at[key] = event.seq
            changed |= touched
            self.seq = event.seq
        for key in changed:
            self._messages.pop(key, None)
        return changed

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
            trades.append(trade_row(side, ev))
            changed.add((TRADE_HISTORY, address))
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
                return
            if old is not None:
                del rows[order.order_id]  # re-inserted below at the newest end
        rows[order.order_id] = row
        if len(rows) > self.history_limit:
            del rows[next(iter(rows))]
        changed.add((ORDER_HISTORY, order.address))

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

    def view(self, topic: str, key: str | int) -> Sequence[Row]:
        """The rows of one view (``key`` an address or a market id, as the topic wants)."""
        if topic == ORDERBOOK:
            return self.orderbook(key) if isinstance(key, int) else []
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
        for address, orders in snap.order_history.items():
            self._orders[address] = {int(r.order_id): r for r in orders}
        for address, trades in snap.trade_history.items():
            self._trades[address] = deque(trades, maxlen=snap.history_limit)
        for books, levels in ((self._asks, snap.asks), (self._bids, snap.bids)):
            for market_id, rows in levels.items():
                if market_id not in books:
                    raise errors.IntegrityError(
                        f"projection snapshot has unknown market {market_id}"
                    )
                books[market_id].update((int(r.price), _Level(int(r.size), r)) for r in rows)
        return self


def _unchanged(event: Event, changed: set[Key]) -> None:
    """Events that change none of the five views (balances, marks, liquidation payouts)."""


def _newest(rows: Reversible[_T], limit: int | None) -> list[_T]:
    newest = reversed(rows)
    return list(newest) if limit is None else list(islice(newest, limit))


_ADDRESS_VIEWS: Final[dict[str, Callable[[Projections, str], Sequence[Row]]]] = {
    POSITIONS: Projections.positions,
    OPEN_ORDERS: Projections.open_orders,
    ORDER_HISTORY: Projections.order_history,
    TRADE_HISTORY: Projections.trade_history,
}
