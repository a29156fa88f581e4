"""A price-time priority limit order book for one market (no I/O, no matching policy).

The book only stores resting orders by price level in arrival order; the engine decides what
matches. Levels keep their aggregated size so the ``orderbook`` topic is a cheap read.
"""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict


class Level:
    """Resting orders at one price, oldest first, with their total remaining size."""

    __slots__ = ("order_ids", "size")

    def __init__(self) -> None:
        self.order_ids: dict[int, int] = {}
        """order_id -> remaining lots, in time priority (dicts keep insertion order)."""
        self.size = 0


class Book:
    """Bids and asks of one market, each a sorted map of price to :class:`Level`."""

    __slots__ = ("asks", "bids", "market_id")

    def __init__(self, market_id: int) -> None:
        self.market_id = market_id
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()

    def best_bid(self) -> int | None:
        return self.bids.peekitem(-1)[0] if self.bids else None

    def best_ask(self) -> int | None:
        return self.asks.peekitem(0)[0] if self.asks else None

    def add(self, order_id: int, is_ask: bool, price: int, remaining: int) -> None:
        side = self.asks if is_ask else self.bids
        level = side.get(price)
        if level is None:
            level = side[price] = Level()
        level.order_ids[order_id] = remaining
        level.size += remaining

    def set_remaining(self, order_id: int, is_ask: bool, price: int, remaining: int) -> None:
        """Change a resting order's remaining size; 0 removes it (and an emptied level)."""
        side = self.asks if is_ask else self.bids
        level: Level = side[price]
        level.size += remaining - level.order_ids[order_id]
        if remaining:
            level.order_ids[order_id] = remaining
        else:
            del level.order_ids[order_id]
            if not level.order_ids:
                del side[price]

    def crossing_levels(self, taker_is_ask: bool, limit: int | None) -> Iterator[tuple[int, Level]]:
        """Levels a taker on the given side may trade with, best first, up to ``limit``."""
        if taker_is_ask:  # a seller meets bids from the highest down to the limit
            side = self.bids
            prices = side.irange(minimum=limit, reverse=True)
        else:  # a buyer meets asks from the lowest up to the limit
            side = self.asks
            prices = side.irange(maximum=limit)
        for price in prices:
            yield price, side[price]

    def would_cross(self, is_ask: bool, price: int) -> bool:
        if is_ask:
            best = self.best_bid()
            return best is not None and best >= price
        best = self.best_ask()
        return best is not None and best <= price

    def levels(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(asks ascending, bids descending)`` as ``(price, size)`` pairs."""
        asks = [(p, lvl.size) for p, lvl in self.asks.items()]
        bids = [(p, lvl.size) for p, lvl in reversed(self.bids.items())]
        return asks, bids

    def is_crossed(self) -> bool:
        bid, ask = self.best_bid(), self.best_ask()
        return bid is not None and ask is not None and bid >= ask
