"""The exchange engine: a pure, deterministic perpetual-futures venue.

Every command is decided against the current state through an overlay (:class:`_Tx`) that
records what would change; nothing is touched until the decision is complete. A rejected
command therefore changes nothing. An accepted one is committed by applying its events, the same
:meth:`Engine.apply` that replays a log, so replaying the log from empty gives the same state.

Rules (see ``docs/engine.md`` for the full list):

* Hedge mode: one long and one short slot per address and market; an increase must use the
  slot's leverage, and the slot keeps it while it holds a size or resting open orders.
* Margin: a taker open pays ``ceil(value / leverage)`` and the taker fee from free collateral; a
  resting open order reserves ``ceil(price * size / leverage)`` plus its maker fee, released to the
  position lot by lot as it fills.
* A close never flips or exceeds a position: resting close orders are counted against its size.
  A voluntary close may realise a loss up to the released margin plus the trader's free
  collateral; a taker close beyond that is rejected, a resting one is cancelled instead of filled.
* Self-trade: a taker meeting its own resting order cancels that resting order and goes on.
* Market orders fill completely or are rejected.
* A mark price at or through a position's liquidation price liquidates it through the book, the
  fills bounded so that the loss never exceeds margin plus the insurance fund; what remains is
  split 20 % insurance fund, 30 % liquidator, 50 % trader. Then take-profit and stop-loss
  triggers close positions at market, bounded by the trader's margin and free collateral.
* Funding: once per interval the mark's premium over the index, clamped to the market's cap,
  moves margin from the paying side's positions to the other side's, pro rata by size; the
  rounding remainder goes to the dust account. Then liquidations run as after a mark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any, Final

import msgspec

from perps_indexer import errors
from perps_indexer.engine.book import Book
from perps_indexer.events import (
    CANCELLED,
    FILL_OR_ABORT,
    FILLED,
    IMMEDIATE_OR_CANCEL,
    NO_RESTRICTION,
    OPEN,
    PARTIALLY_FILLED,
    POST_OR_ABORT,
    AnyEvent,
    Deposited,
    Event,
    Fill,
    FillSide,
    FundingPayment,
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
from perps_indexer.units import (
    BPS,
    MAX_PRICE,
    ceil_div,
    fee_for,
    liquidation_price,
    normalize_address,
    order_id,
    position_trade_id,
)

SlotKey = tuple[str, int, bool]
_replace = msgspec.structs.replace

# order_type = 2 * kind - 1 for the long side, 2 * kind for the short side (reference §4).
KIND_OPEN: Final = 1
KIND_INCREASE: Final = 2
KIND_DECREASE: Final = 3
KIND_CLOSE: Final = 4
KIND_STOP_LOSS: Final = 5
KIND_TAKE_PROFIT: Final = 6
KIND_LIQUIDATION: Final = 7

_ADDRESS_CACHE_SIZE: Final = 1 << 16

LIQUIDATION_SHARES: Final = (20, 30, 50)
"""Percent of a liquidation's remaining collateral to insurance fund, liquidator, trader."""


def order_type_code(kind: int, is_long: bool) -> int:
    return 2 * kind - 1 if is_long else 2 * kind


def next_funding_time(spec: MarketSpec, ts: int) -> int:
    """The first multiple of the market's funding interval strictly after ``ts`` (unix ms)."""
    interval = spec.funding_interval_s * 1000
    return (ts // interval + 1) * interval


def funding_rate(spec: MarketSpec, mark: int, index: int) -> Fraction:
    """The funding rate per interval, exact: ``(mark - index) / index`` clamped to
    ``+/- funding_cap_bps / 10000``. Positive: longs pay shorts."""
    cap = Fraction(spec.funding_cap_bps, BPS)
    return max(-cap, min(cap, Fraction(mark - index, index)))


class FillInfo(msgspec.Struct, frozen=True):
    """One fill as seen by the order that placed it."""

    price: int
    size: int
    fee: int
    pnl: int
    is_maker: bool


class OrderResult(msgspec.Struct, frozen=True):
    """What an order command did: the order's final state, its fills and every event."""

    order: OrderState
    fills: list[FillInfo]
    events: list[AnyEvent]

    @property
    def order_id(self) -> int:
        return self.order.order_id

    @property
    def status(self) -> str:
        return self.order.status


class Ledger(msgspec.Struct, frozen=True):
    """Where every unit of money is, for the conservation check."""

    free: int
    order_reserved: int
    position_margin: int
    unrealised: int
    fee_account: int
    insurance_fund: int
    liquidator: int
    dust: int
    deposits: int
    withdrawals: int

    @property
    def total(self) -> int:
        return (
            self.free
            + self.order_reserved
            + self.position_margin
            + self.unrealised
            + self.fee_account
            + self.insurance_fund
            + self.liquidator
            + self.dust
        )


class _Tx:
    """An overlay over the engine state: reads fall through, writes stay here until commit."""

    __slots__ = (
        "collateral",
        "engine",
        "events",
        "fee_account",
        "insurance",
        "orders",
        "positions",
        "seq",
        "ts",
    )

    def __init__(self, engine: Engine, ts: int) -> None:
        self.engine = engine
        self.ts = ts
        self.seq = engine.seq
        self.events: list[AnyEvent] = []
        self.collateral: dict[str, int] = {}
        self.positions: dict[SlotKey, PositionState | None] = {}
        self.orders: dict[int, OrderState] = {}
        self.fee_account = engine.fee_account
        self.insurance = engine.insurance_fund

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def get_collateral(self, address: str) -> int:
        value = self.collateral.get(address)
        return self.engine.collateral.get(address, 0) if value is None else value

    def get_position(self, key: SlotKey) -> PositionState | None:
        if key in self.positions:
            return self.positions[key]
        return self.engine.positions.get(key)

    def get_order(self, oid: int) -> OrderState:
        order = self.orders.get(oid)
        return self.engine.orders[oid] if order is None else order


class Engine:
    """The venue: markets, accounts, books, positions and the event sequence."""

    def __init__(self, markets: Mapping[int, MarketSpec]) -> None:
        self.markets: dict[int, MarketSpec] = dict(markets)
        self.books: dict[int, Book] = {m: Book(m) for m in self.markets}
        self.collateral: dict[str, int] = {}
        self.orders: dict[int, OrderState] = {}
        """Resting orders by id."""
        self.positions: dict[SlotKey, PositionState] = {}
        self.slots_by_market: dict[int, dict[SlotKey, None]] = {m: {} for m in self.markets}
        self.marks: dict[int, int] = {}
        self.index_prices: dict[int, int] = {}
        """The oracle (index) price per market; funding follows the mark's premium over it."""
        self.funding_due: dict[int, int] = {}
        """When each market's next funding settlement is due (unix ms): from the market's first
        mark or index price on, the next interval boundary; after a settlement, its
        ``next_funding``."""
        self.order_counter = 0
        """The last order counter used. One counter for the whole venue, not one per market:
        an order id then names a single order (per-market counters made ids of two markets
        equal whenever counter and price matched, and ``orders`` is keyed by id alone)."""
        self.position_counters: dict[int, int] = dict.fromkeys(self.markets, 0)
        self.fee_account = 0
        self.insurance_fund = 0
        self.liquidator = 0
        self.dust = 0
        self.deposits = 0
        self.withdrawals = 0
        self.seq = 0
        self.ts = 0
        self._liq_cache: dict[SlotKey, tuple[int, int, int, int, float]] = {}
        """Slot -> (value, size, added margin, leverage, liquidation price): every mark checks
        every slot of its market and every order the slots it touched, and mostly those four
        have not changed since the last look."""
        self._addresses: dict[str, str] = {}
        """Addresses as given -> normalised: a cache, as every command normalises one."""
        self._appliers: dict[type[Event], Callable[[Any], None]] = {
            Deposited: self._apply_deposit,
            Withdrew: self._apply_withdraw,
            MarkPriceSet: self._apply_mark,
            OrderPlaced: self._apply_placed,
            OrderRested: self._apply_rested,
            OrderCancelled: self._apply_cancelled,
            Fill: self._apply_fill,
            PositionUpdated: self._apply_position_updated,
            PositionReleased: self._apply_released,
            LiquidationSettled: self._apply_liquidation,
            IndexPriceSet: self._apply_index,
            FundingSettled: self._apply_funding,
        }

    # ------------------------------------------------------------------ folding

    @classmethod
    def replay(cls, markets: Mapping[int, MarketSpec], events: Iterable[AnyEvent]) -> Engine:
        """Rebuild an engine by folding an event log from empty."""
        engine = cls(markets)
        for event in events:
            engine.apply(event)
        return engine

    def apply(self, event: AnyEvent) -> None:
        """Fold one event into the state; ``event.seq`` must be the next sequence number."""
        if event.seq != self.seq + 1:
            raise errors.SequenceGap(self.seq + 1, event.seq)
        self._appliers[type(event)](event)
        self.seq = event.seq
        self.ts = event.ts

    def _set_collateral(self, address: str, value: int) -> None:
        self.collateral[address] = value

    def _apply_deposit(self, ev: Deposited) -> None:
        self.collateral[ev.address] = ev.collateral
        self.deposits += ev.amount

    def _apply_withdraw(self, ev: Withdrew) -> None:
        self.collateral[ev.address] = ev.collateral
        self.withdrawals += ev.amount

    def _apply_mark(self, ev: MarkPriceSet) -> None:
        self.marks[ev.market_id] = ev.price
        if ev.market_id not in self.funding_due:
            self._start_funding(ev.market_id, ev.ts)

    def _start_funding(self, market_id: int, ts: int) -> None:
        """The market's first price: its first funding is due at the next interval boundary."""
        self.funding_due[market_id] = next_funding_time(self.markets[market_id], ts)

    def _apply_index(self, ev: IndexPriceSet) -> None:
        self.index_prices[ev.market_id] = ev.price
        if ev.market_id not in self.funding_due:
            self._start_funding(ev.market_id, ev.ts)

    def _apply_funding(self, ev: FundingSettled) -> None:
        for payment in ev.payments:
            self._set_position(payment.position)
        self.dust = ev.dust
        self.funding_due[ev.market_id] = ev.next_funding

    def _set_position(self, pos: PositionState) -> None:
        key = (pos.address, pos.market_id, pos.is_long)
        positions = self.positions
        if key not in positions:
            self.slots_by_market[pos.market_id][key] = None
            counters = self.position_counters
            counters[pos.market_id] = max(counters[pos.market_id], pos.trade_id >> 64)
        positions[key] = pos

    def _apply_placed(self, ev: OrderPlaced) -> None:
        order = ev.order
        counter = order.order_id >> 64
        self.order_counter = max(self.order_counter, counter)
        self._set_position(ev.position)

    def _apply_rested(self, ev: OrderRested) -> None:
        order = ev.order
        self.orders[order.order_id] = order
        self.books[order.market_id].add(order.order_id, order.is_ask, order.price, order.remaining)
        self._set_position(ev.position)
        self.collateral[order.address] = ev.collateral

    def _apply_cancelled(self, ev: OrderCancelled) -> None:
        order = ev.order
        if self.orders.pop(order.order_id, None) is not None:
            self.books[order.market_id].set_remaining(order.order_id, order.is_ask, order.price, 0)
        self._set_position(ev.position)
        self.collateral[order.address] = ev.collateral

    def _apply_fill(self, ev: Fill) -> None:
        positions, collateral = self.positions, self.collateral
        for side in (ev.maker, ev.taker):
            order = side.order
            if side.is_maker:
                book = self.books[order.market_id]
                book.set_remaining(order.order_id, order.is_ask, order.price, order.remaining)
                if order.remaining:
                    self.orders[order.order_id] = order
                else:
                    del self.orders[order.order_id]
            pos = side.position
            key = (pos.address, pos.market_id, pos.is_long)
            if key in positions:  # the common case of _set_position, inline: twice per fill
                positions[key] = pos
            else:
                self._set_position(pos)
            collateral[order.address] = side.collateral
        self.fee_account = ev.fee_account

    def _apply_position_updated(self, ev: PositionUpdated) -> None:
        self._set_position(ev.position)
        self.collateral[ev.position.address] = ev.collateral

    def _apply_released(self, ev: PositionReleased) -> None:
        key = (ev.address, ev.market_id, ev.is_long)
        del self.positions[key]
        self._liq_cache.pop(key, None)
        del self.slots_by_market[ev.market_id][key]

    def _apply_liquidation(self, ev: LiquidationSettled) -> None:
        self.insurance_fund = ev.insurance_fund
        self.liquidator = ev.liquidator
        self.collateral[ev.address] = ev.collateral

    def _commit(self, tx: _Tx) -> list[AnyEvent]:
        for event in tx.events:
            self.apply(event)
        return tx.events

    # ------------------------------------------------------------------ validation helpers

    def _address(self, address: str) -> str:
        addr = self._addresses.get(address) if type(address) is str else None
        if addr is None:
            addr = normalize_address(address)
            if len(self._addresses) >= _ADDRESS_CACHE_SIZE:
                self._addresses.clear()
            self._addresses[address] = addr
        return addr

    def _market(self, market_id: object) -> MarketSpec:
        spec = self.markets.get(market_id) if isinstance(market_id, int) else None
        if spec is None:
            known = ", ".join(str(m) for m in self.markets)
            raise errors.UnknownMarket(f"unknown market {market_id!r}; markets are {known}")
        return spec

    @staticmethod
    def _positive_int(value: object, what: str, exc: type[errors.CommandRejected]) -> int:
        if type(value) is not int:
            raise exc(f"{what} must be an integer, got {value!r}")
        if value <= 0:
            raise exc(f"{what} must be positive, got {value}")
        return value

    def _price(self, spec: MarketSpec, price: object, what: str = "price") -> int:
        value = self._positive_int(price, what, errors.InvalidPrice)
        if value > MAX_PRICE:
            raise errors.InvalidPrice(f"{what} {value} is above the largest price {MAX_PRICE}")
        if value % spec.tick_size:
            raise errors.InvalidPrice(
                f"{what} {value} is not on the tick: market {spec.market_id} prices are "
                f"multiples of {spec.tick_size}"
            )
        return value

    def _leverage(self, spec: MarketSpec, leverage: object) -> int:
        if type(leverage) is not int or not 1 <= leverage <= spec.max_leverage:
            raise errors.InvalidLeverage(
                f"leverage must be an integer from 1 to {spec.max_leverage}, got {leverage!r}"
            )
        return leverage

    # ------------------------------------------------------------------ accounts

    def deposit(self, address: str, amount: int, *, ts: int) -> list[AnyEvent]:
        """Credit ``amount`` quote sub-units of collateral to ``address``."""
        addr = self._address(address)
        amount = self._positive_int(amount, "deposit amount", errors.InvalidAmount)
        tx = _Tx(self, ts)
        balance = tx.get_collateral(addr) + amount
        tx.events.append(
            Deposited(seq=tx.next_seq(), ts=ts, address=addr, amount=amount, collateral=balance)
        )
        return self._commit(tx)

    def withdraw(self, address: str, amount: int, *, ts: int) -> list[AnyEvent]:
        """Debit free collateral; margin locked in positions or orders cannot be withdrawn."""
        addr = self._address(address)
        amount = self._positive_int(amount, "withdrawal amount", errors.InvalidAmount)
        free = self.collateral.get(addr, 0)
        if amount > free:
            raise errors.InsufficientCollateral(
                f"cannot withdraw {amount}: only {free} of {addr}'s collateral is free"
            )
        tx = _Tx(self, ts)
        tx.events.append(
            Withdrew(
                seq=tx.next_seq(), ts=ts, address=addr, amount=amount, collateral=free - amount
            )
        )
        return self._commit(tx)

    # ------------------------------------------------------------------ orders

    def place_limit_order(
        self,
        address: str,
        market_id: int,
        *,
        is_long: bool,
        is_close: bool,
        size: int,
        price: int,
        leverage: int,
        restriction: int = NO_RESTRICTION,
        take_profit: int | None = None,
        stop_loss: int | None = None,
        ts: int,
    ) -> OrderResult:
        """Place a limit order; returns the order, its fills and the events, or raises."""
        spec = self._market(market_id)
        price = self._price(spec, price)
        if type(restriction) is not int or not 0 <= restriction <= POST_OR_ABORT:
            raise errors.InvalidRestriction(
                "restriction must be 0 (none), 1 (fill-or-abort), 2 (immediate-or-cancel) or "
                f"3 (post-or-abort), got {restriction!r}"
            )
        return self._place(
            address,
            spec,
            is_long,
            is_close,
            size,
            price,
            leverage,
            restriction,
            False,
            take_profit,
            stop_loss,
            ts,
        )

    def place_market_order(
        self,
        address: str,
        market_id: int,
        *,
        is_long: bool,
        is_close: bool,
        size: int,
        leverage: int,
        take_profit: int | None = None,
        stop_loss: int | None = None,
        ts: int,
    ) -> OrderResult:
        """Place a market order: it fills completely against the book or is rejected."""
        spec = self._market(market_id)
        return self._place(
            address,
            spec,
            is_long,
            is_close,
            size,
            None,
            leverage,
            FILL_OR_ABORT,
            True,
            take_profit,
            stop_loss,
            ts,
        )

    def _place(
        self,
        address: str,
        spec: MarketSpec,
        is_long: bool,
        is_close: bool,
        size: int,
        price: int | None,
        leverage: int,
        restriction: int,
        is_market: bool,
        tp: int | None,
        sl: int | None,
        ts: int,
    ) -> OrderResult:
        addr = self._addresses.get(address) if type(address) is str else None
        if addr is None:
            addr = self._address(address)
        if type(is_long) is not bool or type(is_close) is not bool:
            raise errors.CommandRejected("tradeSide and direction must be true or false")
        if type(size) is not int or size <= 0:
            self._positive_int(size, "size", errors.InvalidSize)
        if type(leverage) is not int or not 1 <= leverage <= spec.max_leverage:
            self._leverage(spec, leverage)
        market_id = spec.market_id
        key = (addr, market_id, is_long)
        slot = self.positions.get(key)
        is_ask = is_long == is_close
        book = self.books[market_id]
        if size > spec.max_lots:
            raise errors.InvalidSize(
                f"size {size} is above the market's maximum of {spec.max_lots} lots"
            )
        if is_close:
            if tp is not None or sl is not None:
                raise errors.InvalidTrigger(
                    "take-profit and stop-loss go with opening orders; "
                    "a close order cannot set them"
                )
            if slot is None or slot.size == 0:
                side = "long" if is_long else "short"
                raise errors.NoPosition(
                    f"{addr} has no {side} position in market {market_id} to close"
                )
            closable = slot.size - slot.pending_close
            if size > closable:
                raise errors.CloseTooLarge(
                    f"cannot close {size} lots: the position holds {slot.size} and "
                    f"{slot.pending_close} are already in resting close orders, so at most "
                    f"{closable} can be closed"
                )
            if size < spec.min_lots and size != closable:
                raise errors.InvalidSize(
                    f"size {size} is below the market's minimum of {spec.min_lots} lots "
                    f"(a smaller close is allowed only for the whole remaining {closable})"
                )
            leverage = slot.leverage
            kind = KIND_CLOSE if size == slot.size else KIND_DECREASE
        else:
            if size < spec.min_lots:
                raise errors.InvalidSize(
                    f"size {size} is below the market's minimum of {spec.min_lots} lots"
                )
            if slot is not None and slot.leverage != leverage:
                raise errors.LeverageMismatch(
                    f"the {'long' if is_long else 'short'} position in market {market_id} uses "
                    f"leverage {slot.leverage}; an increase must use the same, got {leverage}"
                )
            if tp is not None or sl is not None:
                self._check_triggers(spec, is_long, price, tp, sl)
            kind = KIND_INCREASE if slot is not None and slot.size > 0 else KIND_OPEN
        if restriction == POST_OR_ABORT and price is not None and book.would_cross(is_ask, price):
            raise errors.WouldCross(
                f"post-or-abort order at {price} would cross the book (best "
                f"{'bid' if is_ask else 'ask'} {book.best_bid() if is_ask else book.best_ask()})"
            )

        tx = _Tx(self, ts)
        if slot is None:
            counter = self.position_counters[market_id] + 1
            slot = PositionState(
                address=addr,
                market_id=market_id,
                is_long=is_long,
                trade_id=position_trade_id(counter, market_id),
                leverage=leverage,
                size=0,
                value=0,
                margin=0,
                updated=ts,
            )
            tx.positions[key] = slot
        # Plan the matches first to learn whether the order rests (its id depends on it).
        matches, cancels, filled = self._match(tx, addr, spec, is_ask, price, size, None)
        remaining = size - filled
        if is_market and remaining:
            raise errors.InsufficientLiquidity(
                f"not enough liquidity: a market order for {size} lots found only {filled} "
                f"on the {'bid' if is_ask else 'ask'} side of market {market_id}"
            )
        if restriction == FILL_OR_ABORT and remaining:
            raise errors.FillOrAbortUnfilled(
                f"fill-or-abort order for {size} lots could fill only {filled} at once"
            )
        rests = remaining > 0 and restriction in (NO_RESTRICTION, POST_OR_ABORT)
        counter = self.order_counter + 1
        limit = price if price is not None else 0
        oid = order_id(counter, limit, is_ask, remaining > 0)
        order = OrderState(
            order_id=oid,
            market_id=market_id,
            address=addr,
            is_long=is_long,
            is_close=is_close,
            is_market=is_market,
            restriction=restriction,
            order_type=order_type_code(kind, is_long),
            price=limit,
            size=size,
            remaining=size,
            leverage=leverage,
            trade_id=slot.trade_id,
            status=OPEN,
            value=0 if is_market else limit * size,
            tp=tp,
            sl=sl,
            created=ts,
            updated=ts,
        )
        tx.orders[oid] = order
        tx.events.append(OrderPlaced(seq=tx.next_seq(), ts=ts, order=order, position=slot))
        fills = self._execute(tx, spec, oid, matches, cancels, close_pot=None)
        order = tx.orders[oid]
        free = tx.collateral.get(addr)
        shortfall = -(self.collateral.get(addr, 0) if free is None else free)
        if shortfall > 0 and is_close:
            raise errors.CloseLossTooLarge(
                f"the close would realise a loss {shortfall} larger than the position's margin "
                f"and {addr}'s free collateral can pay; add collateral or use a limit price"
            )
        if shortfall > 0:
            raise errors.InsufficientCollateral(
                f"insufficient collateral: the fills need {shortfall} more than {addr}'s "
                f"free collateral"
            )
        if order.remaining:
            if rests:
                self._rest(tx, spec, order)
            else:
                self._cancel(tx, order, "unfilled remainder of an immediate-or-cancel order")
        self._release_if_empty(tx, key)
        self._commit(tx)
        result_order = tx.orders[oid]
        # Positions this order touched may now sit at or beyond their liquidation price.
        events = tx.events
        if market_id in self.marks:
            touched = {key}
            for mid, _ in matches:
                maker = tx.orders[mid]  # every maker met was filled, so it is in the overlay
                touched.add((maker.address, market_id, maker.is_long))
            triggered = self._run_triggers(spec, ts, touched)
            if triggered:
                events = [*events, *triggered]
        return OrderResult(order=result_order, fills=fills, events=events)

    def _check_triggers(
        self, spec: MarketSpec, is_long: bool, ref: int | None, tp: int | None, sl: int | None
    ) -> None:
        ref = ref if ref is not None else self.marks.get(spec.market_id)
        for what, value, above in (("take-profit", tp, is_long), ("stop-loss", sl, not is_long)):
            if value is None:
                continue
            self._price(spec, value, what)
            if ref is not None and (value <= ref if above else value >= ref):
                rel = "above" if above else "below"
                raise errors.InvalidTrigger(
                    f"{what} {value} for a {'long' if is_long else 'short'} must be {rel} "
                    f"{ref}, or it would trigger at once"
                )

    def _match(
        self,
        tx: _Tx,
        addr: str,
        spec: MarketSpec,
        is_ask: bool,
        limit: int | None,
        size: int,
        fill_ok: Callable[[int, int], bool] | None,
    ) -> tuple[list[tuple[int, int]], list[tuple[int, str]], int]:
        """Plan which resting orders a taker meets: ``(matches, cancels, filled lots)``.

        ``matches`` are ``(maker order id, lots)`` in execution order. Resting orders of the
        taker's own address (self-trade) and resting closes that could not pay their loss are
        listed in ``cancels`` instead. ``fill_ok(price, lots)`` may stop the walk early.
        """
        matches: list[tuple[int, int]] = []
        cancels: list[tuple[int, str]] = []
        book = self.books[spec.market_id]
        best = book.best_bid() if is_ask else book.best_ask()
        if best is None or (limit is not None and (best < limit if is_ask else best > limit)):
            return matches, cancels, 0  # nothing to meet: most resting quotes
        want = size
        maker_state: dict[SlotKey, tuple[int, int, int, int]] = {}
        collateral: dict[str, int] = {}
        for price, level in book.crossing_levels(is_ask, limit):
            for oid, rest in level.order_ids.items():
                maker = self.orders[oid]
                if maker.address == addr:
                    cancels.append((oid, "self-trade prevention: the incoming order was yours"))
                    continue
                lots = min(want, rest)
                if maker.is_close:
                    mkey = (maker.address, maker.market_id, maker.is_long)
                    pos = maker_state.get(mkey)
                    if pos is None:
                        p = tx.get_position(mkey)
                        assert p is not None
                        pos = (p.size, p.value, p.margin, p.added_margin)
                    free = collateral.get(maker.address)
                    if free is None:
                        free = tx.get_collateral(maker.address)
                    rel_value, rel_margin, rel_added = _released(pos, lots)
                    pnl = _pnl(maker.is_long, price * lots, rel_value)
                    after = free + rel_margin + pnl - fee_for(price * lots, spec.maker_fee_bps)
                    if after < 0:
                        cancels.append(
                            (
                                oid,
                                "the close would realise a loss the position and "
                                "free collateral cannot pay",
                            )
                        )
                        continue
                    if fill_ok is not None and not fill_ok(price, lots):
                        return matches, cancels, size - want
                    maker_state[mkey] = (
                        pos[0] - lots,
                        pos[1] - rel_value,
                        pos[2] - rel_margin,
                        pos[3] - rel_added,
                    )
                    collateral[maker.address] = after
                elif fill_ok is not None and not fill_ok(price, lots):
                    return matches, cancels, size - want
                matches.append((oid, lots))
                want -= lots
                if not want:
                    return matches, cancels, size
        return matches, cancels, size - want

    def _execute(
        self,
        tx: _Tx,
        spec: MarketSpec,
        taker_id: int,
        matches: list[tuple[int, int]],
        cancels: list[tuple[int, str]],
        close_pot: list[int] | None,
    ) -> list[FillInfo]:
        """Emit cancels and fills for a planned match. ``close_pot`` collects a liquidation's
        proceeds instead of crediting them to the trader."""
        for oid, reason in cancels:
            self._cancel(tx, tx.get_order(oid), reason)
        fills: list[FillInfo] = []
        orders = tx.orders
        taker = orders[taker_id]
        for maker_id, lots in matches:
            maker = orders.get(maker_id)
            if maker is None:
                maker = self.orders[maker_id]
            price = maker.price
            maker_side = self._fill_side(tx, spec, maker, price, lots, True, None)
            taker_side = self._fill_side(tx, spec, taker, price, lots, False, close_pot)
            taker = taker_side.order
            tx.fee_account += maker_side.fee + taker_side.fee
            tx.seq += 1
            tx.events.append(
                Fill(
                    seq=tx.seq,
                    ts=tx.ts,
                    market_id=spec.market_id,
                    price=price,
                    size=lots,
                    taker=taker_side,
                    maker=maker_side,
                    fee_account=tx.fee_account,
                )
            )
            fills.append(FillInfo(price, lots, taker_side.fee, taker_side.pnl, False))
            if maker_side.position.size == 0:
                # A resting close order took the maker's whole position: retire the slot.
                self._release_if_empty(tx, (maker.address, maker.market_id, maker.is_long))
        return fills

    def _fill_side(
        self,
        tx: _Tx,
        spec: MarketSpec,
        order: OrderState,
        price: int,
        lots: int,
        is_maker: bool,
        close_pot: list[int] | None,
    ) -> FillSide:
        address = order.address
        key = (address, order.market_id, order.is_long)
        # Inlined tx.get_position / tx.get_collateral: this runs twice per fill.
        tx_positions = tx.positions
        pos = tx_positions[key] if key in tx_positions else self.positions.get(key)
        assert pos is not None
        value = price * lots
        free = tx.collateral.get(address)
        if free is None:
            free = self.collateral.get(address, 0)
        ts = tx.ts
        remaining = order.remaining - lots
        pnl = 0
        reserved_margin, reserved_fee = order.reserved_margin, order.reserved_fee
        if order.is_close:
            rel_value, rel_margin, rel_added = _released(
                (pos.size, pos.value, pos.margin, pos.added_margin), lots
            )
            pnl = _pnl(order.is_long, value, rel_value)
            fee = fee_for(value, spec.maker_fee_bps if is_maker else spec.taker_fee_bps)
            size = pos.size - lots
            proceeds = rel_margin + pnl - fee
            if close_pot is not None:
                close_pot[0] += proceeds
            else:
                free += proceeds
            pos = _replace(
                pos,
                size=size,
                value=pos.value - rel_value,
                margin=pos.margin - rel_margin,
                added_margin=pos.added_margin - rel_added,
                pending_close=pos.pending_close - lots if is_maker else pos.pending_close,
                tp=pos.tp if size else None,
                sl=pos.sl if size else None,
                updated=ts,
            )
        else:
            if is_maker:
                # A resting open order pays from its reservation, lot by lot, the last lot
                # taking what is left so the total is exactly what was reserved.
                if remaining:
                    margin = reserved_margin * lots // order.remaining
                    fee = reserved_fee * lots // order.remaining
                else:
                    margin, fee = reserved_margin, reserved_fee
                reserved_margin -= margin
                reserved_fee -= fee
                pending_opens = pos.pending_opens if remaining else pos.pending_opens - 1
            else:
                margin = -(-value // order.leverage)  # ceil_div
                fee = -(-value * spec.taker_fee_bps // BPS)  # fee_for, rounded up
                free -= margin + fee
                pending_opens = pos.pending_opens
            pos = _replace(
                pos,
                size=pos.size + lots,
                value=pos.value + value,
                margin=pos.margin + margin,
                tp=pos.tp if order.tp is None else order.tp,
                sl=pos.sl if order.sl is None else order.sl,
                pending_opens=pending_opens,
                updated=ts,
            )
        is_market = order.is_market
        order = _replace(
            order,
            remaining=remaining,
            status=FILLED
            if not remaining
            else OPEN
            if remaining == order.size
            else PARTIALLY_FILLED,
            reserved_margin=reserved_margin,
            reserved_fee=reserved_fee,
            updated=ts,
            price=price if is_market else order.price,
            value=order.value + value if is_market else order.value,
        )
        tx.orders[order.order_id] = order
        tx_positions[key] = pos
        tx.collateral[address] = free
        return FillSide(
            order=order, position=pos, collateral=free, fee=fee, pnl=pnl, is_maker=is_maker
        )

    def _rest(self, tx: _Tx, spec: MarketSpec, order: OrderState) -> None:
        address = order.address
        key = (address, order.market_id, order.is_long)
        pos = tx.positions[key] if key in tx.positions else self.positions.get(key)
        assert pos is not None
        free = tx.collateral.get(address)
        if free is None:
            free = self.collateral.get(address, 0)
        if order.is_close:
            reserved_margin = reserved_fee = 0
            pos = _replace(pos, pending_close=pos.pending_close + order.remaining)
        else:
            value = order.price * order.remaining
            reserved_margin = -(-value // order.leverage)  # ceil_div
            reserved_fee = -(-value * spec.maker_fee_bps // BPS)  # fee_for, rounded up
            free -= reserved_margin + reserved_fee
            if free < 0:
                raise errors.InsufficientCollateral(
                    f"insufficient collateral: the order needs {reserved_margin} margin and "
                    f"{reserved_fee} fee reserve, {-free} more than {order.address} has free"
                )
            pos = _replace(pos, pending_opens=pos.pending_opens + 1)
        order = _replace(order, reserved_margin=reserved_margin, reserved_fee=reserved_fee)
        tx.orders[order.order_id] = order
        tx.positions[key] = pos
        tx.collateral[order.address] = free
        tx.events.append(
            OrderRested(seq=tx.next_seq(), ts=tx.ts, order=order, position=pos, collateral=free)
        )

    def _cancel(self, tx: _Tx, order: OrderState, reason: str) -> None:
        key = (order.address, order.market_id, order.is_long)
        pos = tx.get_position(key)
        assert pos is not None
        free = tx.get_collateral(order.address)
        resting = order.order_id in self.orders
        if resting:
            if order.is_close:
                pos = _replace(pos, pending_close=pos.pending_close - order.remaining)
            else:
                free += order.reserved_margin + order.reserved_fee
                pos = _replace(pos, pending_opens=pos.pending_opens - 1)
        order = _replace(order, status=CANCELLED, reserved_margin=0, reserved_fee=0, updated=tx.ts)
        tx.orders[order.order_id] = order
        tx.positions[key] = pos
        tx.collateral[order.address] = free
        tx.events.append(
            OrderCancelled(
                seq=tx.next_seq(),
                ts=tx.ts,
                order=order,
                position=pos,
                collateral=free,
                reason=reason,
            )
        )
        if resting:
            self._release_if_empty(tx, key)

    def _release_if_empty(self, tx: _Tx, key: SlotKey) -> None:
        pos = tx.get_position(key)
        if pos is not None and pos.size == 0 and pos.pending_opens == 0:
            tx.positions[key] = None
            tx.events.append(
                PositionReleased(
                    seq=tx.next_seq(),
                    ts=tx.ts,
                    address=pos.address,
                    market_id=pos.market_id,
                    is_long=pos.is_long,
                    trade_id=pos.trade_id,
                )
            )

    def cancel_orders(
        self, address: str, market_id: int, order_ids: Iterable[int], *, ts: int
    ) -> list[AnyEvent]:
        """Cancel resting orders of ``address`` in ``market_id``; all or none."""
        addr = self._address(address)
        spec = self._market(market_id)
        ids = list(order_ids)
        if not ids:
            raise errors.UnknownOrder("no order ids to cancel")
        seen: set[int] = set()
        for oid in ids:
            order = self.orders.get(oid) if type(oid) is int else None
            if order is None or order.address != addr or order.market_id != spec.market_id:
                raise errors.UnknownOrder(
                    f"order {oid} is not a resting order of {addr} in market {spec.market_id}"
                )
            if oid in seen:
                raise errors.UnknownOrder(f"order {oid} is listed twice")
            seen.add(oid)
        tx = _Tx(self, ts)
        for oid in ids:
            self._cancel(tx, tx.get_order(oid), "cancelled by the owner")
        return self._commit(tx)

    # ------------------------------------------------------------------ positions

    def _open_position(self, address: str, market_id: int, is_long: object) -> PositionState:
        addr = self._address(address)
        spec = self._market(market_id)
        if type(is_long) is not bool:
            raise errors.CommandRejected("tradeSide must be true (long) or false (short)")
        pos = self.positions.get((addr, spec.market_id, is_long))
        if pos is None or pos.size == 0:
            side = "long" if is_long else "short"
            raise errors.NoPosition(f"{addr} has no {side} position in market {market_id}")
        return pos

    def update_take_profit(
        self, address: str, market_id: int, is_long: bool, price: int | None, *, ts: int
    ) -> list[AnyEvent]:
        """Set (or clear with None) a position's take-profit price."""
        return self._update_trigger(address, market_id, is_long, price, ts, take_profit=True)

    def update_stop_loss(
        self, address: str, market_id: int, is_long: bool, price: int | None, *, ts: int
    ) -> list[AnyEvent]:
        """Set (or clear with None) a position's stop-loss price."""
        return self._update_trigger(address, market_id, is_long, price, ts, take_profit=False)

    def _update_trigger(
        self,
        address: str,
        market_id: int,
        is_long: bool,
        price: int | None,
        ts: int,
        take_profit: bool,
    ) -> list[AnyEvent]:
        pos = self._open_position(address, market_id, is_long)
        spec = self.markets[pos.market_id]
        if price is not None:
            ref = self.marks.get(pos.market_id)
            if ref is None:
                ref = (
                    ceil_div(pos.value, pos.size)
                    if is_long == take_profit
                    else (pos.value // pos.size)
                )
            self._check_triggers(
                spec, is_long, ref, price if take_profit else None, None if take_profit else price
            )
        if take_profit:
            pos = _replace(pos, tp=price, updated=ts)
        else:
            pos = _replace(pos, sl=price, updated=ts)
        tx = _Tx(self, ts)
        tx.events.append(
            PositionUpdated(
                seq=tx.next_seq(),
                ts=ts,
                position=pos,
                collateral=tx.get_collateral(pos.address),
                reason="take-profit" if take_profit else "stop-loss",
            )
        )
        return self._commit(tx)

    def add_margin(
        self, address: str, market_id: int, is_long: bool, amount: int, *, ts: int
    ) -> list[AnyEvent]:
        """Move free collateral into a position's isolated margin (its liq_price moves away)."""
        pos = self._open_position(address, market_id, is_long)
        amount = self._positive_int(amount, "margin amount", errors.InvalidAmount)
        free = self.collateral.get(pos.address, 0)
        if amount > free:
            raise errors.InsufficientCollateral(
                f"cannot add {amount} margin: only {free} of {pos.address}'s collateral is free"
            )
        pos = _replace(
            pos, margin=pos.margin + amount, added_margin=pos.added_margin + amount, updated=ts
        )
        tx = _Tx(self, ts)
        tx.events.append(
            PositionUpdated(
                seq=tx.next_seq(),
                ts=ts,
                position=pos,
                collateral=free - amount,
                reason="add-margin",
            )
        )
        return self._commit(tx)

    def liq_price(self, pos: PositionState) -> float:
        """The position's liquidation price by the venue's formula (reference §2)."""
        spec = self.markets[pos.market_id]
        return liquidation_price(
            pos.value,
            pos.size,
            pos.leverage,
            pos.is_long,
            spec.maintenance_margin_bps,
            pos.added_margin,
        )

    # ------------------------------------------------------------------ mark price & triggers

    def set_mark_price(self, market_id: int, price: int, *, ts: int) -> list[AnyEvent]:
        """Set the oracle mark price, then liquidate and trigger TP/SL where it reaches."""
        spec = self._market(market_id)
        price = self._positive_int(price, "mark price", errors.InvalidPrice)
        tx = _Tx(self, ts)
        tx.events.append(
            MarkPriceSet(seq=tx.next_seq(), ts=ts, market_id=spec.market_id, price=price)
        )
        events = self._commit(tx)
        events.extend(self._run_triggers(spec, ts, None))
        return events

    def _run_triggers(self, spec: MarketSpec, ts: int, only: set[SlotKey] | None) -> list[AnyEvent]:
        """Liquidate, then close by take-profit or stop-loss, the slots the mark reaches: all of
        the market's (after a mark) or ``only`` those an order touched."""
        mark = self.marks.get(spec.market_id)
        if mark is None:
            return []
        positions = self.positions
        mm_bps = spec.maintenance_margin_bps
        slots = self.slots_by_market[spec.market_id]
        # Most often nothing is due: look first (inlined, with the cached liquidation price),
        # and only if something is, act on the slots in a fixed order.
        liq_cache = self._liq_cache
        for key in slots if only is None else only:
            pos = positions.get(key)
            if pos is None or not pos.size:
                continue
            is_long, tp, sl = pos.is_long, pos.tp, pos.sl
            if tp is not None and (mark >= tp if is_long else mark <= tp):
                break
            if sl is not None and (mark <= sl if is_long else mark >= sl):
                break
            cached = liq_cache.get(key)
            if (
                cached is not None
                and cached[0] == pos.value
                and cached[1] == pos.size
                and cached[2] == pos.added_margin
                and cached[3] == pos.leverage
            ):
                liq = cached[4]
            else:
                liq = self._liq(key, pos, mm_bps)
            if mark <= liq if is_long else mark >= liq:
                break
        else:
            return []
        keys = list(slots) if only is None else sorted(k for k in only if k in positions)
        events: list[AnyEvent] = []
        for key in keys:
            pos = positions.get(key)
            if pos is None or pos.size == 0:
                continue
            liq = self._liq(key, pos, mm_bps)
            if mark <= liq if pos.is_long else mark >= liq:
                events.extend(self._liquidate(spec, pos, ts))
        # Liquidation fills may have changed any slot (a maker's fill brings its order's TP/SL
        # to its position), so every slot is read again; so are later ones after a TP/SL close.
        for key in keys:
            pos = positions.get(key)
            if pos is None or pos.size == 0:
                continue
            if pos.tp is not None and (mark >= pos.tp if pos.is_long else mark <= pos.tp):
                events.extend(self._close_at_market(spec, pos, KIND_TAKE_PROFIT, ts))
            elif pos.sl is not None and (mark <= pos.sl if pos.is_long else mark >= pos.sl):
                events.extend(self._close_at_market(spec, pos, KIND_STOP_LOSS, ts))
        return events

    def _liq(self, key: SlotKey, pos: PositionState, mm_bps: int) -> float:
        """The position's liquidation price, cached per slot while the fields it reads stay."""
        value, size, added, leverage = pos.value, pos.size, pos.added_margin, pos.leverage
        cached = self._liq_cache.get(key)
        if cached is not None and cached[:4] == (value, size, added, leverage):
            return cached[4]
        liq = liquidation_price(value, size, leverage, pos.is_long, mm_bps, added)
        self._liq_cache[key] = (value, size, added, leverage, liq)
        return liq

    def _close_at_market(
        self, spec: MarketSpec, pos: PositionState, kind: int, ts: int
    ) -> list[AnyEvent]:
        """Close a position with a system order (TP/SL or liquidation) as far as the book and
        the loss bound allow. Returns no events if nothing can fill now."""
        liquidation = kind == KIND_LIQUIDATION
        tx = _Tx(self, ts)
        # Resting close orders of this position would double-count its size: cancel them.
        closers = [
            o
            for o in self.orders.values()
            if o.is_close
            and o.address == pos.address
            and o.market_id == pos.market_id
            and o.is_long == pos.is_long
        ]
        key = (pos.address, pos.market_id, pos.is_long)
        backstop = self.insurance_fund if liquidation else self.collateral.get(pos.address, 0)
        state = [pos.size, pos.value, pos.margin, pos.added_margin, 0]
        taker_bps = spec.taker_fee_bps

        def fill_ok(price: int, lots: int) -> bool:
            rel_value, rel_margin, rel_added = _released(
                (state[0], state[1], state[2], state[3]), lots
            )
            proceeds = (
                rel_margin
                + _pnl(pos.is_long, price * lots, rel_value)
                - fee_for(price * lots, taker_bps)
            )
            if state[4] + proceeds + backstop < 0:
                return False
            state[0] -= lots
            state[1] -= rel_value
            state[2] -= rel_margin
            state[3] -= rel_added
            state[4] += proceeds
            return True

        is_ask = pos.is_long  # closing a long sells
        matches, cancels, filled = self._match(
            tx, pos.address, spec, is_ask, None, pos.size, fill_ok
        )
        if not filled:
            return []
        for order in closers:
            self._cancel(
                tx,
                order,
                "position closed by "
                + ("liquidation" if liquidation else "take-profit/stop-loss trigger"),
            )
        counter = self.order_counter + 1
        rests = filled < pos.size
        oid = order_id(counter, 0, is_ask, rests)
        order = OrderState(
            order_id=oid,
            market_id=spec.market_id,
            address=pos.address,
            is_long=pos.is_long,
            is_close=True,
            is_market=True,
            restriction=IMMEDIATE_OR_CANCEL,
            order_type=order_type_code(kind, pos.is_long),
            price=0,
            size=pos.size,
            remaining=pos.size,
            leverage=pos.leverage,
            trade_id=pos.trade_id,
            status=OPEN,
            value=0,
            created=ts,
            updated=ts,
        )
        tx.orders[oid] = order
        tx.events.append(
            OrderPlaced(seq=tx.next_seq(), ts=ts, order=order, position=tx.get_position(key) or pos)
        )
        pot = [0] if liquidation else None
        self._execute(tx, spec, oid, matches, cancels, pot)
        order = tx.get_order(oid)
        if order.remaining:
            self._cancel(
                tx, order, "unfilled remainder: not enough liquidity within the loss bound"
            )
        if pot is not None:
            self._settle_liquidation(tx, tx.get_position(key) or pos, filled, pot[0])
        self._release_if_empty(tx, key)
        return self._commit(tx)

    def _liquidate(self, spec: MarketSpec, pos: PositionState, ts: int) -> list[AnyEvent]:
        return self._close_at_market(spec, pos, KIND_LIQUIDATION, ts)

    def _settle_liquidation(self, tx: _Tx, pos: PositionState, closed: int, remaining: int) -> None:
        free = tx.get_collateral(pos.address)
        if remaining > 0:
            to_insurance = remaining * LIQUIDATION_SHARES[0] // 100
            to_liquidator = remaining * LIQUIDATION_SHARES[1] // 100
            to_trader = remaining - to_insurance - to_liquidator
            insurance = tx.insurance + to_insurance
        else:
            to_insurance = to_liquidator = to_trader = 0
            insurance = tx.insurance + remaining  # the fund pays the shortfall
        tx.insurance = insurance
        free += to_trader
        tx.collateral[pos.address] = free
        tx.events.append(
            LiquidationSettled(
                seq=tx.next_seq(),
                ts=tx.ts,
                address=pos.address,
                market_id=pos.market_id,
                is_long=pos.is_long,
                trade_id=pos.trade_id,
                closed_size=closed,
                remaining=remaining,
                to_insurance=to_insurance,
                to_liquidator=to_liquidator,
                to_trader=to_trader,
                insurance_fund=insurance,
                liquidator=self.liquidator + to_liquidator,
                collateral=free,
            )
        )

    # ------------------------------------------------------------------ funding

    def set_index_price(self, market_id: int, price: int, *, ts: int) -> list[AnyEvent]:
        """Set the oracle (index) price; funding follows the mark's premium over it.

        Nothing else moves: liquidations and TP/SL follow the mark only."""
        spec = self._market(market_id)
        price = self._positive_int(price, "index price", errors.InvalidPrice)
        tx = _Tx(self, ts)
        tx.events.append(
            IndexPriceSet(seq=tx.next_seq(), ts=ts, market_id=spec.market_id, price=price)
        )
        return self._commit(tx)

    def current_funding_rate(self, market_id: int) -> Fraction | None:
        """The rate a settlement would use now; None while the mark or the index is unknown."""
        spec = self._market(market_id)
        mark = self.marks.get(spec.market_id)
        index = self.index_prices.get(spec.market_id)
        if mark is None or index is None:
            return None
        return funding_rate(spec, mark, index)

    def funding_ready(self, ts: int) -> list[int]:
        """The markets that :meth:`settle_funding` would settle at ``ts``: due, with a mark and
        an index price."""
        marks, index = self.marks, self.index_prices
        return [m for m, due in self.funding_due.items() if due <= ts and m in marks and m in index]

    def settle_funding(self, market_id: int, *, ts: int) -> list[AnyEvent]:
        """Settle the market's periodic funding if it is due; otherwise do nothing.

        Due means ``ts >= funding_due[market]`` with both a mark and an index price known;
        when not due this returns no events and changes nothing (a keeper may call it at
        will). A settlement emits one ``FundingSettled``: every position with a size in the
        market, in slot order, pays or receives (see ``docs/engine.md``, Funding). However
        late it runs, it settles one interval, and the next is due at the first interval
        boundary after ``ts``. Positions that funding brought to their liquidation price are
        then liquidated (and TP/SL checked) at the current mark, as after a mark price.
        """
        spec = self._market(market_id)
        m = spec.market_id
        due = self.funding_due.get(m)
        mark = self.marks.get(m)
        index = self.index_prices.get(m)
        if due is None or ts < due or mark is None or index is None:
            return []
        rate = funding_rate(spec, mark, index)
        num, den = rate.numerator, rate.denominator
        positions = self.positions
        held = [pos for key in self.slots_by_market[m] if (pos := positions[key]).size]
        # Payers (longs when the rate is positive, shorts when negative) owe
        # size * mark * |rate|, rounded up, and pay at most their margin.
        longs_pay = num > 0
        amounts: list[int] = []
        pool = 0
        receiving = 0
        for pos in held:
            if num and pos.is_long == longs_pay:
                paid = min(ceil_div(pos.size * mark * abs(num), den), pos.margin)
                pool += paid
                amounts.append(-paid)
            else:
                receiving += pos.size
                amounts.append(0)
        # Receivers share what was paid pro rata by size, rounded down; the rest is dust.
        received = 0
        if pool and receiving:
            for i, pos in enumerate(held):
                if pos.is_long != longs_pay:
                    amounts[i] = share = pool * pos.size // receiving
                    received += share
        payments = [
            FundingPayment(
                position=_replace(
                    pos,
                    margin=pos.margin + amount,
                    added_margin=pos.added_margin + amount,
                    updated=ts,
                )
                if amount
                else pos,
                amount=amount,
            )
            for pos, amount in zip(held, amounts, strict=True)
        ]
        tx = _Tx(self, ts)
        tx.events.append(
            FundingSettled(
                seq=tx.next_seq(),
                ts=ts,
                market_id=m,
                mark=mark,
                index=index,
                rate_num=num,
                rate_den=den,
                payments=payments,
                dust=self.dust + pool - received,
                next_funding=next_funding_time(spec, ts),
            )
        )
        events = self._commit(tx)
        events.extend(self._run_triggers(spec, ts, None))
        return events

    # ------------------------------------------------------------------ reads

    def ledger(self, marks: Mapping[int, int] | None = None) -> Ledger:
        """Every unit of money by where it sits; ``total`` equals deposits - withdrawals."""
        marks = self.marks if marks is None else marks
        unrealised = 0
        margin = 0
        for pos in self.positions.values():
            margin += pos.margin
            if pos.size:
                mark = marks.get(pos.market_id, 0)
                unrealised += _pnl(pos.is_long, mark * pos.size, pos.value)
        reserved = sum(o.reserved_margin + o.reserved_fee for o in self.orders.values())
        return Ledger(
            free=sum(self.collateral.values()),
            order_reserved=reserved,
            position_margin=margin,
            unrealised=unrealised,
            fee_account=self.fee_account,
            insurance_fund=self.insurance_fund,
            liquidator=self.liquidator,
            dust=self.dust,
            deposits=self.deposits,
            withdrawals=self.withdrawals,
        )

    def state(self) -> dict[str, Any]:
        """A canonical, comparable picture of the whole state (for replay checks)."""
        return {
            "seq": self.seq,
            "collateral": dict(sorted(self.collateral.items())),
            "orders": dict(sorted(self.orders.items())),
            "positions": dict(sorted(self.positions.items())),
            "books": {m: b.levels() for m, b in sorted(self.books.items())},
            "book_orders": {
                m: (
                    [(p, list(lv.order_ids.items())) for p, lv in b.side_levels(True)],
                    [(p, list(lv.order_ids.items())) for p, lv in b.side_levels(False)],
                )
                for m, b in sorted(self.books.items())
            },
            "marks": dict(sorted(self.marks.items())),
            "index_prices": dict(sorted(self.index_prices.items())),
            "funding_due": dict(sorted(self.funding_due.items())),
            "order_counter": self.order_counter,
            "position_counters": dict(self.position_counters),
            "accounts": (
                self.fee_account,
                self.insurance_fund,
                self.liquidator,
                self.dust,
                self.deposits,
                self.withdrawals,
            ),
        }


def _released(pos: tuple[int, int, int, int], lots: int) -> tuple[int, int, int]:
    """Cost basis, margin and added margin released by closing ``lots`` of a position
    ``(size, value, margin, added)``: proportional, rounded down, the last lot taking the rest."""
    size, value, margin, added = pos
    if lots == size:
        return value, margin, added
    return value * lots // size, margin * lots // size, added * lots // size


def _pnl(is_long: bool, exit_value: int, cost: int) -> int:
    return exit_value - cost if is_long else cost - exit_value
