"""The demo market simulator behind ``perps-indexer serve --demo``.

Bots trade on the embedded engine so that every topic moves within seconds: makers quote a
ladder around the mark price on every market, takers cross the spread with market and
immediate-or-cancel orders, leveraged traders open positions with take-profit and stop-loss,
add margin, close and redeposit, and now and then a sharp oracle move liquidates someone.

The oracle is a random walk and is the market's index price; the mark is the index plus a small
premium that follows the book (half the relative distance of the book's mid from the index,
within +/- 0.3 %), so the funding rate moves with every step. Funding itself is settled by the
server on its schedule, not by the simulator.

The simulator is pure: it reads the engine (never writes it), draws randomness only from
``random.Random(seed)`` and reads no clock. :meth:`DemoSimulator.step` returns commands for the
caller to execute in order with :func:`perps_indexer.commands.execute`; the same seed and the same
``now_ms`` sequence give the same commands on the same engine state.

Within a step the commands come in this order, so that each decision made on the state read at
the start of the step still holds when it runs: deposits, cancels, maker quotes, index prices,
mark prices (which may liquidate or trigger take-profit/stop-loss), then trader orders.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from perps_indexer.commands import (
    AddMargin,
    AnyCommand,
    CancelOrders,
    Deposit,
    PlaceLimitOrder,
    PlaceMarketOrder,
    SetIndexPrice,
    SetMarkPrice,
    UpdateStopLoss,
    UpdateTakeProfit,
    Withdraw,
)
from perps_indexer.engine import Engine
from perps_indexer.events import IMMEDIATE_OR_CANCEL, OrderState, PositionState
from perps_indexer.markets import MarketSpec
from perps_indexer.units import BPS, ceil_div, fee_for

START_PRICES_USD: Final[Mapping[str, float]] = {"APT": 6.05, "BTC": 60_000.0, "ETH": 3_000.0}
"""Starting oracle price by base asset, in quote units; other assets start at 100."""

MAX_STEP_S: Final = 2.0
"""Longest interval one step simulates: after a pause the bots resume instead of catching up."""

MAX_LOG_MOVE: Final = 0.3
"""The oracle stays within exp(+-0.3), about 0.74x..1.35x, of its starting price."""

PREMIUM_WEIGHT: Final = 0.5
"""The mark's premium over the index: this share of the book mid's relative distance from it."""

MAX_PREMIUM: Final = 0.003
"""The premium's bound, +/- 0.3 % (inside the bundled 0.75 % funding cap)."""


def bot_address(name: str) -> str:
    """A bot's address: ``0x`` + the 64 hex digits of SHA-256 of its name (stable across runs)."""
    return "0x" + hashlib.sha256(f"perps-indexer demo {name}".encode()).hexdigest()


@dataclass(frozen=True)
class _Profile:
    """How a trading bot behaves."""

    leverage: tuple[int, int]
    interval_s: float
    """Mean time between actions."""
    notional: tuple[float, float]
    """Order size range, in quote units (USD)."""
    max_notional: float
    """Above this position value the bot closes rather than adds."""
    deposit: float
    tp_prob: float = 0.0
    sl_prob: float = 0.0
    rest_prob: float = 0.0
    ioc_prob: float = 0.0
    manage_prob: float = 0.0
    """Chance that an action updates take-profit/stop-loss or adds margin instead of trading."""
    rest_offset: tuple[float, float] = (0.001, 0.006)
    """How far from the mark a resting order goes, as a fraction of the price."""


_TAKER = _Profile(
    leverage=(1, 5),
    interval_s=1.0,
    notional=(100.0, 1_500.0),
    max_notional=3_000.0,
    deposit=5_000.0,
    ioc_prob=0.4,
)
_TRADER = _Profile(
    leverage=(5, 20),
    interval_s=3.0,
    notional=(300.0, 3_000.0),
    max_notional=6_000.0,
    deposit=2_500.0,
    tp_prob=0.5,
    sl_prob=0.55,
    rest_prob=0.25,
    ioc_prob=0.2,
    manage_prob=0.2,
)
# Rests further from the touch than the others, so its open order survives ordinary moves.
_FEATURED = _Profile(
    leverage=(5, 5),
    interval_s=0.8,
    notional=(200.0, 1_000.0),
    max_notional=3_000.0,
    deposit=20_000.0,
    tp_prob=1.0,
    sl_prob=1.0,
    ioc_prob=0.3,
    rest_offset=(0.003, 0.01),
)


@dataclass
class _Bot:
    name: str
    profile: _Profile | None
    """None for a market maker."""
    address: str = field(init=False)
    next_at: int = 0
    """Time (unix ms) of the bot's next action."""

    def __post_init__(self) -> None:
        self.address = bot_address(self.name)


@dataclass
class _Oracle:
    """A mean-reverting random walk of the log price with occasional sharp moves."""

    anchor: float
    x: float = 0.0
    shock_left_s: float = 0.0
    shock_speed: float = 0.0

    def price(self, tick: int) -> int:
        return max(tick, round(self.anchor * math.exp(self.x) / tick) * tick)


class _Plan:
    """The commands of one step, by phase, and what the step has already committed to."""

    def __init__(self, engine: Engine, index: dict[int, int], marks: dict[int, int]) -> None:
        self.engine = engine
        self.index = index
        self.marks = marks
        self.deposits: list[AnyCommand] = []
        self.cancels: list[AnyCommand] = []
        self.quotes: list[AnyCommand] = []
        self.actions: list[AnyCommand] = []
        self.resting: dict[tuple[str, int], list[OrderState]] = {}
        for order in engine.orders.values():
            self.resting.setdefault((order.address, order.market_id), []).append(order)
        self.budget: dict[str, int] = {}
        self.depth: dict[tuple[int, bool], int] = {}
        """Lots a market order may still take this step, by (market, is_ask side taken)."""

    def commands(self) -> list[AnyCommand]:
        # Only prices that change: an unchanged mark would only repeat triggers that already ran.
        index: list[AnyCommand] = [
            SetIndexPrice(market_id=m, price=p)
            for m, p in self.index.items()
            if self.engine.index_prices.get(m) != p
        ]
        marks: list[AnyCommand] = [
            SetMarkPrice(market_id=m, price=p)
            for m, p in self.marks.items()
            if self.engine.marks.get(m) != p
        ]
        return self.deposits + self.cancels + self.quotes + index + marks + self.actions

    def free(self, address: str) -> int:
        return self.engine.collateral.get(address, 0)

    def spend(self, address: str, amount: int) -> bool:
        """Commit ``amount`` of the address's free collateral (with this step's deposits)."""
        budget = self.budget.get(address)
        if budget is None:
            budget = self.free(address)
            budget += sum(
                d.amount for d in self.deposits if isinstance(d, Deposit) and d.address == address
            )
        if amount > budget:
            return False
        self.budget[address] = budget - amount
        return True

    def slot(self, address: str, market_id: int, is_long: bool) -> PositionState | None:
        return self.engine.positions.get((address, market_id, is_long))


def _floor_tick(price: float, tick: int) -> int:
    return max(tick, math.floor(price / tick) * tick)


def _ceil_tick(price: float, tick: int) -> int:
    return max(tick, math.ceil(price / tick) * tick)


def _open_cost(spec: MarketSpec, value: int, leverage: int) -> int:
    """Collateral an open of ``value`` takes at most: its margin and a taker fee."""
    return ceil_div(value, leverage) + fee_for(value, spec.taker_fee_bps)


class DemoSimulator:
    """Market makers, takers and leveraged traders on every market of an engine."""

    def __init__(
        self,
        markets: Mapping[int, MarketSpec],
        *,
        seed: int = 1,
        makers: int = 2,
        takers: int = 3,
        traders: int = 8,
        levels: int = 12,
        volatility: float = 0.0005,
        shock_interval_s: float = 120.0,
        start_prices: Mapping[int, int] | None = None,
    ) -> None:
        """``volatility`` is the standard deviation of the log price per square-root second;
        ``shock_interval_s`` the mean time between sharp 2-4.5 % moves of one market's oracle;
        ``start_prices`` overrides starting prices (in price units) by market id."""
        if not markets:
            raise ValueError("the simulator needs at least one market")
        if makers < 1 or levels < 1:
            raise ValueError("the simulator needs at least one maker quoting at least one level")
        self.markets: dict[int, MarketSpec] = dict(sorted(markets.items()))
        self.rng = random.Random(seed)
        self.levels = levels
        self.volatility = volatility
        self.shock_interval_s = shock_interval_s
        # Mean reversion half-life of about seven minutes keeps hours of shocks within range.
        self.reversion = 1 / 600
        self.maker_leverage = 2
        self.maker_notional = (1_000.0, 4_000.0)
        self.maker_deposit = 5_000_000.0
        self.half_spread_bps = 3
        self.grid_bps = 5
        self.oracles: dict[int, _Oracle] = {}
        self.grid: dict[int, int] = {}
        for m, spec in self.markets.items():
            if start_prices is not None and m in start_prices:
                start = float(start_prices[m])
            else:
                usd = START_PRICES_USD.get(spec.base_name, 100.0)
                start = usd * 10**spec.price_decimals
            self.oracles[m] = _Oracle(anchor=start)
            grid_ticks = max(1, round(start * self.grid_bps / BPS / spec.tick_size))
            self.grid[m] = grid_ticks * spec.tick_size
        self.home_market = next(iter(self.markets))
        # Collateral is in the quote sub-units every market shares (USDC, 6 decimals).
        self.quote_unit: int = 10 ** self.markets[self.home_market].quote_decimals
        self.makers = [_Bot(f"maker-{i + 1}", None) for i in range(makers)]
        self.traders = [_Bot("featured-trader", _FEATURED)]
        self.traders += [_Bot(f"taker-{i + 1}", _TAKER) for i in range(takers)]
        self.traders += [_Bot(f"trader-{i + 1}", _TRADER) for i in range(traders)]
        self.last_ms: int | None = None

    # ------------------------------------------------------------------ public

    @property
    def featured_address(self) -> str:
        """A trader that always holds a position and a resting order and trades every second."""
        return self.traders[0].address

    @property
    def featured_market(self) -> int:
        """The market where the featured trader keeps its position and resting order."""
        return self.home_market

    @property
    def addresses(self) -> list[str]:
        """Every bot address: makers first, then the featured trader, takers and traders."""
        return [b.address for b in self.makers + self.traders]

    def bootstrap(self, engine: Engine, now_ms: int) -> list[AnyCommand]:
        """Deposits for every bot, the starting index and mark prices and full maker ladders."""
        for m, oracle in self.oracles.items():
            existing = engine.index_prices.get(m, engine.marks.get(m))
            if existing is not None:  # resume near a previous run's price instead of jumping
                log = math.log(existing / oracle.anchor)
                oracle.x = max(-MAX_LOG_MOVE, min(MAX_LOG_MOVE, log))
        self.last_ms = now_ms
        plan = self._new_plan(engine)
        for bot in self.makers + self.traders:
            self._top_up(bot, plan)
            if bot.profile is not None:
                interval = bot.profile.interval_s
                delay = 0.3 if bot is self.traders[0] else self.rng.uniform(0.0, interval)
                bot.next_at = now_ms + round(delay * 1000)
        self._quote_all(plan, 0.0)
        return plan.commands()

    def step(self, engine: Engine, now_ms: int) -> list[AnyCommand]:
        """Advance the oracle to ``now_ms`` and return the bots' commands for this moment."""
        if self.last_ms is None:
            return self.bootstrap(engine, now_ms)
        dt = min(MAX_STEP_S, max(0.0, (now_ms - self.last_ms) / 1000))
        self.last_ms = max(self.last_ms, now_ms)
        for oracle in self.oracles.values():
            self._advance(oracle, dt)
        plan = self._new_plan(engine)
        for bot in self.makers:
            self._top_up(bot, plan)
        self._quote_all(plan, dt)
        featured = self.traders[0]
        for bot in self.traders:
            profile = bot.profile
            if profile is None:
                continue
            if now_ms >= bot.next_at:
                delay = self.rng.expovariate(1 / profile.interval_s)
                bot.next_at = now_ms + max(1, round(delay * 1000))
            elif bot is not featured or not self._featured_lacks(plan):
                continue
            if not self._top_up(bot, plan):
                if bot is featured:
                    self._featured_act(bot, profile, plan, now_ms)
                else:
                    self._trader_act(bot, profile, plan, now_ms)
        return plan.commands()

    # ------------------------------------------------------------------ oracle

    def _advance(self, oracle: _Oracle, dt: float) -> None:
        if dt <= 0:
            return
        rng = self.rng
        oracle.x += -self.reversion * oracle.x * dt + self.volatility * math.sqrt(dt) * rng.gauss()
        if oracle.shock_left_s > 0:
            part = min(dt, oracle.shock_left_s)
            oracle.x += oracle.shock_speed * part
            oracle.shock_left_s -= part
        elif rng.random() < -math.expm1(-dt / self.shock_interval_s):
            # Shocks lean back towards the anchor the further the price has wandered.
            back = -1.0 if oracle.x > 0 else 1.0
            sign = back if rng.random() < 0.5 + min(0.4, abs(oracle.x) * 4) else -back
            duration = rng.uniform(4.0, 12.0)
            oracle.shock_speed = sign * rng.uniform(0.02, 0.045) / duration
            oracle.shock_left_s = duration
        oracle.x = max(-MAX_LOG_MOVE, min(MAX_LOG_MOVE, oracle.x))

    def _new_plan(self, engine: Engine) -> _Plan:
        index = {m: o.price(self.markets[m].tick_size) for m, o in self.oracles.items()}
        marks = {m: self._mark(engine, self.markets[m], p) for m, p in index.items()}
        plan = _Plan(engine, index, marks)
        for m, spec in self.markets.items():
            # A conservative share of what the makers' ladders hold after this step's quotes:
            # liquidations and other takers may eat into the book before a market order runs.
            lots = self._lots(spec, marks[m], self.maker_notional[0])
            budget = len(self.makers) * self.levels * lots // 4
            plan.depth[(m, True)] = plan.depth[(m, False)] = budget
        return plan

    @staticmethod
    def _mark(engine: Engine, spec: MarketSpec, index: int) -> int:
        """The index plus a premium that follows the book's mid (none without a two-sided
        book), bounded, on the tick."""
        book = engine.books[spec.market_id]
        bid, ask = book.best_bid(), book.best_ask()
        if bid is None or ask is None:
            return index
        premium = PREMIUM_WEIGHT * ((bid + ask) / 2 - index) / index
        premium = max(-MAX_PREMIUM, min(MAX_PREMIUM, premium))
        tick = spec.tick_size
        return max(tick, round(index * (1 + premium) / tick) * tick)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _lots(spec: MarketSpec, price: int, usd: float) -> int:
        lots = int(usd * 10**spec.quote_decimals / price)
        return min(spec.max_lots, max(spec.min_lots, lots))

    def _deposit_amount(self, bot: _Bot) -> int:
        return self._micro(self.maker_deposit if bot.profile is None else bot.profile.deposit)

    def _top_up(self, bot: _Bot, plan: _Plan) -> bool:
        """Redeposit when free collateral runs below 30 % of the bot's deposit."""
        amount = self._deposit_amount(bot)
        free = plan.free(bot.address)
        if free >= amount * 3 // 10:
            return False
        plan.deposits.append(Deposit(address=bot.address, amount=amount - free))
        return True

    def _triggered(self, engine: Engine, pos: PositionState, mark: int) -> bool:
        """Whether this step's mark liquidates or triggers ``pos`` (or nearly does)."""
        liq = engine.liq_price(pos)
        if pos.is_long:
            hit = mark <= liq * 1.002
            hit |= pos.tp is not None and mark >= pos.tp
            return hit or (pos.sl is not None and mark <= pos.sl)
        hit = mark >= liq * 0.998
        hit |= pos.tp is not None and mark <= pos.tp
        return hit or (pos.sl is not None and mark >= pos.sl)

    def _held(self, plan: _Plan, address: str, m: int) -> list[PositionState]:
        """Positions of ``address`` in ``m`` that this step's mark leaves alone."""
        held = []
        for is_long in (True, False):
            pos = plan.slot(address, m, is_long)
            if (
                pos is not None
                and pos.size > 0
                and not self._triggered(plan.engine, pos, plan.marks[m])
            ):
                held.append(pos)
        return held

    # ------------------------------------------------------------------ makers

    def _quote_all(self, plan: _Plan, dt: float) -> None:
        for spec in self.markets.values():
            for maker in self.makers:
                self._quote(maker, spec, plan, dt)

    def _quote(self, maker: _Bot, spec: MarketSpec, plan: _Plan, dt: float) -> None:
        """Keep ``levels`` grid prices quoted on each side; cancel what drifted out of range."""
        m = spec.market_id
        grid = self.grid[m]
        center = plan.marks[m]
        top_bid = max(grid, math.floor(center * (BPS - self.half_spread_bps) / BPS / grid) * grid)
        low_ask = math.ceil(center * (BPS + self.half_spread_bps) / BPS / grid) * grid
        # Two levels of slack at the far end avoid cancelling and requoting on every small move.
        far = (self.levels + 1) * grid
        mine = plan.resting.get((maker.address, m), [])
        stale: list[int] = []
        quoted: set[tuple[bool, int]] = set()
        for order in mine:
            p = order.price
            if order.is_ask:
                bad = p < low_ask or p > low_ask + far
            else:
                bad = p > top_bid or p < top_bid - far
            if bad or p % grid:
                stale.append(order.order_id)
            else:
                quoted.add((order.is_ask, p))
        if mine and self.rng.random() < -math.expm1(-dt / 5.0):
            # Now and then refresh one quote so order history shows makers at work.
            victim = mine[self.rng.randrange(len(mine))]
            if victim.order_id not in stale:
                stale.append(victim.order_id)
                quoted.discard((victim.is_ask, victim.price))
        if stale:
            plan.cancels.append(
                CancelOrders(address=maker.address, market_id=m, order_ids=tuple(stale))
            )
        closable = {}
        for is_long in (True, False):
            pos = plan.slot(maker.address, m, is_long)
            closable[is_long] = 0 if pos is None else pos.size - pos.pending_close
        for i in range(self.levels):
            for is_ask, price in ((False, top_bid - i * grid), (True, low_ask + i * grid)):
                if price <= 0 or (is_ask, price) in quoted:
                    continue
                size = self._lots(spec, price, self.rng.uniform(*self.maker_notional))
                # Quote against inventory first: a bid closes a short, an ask closes a long.
                held_side = is_ask
                if closable[held_side] >= size:
                    closable[held_side] -= size
                    is_long, is_close = held_side, True
                else:
                    need = _open_cost(spec, price * size, self.maker_leverage)
                    if not plan.spend(maker.address, need):
                        continue
                    is_long, is_close = not is_ask, False
                plan.quotes.append(
                    PlaceLimitOrder(
                        address=maker.address,
                        market_id=m,
                        is_long=is_long,
                        is_close=is_close,
                        size=size,
                        price=price,
                        leverage=self.maker_leverage,
                    )
                )

    # ------------------------------------------------------------------ traders

    def _trader_act(self, bot: _Bot, profile: _Profile, plan: _Plan, now_ms: int) -> None:
        rng = self.rng
        addr = bot.address
        stale = self._stale_orders(plan, addr, now_ms, max_age_ms=30_000)
        if stale is not None:
            plan.cancels.append(stale)
            return
        free = plan.free(addr)
        if free > 2 * self._deposit_amount(bot) and rng.random() < 0.2:
            plan.actions.append(Withdraw(address=addr, amount=free // 4))
            return
        m = rng.choice(list(self.markets))
        held = self._held(plan, addr, m)
        if held and rng.random() < profile.manage_prob:
            self._manage(plan, rng.choice(held))
            return
        big = [p for p in held if p.value > self._micro(profile.max_notional)]
        if big or (held and rng.random() < 0.4):
            self._close(plan, rng.choice(big or held), rng.random() < 0.5)
            return
        self._open(plan, bot, profile, m, rng.random() < 0.5, now_ms)

    def _featured_lacks(self, plan: _Plan) -> bool:
        """Whether the featured trader misses its home position or resting order, and can act.

        It then acts at once rather than on its schedule, so its topics are rarely empty.
        """
        addr = self.featured_address
        m = self.home_market
        slots = [s for s in (plan.slot(addr, m, side) for side in (True, False)) if s]
        held = self._held(plan, addr, m)
        if any(s.size for s in slots) and not held:
            return False  # the mark is closing it this step; wait for the dust to settle
        return not held or not plan.resting.get((addr, m))

    def _featured_act(self, bot: _Bot, profile: _Profile, plan: _Plan, now_ms: int) -> None:
        """Keep a position and a resting order in the home market, and keep changing them."""
        rng = self.rng
        addr = bot.address
        m = self.home_market
        held = self._held(plan, addr, m)
        if not held:
            at_risk = any((p := plan.slot(addr, m, s)) and p.size for s in (True, False))
            side = rng.random() < 0.5
            if at_risk:  # a slot the mark is about to close: trade another market meanwhile
                m = rng.choice(list(self.markets))
            self._open(plan, bot, profile, m, side, now_ms, kind="market")
            return
        pos = rng.choice(held)
        stale = self._stale_orders(plan, addr, now_ms, max_age_ms=15_000)
        if not plan.resting.get((addr, m)) or stale is not None:
            if stale is not None:
                plan.cancels.append(stale)
            # Replace in the same step: the cancel runs before the new order. When the position
            # is too big to add to, shrink it so the next step can rest an order.
            if not self._open(plan, bot, profile, m, pos.is_long, now_ms, kind="rest"):
                self._close(plan, pos, full=False)
            return
        roll = rng.random()
        if roll < 0.3:
            self._open(plan, bot, profile, m, pos.is_long, now_ms)
        elif roll < 0.6:
            self._close(plan, pos, full=False)
        elif roll < 0.85:
            self._manage(plan, pos)
        else:
            other = rng.choice(list(self.markets))
            held_there = self._held(plan, addr, other)
            if held_there and rng.random() < 0.6:
                self._close(plan, rng.choice(held_there), full=True)
            else:
                self._open(plan, bot, profile, other, rng.random() < 0.5, now_ms)

    def _stale_orders(
        self, plan: _Plan, address: str, now_ms: int, max_age_ms: int
    ) -> CancelOrders | None:
        """A cancel of the resting orders, in the first market that has any, that are old or far
        (over 1.5 %) from the mark."""
        for m in self.markets:
            mark = plan.marks[m]
            ids = tuple(
                o.order_id
                for o in plan.resting.get((address, m), [])
                if now_ms - o.created > max_age_ms or abs(o.price - mark) * 200 > mark * 3
            )
            if ids:
                return CancelOrders(address=address, market_id=m, order_ids=ids)
        return None

    def _micro(self, usd: float) -> int:
        """Quote units (USD) to collateral sub-units."""
        return round(usd * self.quote_unit)

    def _open(
        self,
        plan: _Plan,
        bot: _Bot,
        profile: _Profile,
        m: int,
        is_long: bool,
        now_ms: int,
        kind: str | None = None,
    ) -> bool:
        """Open or increase a position with a market, crossing IOC or resting limit order;
        False when the bot's limits or the book say not now."""
        rng = self.rng
        spec = self.markets[m]
        addr = bot.address
        mark = plan.marks[m]
        tick = spec.tick_size
        slot = plan.slot(addr, m, is_long)
        if slot is not None and slot.size and self._triggered(plan.engine, slot, mark):
            return False
        leverage = slot.leverage if slot is not None else rng.randint(*profile.leverage)
        if kind is None:
            roll = rng.random()
            resting = len(plan.resting.get((addr, m), []))
            if roll < profile.rest_prob and resting < 2:
                kind = "rest"
            elif roll < profile.rest_prob + profile.ioc_prob:
                kind = "ioc"
            else:
                kind = "market"
        sign = 1 if is_long else -1
        price: int | None = None
        if kind == "rest":
            # Passive, a little behind the touch, so it rests and shows in open_orders.
            at = mark * (1 - sign * rng.uniform(*profile.rest_offset))
            price = _floor_tick(at, tick) if is_long else _ceil_tick(at, tick)
        elif kind == "ioc":
            book = plan.engine.books[m]
            best = book.best_ask() if is_long else book.best_bid()
            base = mark if best is None else best
            price = max(tick, base + sign * 2 * self.grid[m])
        ref = mark if price is None else price
        size = self._lots(spec, ref, rng.uniform(*profile.notional))
        if slot is not None and slot.value + ref * size > self._micro(profile.max_notional):
            return False
        if kind == "market" and size > plan.depth[(m, is_long)]:
            return False
        # Budget at a price 1 % worse than the reference, for slippage on a market order.
        worst = ref * size * 101 // 100
        if not plan.spend(addr, _open_cost(spec, worst, leverage)):
            return False
        if kind == "market":
            plan.depth[(m, is_long)] -= size
        tp = sl = None
        if rng.random() < profile.tp_prob:
            tp_at = ref * (1 + sign * rng.uniform(0.005, 0.03))
            tp = _ceil_tick(tp_at, tick) if is_long else _floor_tick(tp_at, tick)
        if rng.random() < profile.sl_prob:
            # Between entry and the liquidation price, so the stop fires first.
            room = max(0.004, min(0.04, 1 / leverage - spec.maintenance_margin_bps / BPS))
            sl_at = ref * (1 - sign * room * rng.uniform(0.25, 0.7))
            sl = _floor_tick(sl_at, tick) if is_long else _ceil_tick(sl_at, tick)
        if ref in (tp, sl):
            tp = sl = None
        if price is None:
            plan.actions.append(
                PlaceMarketOrder(
                    address=addr,
                    market_id=m,
                    is_long=is_long,
                    is_close=False,
                    size=size,
                    leverage=leverage,
                    take_profit=tp,
                    stop_loss=sl,
                )
            )
            return True
        plan.actions.append(
            PlaceLimitOrder(
                address=addr,
                market_id=m,
                is_long=is_long,
                is_close=False,
                size=size,
                price=price,
                leverage=leverage,
                restriction=IMMEDIATE_OR_CANCEL if kind == "ioc" else 0,
                take_profit=tp,
                stop_loss=sl,
            )
        )
        return True

    def _close(self, plan: _Plan, pos: PositionState, full: bool) -> None:
        """Close all or part of what ``pos`` holds beyond its resting close orders."""
        spec = self.markets[pos.market_id]
        closable = pos.size - pos.pending_close
        if closable <= 0:
            return
        size = closable
        if not full:
            size = max(spec.min_lots, int(closable * self.rng.uniform(0.3, 0.7)))
            if size >= closable - spec.min_lots:
                size = closable
        m = pos.market_id
        taken_side = not pos.is_long  # closing a long sells into bids
        if size <= plan.depth[(m, taken_side)]:
            plan.depth[(m, taken_side)] -= size
            plan.actions.append(
                PlaceMarketOrder(
                    address=pos.address,
                    market_id=m,
                    is_long=pos.is_long,
                    is_close=True,
                    size=size,
                    leverage=pos.leverage,
                )
            )
            return
        # Too big for the book this step: an IOC close takes what is there without rejection.
        book = plan.engine.books[m]
        best = book.best_bid() if pos.is_long else book.best_ask()
        if best is None:
            return
        step = self.grid[m] * 2
        price = max(spec.tick_size, best - step if pos.is_long else best + step)
        plan.actions.append(
            PlaceLimitOrder(
                address=pos.address,
                market_id=m,
                is_long=pos.is_long,
                is_close=True,
                size=size,
                price=price,
                leverage=pos.leverage,
                restriction=IMMEDIATE_OR_CANCEL,
            )
        )

    def _manage(self, plan: _Plan, pos: PositionState) -> None:
        """Move the take-profit or stop-loss, or add margin."""
        rng = self.rng
        m = pos.market_id
        spec = self.markets[m]
        tick = spec.tick_size
        mark = plan.marks[m]
        roll = rng.random()
        if roll < 0.4:
            move = rng.uniform(0.004, 0.025)
            if pos.is_long:
                tp = _ceil_tick(mark * (1 + move), tick)
            else:
                tp = _floor_tick(mark * (1 - move), tick)
            if tp == mark:
                return
            plan.actions.append(
                UpdateTakeProfit(address=pos.address, market_id=m, is_long=pos.is_long, price=tp)
            )
        elif roll < 0.8:
            liq = plan.engine.liq_price(pos)
            # Somewhere between the liquidation price and the mark.
            at = mark - (mark - liq) * rng.uniform(0.2, 0.7)
            sl = _floor_tick(at, tick) if pos.is_long else _ceil_tick(at, tick)
            if sl == mark or (sl > mark) == pos.is_long:
                return
            plan.actions.append(
                UpdateStopLoss(address=pos.address, market_id=m, is_long=pos.is_long, price=sl)
            )
        else:
            amount = min(int(pos.margin * rng.uniform(0.2, 0.5)), plan.free(pos.address) // 2)
            if amount > 0:
                plan.actions.append(
                    AddMargin(address=pos.address, market_id=m, is_long=pos.is_long, amount=amount)
                )
