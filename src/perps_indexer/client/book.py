"""A local order book per market, kept from ``orderbook`` messages.

Every ``orderbook`` message carries all levels of its market, so applying one replaces the
book: there is no delta to lose and a snapshot after a reconnect needs no special case.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from perps_indexer.client.rows import BookLevel, Message
from perps_indexer.wire import ORDERBOOK


class OrderBook:
    """One market's levels, best first on each side."""

    __slots__ = ("asks", "bids", "market_id", "seq")

    def __init__(self, market_id: int, levels: Iterable[BookLevel] = ()) -> None:
        self.market_id = market_id
        self.bids: tuple[BookLevel, ...] = ()
        """Bids, highest price first."""
        self.asks: tuple[BookLevel, ...] = ()
        """Asks, lowest price first."""
        self.seq: int | None = None
        self.replace(levels)

    def replace(self, levels: Iterable[BookLevel]) -> None:
        """Make ``levels`` the whole book."""
        levels = list(levels)
        self.bids = tuple(sorted((lv for lv in levels if not lv.is_ask), key=lambda lv: -lv.price))
        self.asks = tuple(sorted((lv for lv in levels if lv.is_ask), key=lambda lv: lv.price))

    def best_bid(self) -> BookLevel | None:
        return self.bids[0] if self.bids else None

    def best_ask(self) -> BookLevel | None:
        return self.asks[0] if self.asks else None

    def spread(self) -> int | None:
        """Best ask minus best bid, in ticks; None when a side is empty."""
        bid, ask = self.best_bid(), self.best_ask()
        return None if bid is None or ask is None else ask.price - bid.price

    def size_at(self, price: int) -> int:
        """Size resting at exactly ``price`` (either side), 0 if no level."""
        for level in (*self.bids, *self.asks):
            if level.price == price:
                return level.size
        return 0

    def depth(self, price: int, *, is_ask: bool) -> int:
        """Cumulative size on one side from the best level through ``price``: what a buyer
        paying up to ``price`` (``is_ask=True``) or a seller down to it could take."""
        if is_ask:
            return sum(lv.size for lv in self.asks if lv.price <= price)
        return sum(lv.size for lv in self.bids if lv.price >= price)

    def __repr__(self) -> str:
        return (
            f"OrderBook(market_id={self.market_id}, bid={self.best_bid()}, "
            f"ask={self.best_ask()}, levels={len(self.bids) + len(self.asks)})"
        )


class OrderBooks:
    """Books for several markets, fed with ``orderbook`` messages: ``books.apply(message)``."""

    def __init__(self) -> None:
        self.books: dict[int, OrderBook] = {}

    def apply(self, message: Message[Any]) -> OrderBook:
        """Replace the book of the message's market; returns it."""
        if message.topic != ORDERBOOK:
            raise ValueError(f"not an orderbook message: {message.topic!r}")
        # The subscription names the market even when the book (and so the message) is empty.
        market = int(str(message.subscription.market_id))
        book = self.books.get(market)
        if book is None:
            book = self.books[market] = OrderBook(market)
        book.replace(message.rows)
        book.seq = message.seq
        return book

    def __getitem__(self, market_id: int) -> OrderBook:
        return self.books[market_id]

    def get(self, market_id: int) -> OrderBook | None:
        return self.books.get(market_id)
