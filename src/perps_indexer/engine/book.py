"""A price-time priority limit order book for one market (no I/O, no matching policy).

The book only stores resting orders by price level in arrival order; the engine decides what
matches. Levels keep their aggregated size so the ``orderbook`` topic is a cheap read.

Each side is a dict of price to :class:`Level` plus a sorted list of its prices, kept with
:mod:`bisect`. A new or emptied level costs a binary search and a memmove of the price list,
which for books of up to tens of thousands of levels is several times cheaper than a balanced
tree written in Python; the best price is the list's first or last item.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator


class Level:
    """Resting orders at one price, oldest first, with their total remaining size."""

    __slots__ = ("order_ids", "size")

    def __init__(self) -> None:
        self.order_ids: dict[int, int] = {}
        """order_id -> remaining lots, in time priority (dicts keep insertion order)."""
        self.size = 0


class Book:
    """Bids and asks of one market: ``price -> Level`` maps with their prices kept sorted."""

    __slots__ = ("_ask_prices", "_bid_prices", "asks", "bids", "market_id")

    def __init__(self, market_id: int) -> None:
        self.market_id = market_id
        self.bids: dict[int, Level] = {}
        self.asks: dict[int, Level] = {}
        self._bid_prices: list[int] = []
        """Bid prices, ascending (the best bid is the last)."""
        self._ask_prices: list[int] = []
        """Ask prices, ascending (the best ask is the first)."""

    def best_bid(self) -> int | None:
        return self._bid_prices[-1] if self._bid_prices else None

    def best_ask(self) -> int | None:
        return self._ask_prices[0] if self._ask_prices else None

    def add(self, order_id: int, is_ask: bool, price: int, remaining: int) -> None:
        side = self.asks if is_ask else self.bids
        level = side.get(price)
        if level is None:
            level = side[price] = Level()
            insort(self._ask_prices if is_ask else self._bid_prices, price)
        level.order_ids[order_id] = remaining
        level.size += remaining

    def set_remaining(self, order_id: int, is_ask: bool, price: int, remaining: int) -> None:
        """Change a resting order's remaining size; 0 removes it (and an emptied level)."""
        side = self.asks if is_ask else self.bids
        level = side[price]
        level.size += remaining - level.order_ids[order_id]
        if remaining:
            level.order_ids[order_id] = remaining
        else:
            del level.order_ids[order_id]
            if not level.order_ids:
                del side[price]
                prices = self._ask_prices if is_ask else self._bid_prices
                del prices[bisect_left(prices, price)]

    def crossing_levels(self, taker_is_ask: bool, limit: int | None) -> Iterator[tuple[int, Level]]:
        """Levels a taker on the given side may trade with, best first, up to ``limit``.

        The book must not change while the iterator is in use."""
        if taker_is_ask:  # a seller meets bids from the highest down to the limit
            side = self.bids
            for price in reversed(self._bid_prices):
                if limit is not None and price < limit:
                    return
                yield price, side[price]
        else:  # a buyer meets asks from the lowest up to the limit
            side = self.asks
            for price in self._ask_prices:
                if limit is not None and price > limit:
                    return
                yield price, side[price]

    def would_cross(self, is_ask: bool, price: int) -> bool:
        if is_ask:
            best = self.best_bid()
            return best is not None and best >= price
        best = self.best_ask()
        return best is not None and best <= price

    def side_levels(self, is_ask: bool) -> list[tuple[int, Level]]:
        """One side's levels in priority order: asks ascending, bids descending."""
        if is_ask:
            return [(p, self.asks[p]) for p in self._ask_prices]
        return [(p, self.bids[p]) for p in reversed(self._bid_prices)]

    def levels(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(asks ascending, bids descending)`` as ``(price, size)`` pairs."""
        asks = [(p, self.asks[p].size) for p in self._ask_prices]
        bids = [(p, self.bids[p].size) for p in reversed(self._bid_prices)]
        return asks, bids

    def is_crossed(self) -> bool:
        bid, ask = self.best_bid(), self.best_ask()
        return bid is not None and ask is not None and bid >= ask
