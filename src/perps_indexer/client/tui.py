"""The terminal view of ``perps-indexer subscribe``: a table of rows refreshed in place, and the
order book as two columns of levels. A live topic's rows (one per message) pile up, newest
first. Rendering is pure (``render`` returns lines); the :class:`TerminalView` writes them with
ANSI cursor movements."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from perps_indexer.client.book import OrderBook
from perps_indexer.client.rows import BookLevel, Message
from perps_indexer.wire import (
    BEST_PRICE,
    DEPOSIT_WITHDRAW_HISTORY,
    LIVE_FUNDING_RATE,
    LIVE_ORDER_HISTORY,
    LIVE_TOPICS,
    LIVE_TRADE_HISTORY,
    OPEN_ORDERS,
    ORDER_HISTORY,
    ORDERBOOK,
    POSITIONS,
    RECENT_TRADES,
    TRADE_HISTORY,
)

ORDER_TYPES = {
    1: "open long",
    2: "open short",
    3: "incr long",
    4: "incr short",
    5: "decr long",
    6: "decr short",
    7: "close long",
    8: "close short",
    9: "SL long",
    10: "SL short",
    11: "TP long",
    12: "TP short",
    13: "liq long",
    14: "liq short",
}
"""Short names of the order_type codes (reference §4)."""


def _time(ts: int) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.gmtime(ts))


def _kind(code: int) -> str:
    return ORDER_TYPES.get(code, str(code))


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


Column = tuple[str, Callable[[Any], object]]

COLUMNS: dict[str, list[Column]] = {
    POSITIONS: [
        ("market", lambda r: r.market_id),
        ("side", lambda r: "LONG" if r.is_long else "SHORT"),
        ("size", lambda r: r.size),
        ("entry", lambda r: r.entry_price),
        ("liq", lambda r: r.liq_price),
        ("lev", lambda r: f"{r.leverage}x"),
        ("margin", lambda r: r.margin),
        ("value", lambda r: r.value),
        ("tp", lambda r: _opt(r.tp)),
        ("sl", lambda r: _opt(r.sl)),
        ("updated", lambda r: _time(r.last_updated)),
    ],
    TRADE_HISTORY: [
        ("time", lambda r: _time(r.timestamp)),
        ("market", lambda r: r.market_id),
        ("type", lambda r: _kind(r.order_type)),
        ("price", lambda r: r.price),
        ("size", lambda r: r.size),
        ("fee", lambda r: r.fee),
        ("pnl", lambda r: r.pnl),
        ("trade_id", lambda r: r.trade_id),
    ],
    OPEN_ORDERS: [
        ("time", lambda r: _time(r.timestamp)),
        ("market", lambda r: r.market_id),
        ("type", lambda r: _kind(r.order_type)),
        ("price", lambda r: r.price),
        ("remaining", lambda r: r.remaining_size),
        ("total", lambda r: r.total_size),
        ("lev", lambda r: f"{r.leverage}x"),
        ("order_id", lambda r: r.order_id),
    ],
    ORDER_HISTORY: [
        ("updated", lambda r: _time(r.last_updated)),
        ("market", lambda r: r.market_id),
        ("type", lambda r: _kind(r.order_type)),
        ("status", lambda r: r.status),
        ("price", lambda r: "market" if r.is_market_order else r.price),
        ("size", lambda r: r.size),
        ("lev", lambda r: f"{r.leverage}x"),
        ("order_id", lambda r: r.order_id),
    ],
    RECENT_TRADES: [
        ("time", lambda r: _time(r.timestamp)),
        ("side", lambda r: "BUY" if r.is_buy else "SELL"),
        ("price", lambda r: r.price),
        ("size", lambda r: r.size),
        ("version", lambda r: r.transaction_version),
    ],
    BEST_PRICE: [
        ("bid size", lambda r: _opt(r.best_bid_size)),
        ("bid", lambda r: _opt(r.best_bid_price)),
        ("ask", lambda r: _opt(r.best_ask_price)),
        ("ask size", lambda r: _opt(r.best_ask_size)),
        ("updated", lambda r: _time(r.last_updated)),
    ],
    DEPOSIT_WITHDRAW_HISTORY: [
        ("time", lambda r: _time(r.timestamp)),
        ("kind", lambda r: "deposit" if r.is_deposit else "withdraw"),
        ("amount", lambda r: r.amount),
        ("version", lambda r: r.transaction_version),
    ],
    LIVE_FUNDING_RATE: [
        ("rate", lambda r: r.funding_rate),
        ("mark", lambda r: _opt(r.mark_price)),
        ("index", lambda r: _opt(r.index_price)),
        ("next funding", lambda r: _time(r.next_funding_time)),
        ("updated", lambda r: _time(r.last_updated)),
    ],
}
COLUMNS[LIVE_TRADE_HISTORY] = COLUMNS[TRADE_HISTORY]
COLUMNS[LIVE_ORDER_HISTORY] = COLUMNS[ORDER_HISTORY]

LIVE_ROWS = 200
"""Rows of a live topic the terminal view keeps (newest first)."""


def table(rows: Sequence[Any], columns: list[Column]) -> list[str]:
    """Rows as aligned text columns (numbers right-aligned), header first."""
    cells = [[str(get(row)) for _, get in columns] for row in rows]
    widths = [max([len(name), *(len(c[i]) for c in cells)]) for i, (name, _) in enumerate(columns)]
    lines = ["  ".join(name.rjust(w) for (name, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return lines


def _field(key: str) -> Callable[[Any], object]:
    return lambda row: _opt(row.get(key))


def _dict_columns(rows: Sequence[Any]) -> list[Column]:
    """Columns for rows of a topic this client has no type for (plain dicts)."""
    keys = list(rows[0]) if rows and isinstance(rows[0], dict) else []
    return [(key, _field(key)) for key in keys]


def book_lines(levels: Sequence[BookLevel], depth: int) -> list[str]:
    """The book as two columns: bids (best first) on the left, asks on the right."""
    book = OrderBook(0, levels)
    bid, ask, spread = book.best_bid(), book.best_ask(), book.spread()
    lines = [
        f"best bid {bid.price if bid else '-'}   best ask {ask.price if ask else '-'}   "
        f"spread {_opt(spread)}",
        "",
        f"{'BID SIZE':>12} {'BID':>10}  |  {'ASK':<10} {'ASK SIZE':<12}",
    ]
    for i in range(min(depth, max(len(book.bids), len(book.asks)))):
        b = book.bids[i] if i < len(book.bids) else None
        a = book.asks[i] if i < len(book.asks) else None
        left = f"{b.size:>12} {b.price:>10}" if b else " " * 23
        right = f"{a.price:<10} {a.size:<12}" if a else ""
        lines.append(f"{left}  |  {right}".rstrip())
    if not book.bids and not book.asks:
        lines.append("(the book is empty)")
    return lines


def render(
    title: str, status: str, message: Message[Any] | None, width: int, height: int
) -> list[str]:
    """The whole screen: a title, a status line, then the rows (cut to fit)."""
    lines = [title, status, ""]
    room = max(1, height - len(lines) - 1)
    if message is None:
        lines.append("waiting for the first message...")
    elif message.topic == ORDERBOOK:
        lines += book_lines(message.rows, depth=max(1, room - 3))
    elif not message.rows:
        lines.append("(no rows)")
    else:
        columns = COLUMNS.get(message.topic) or _dict_columns(message.rows)
        body = table(message.rows, columns)
        if len(body) > room:
            hidden = len(body) - room + 1
            body = [*body[: room - 1], f"... {hidden} more row(s)"]
        lines += body
    return [line[:width] for line in lines[: max(1, height - 1)]]


class TerminalView:
    """Redraws the screen in place (ANSI); call ``close()`` to restore the cursor."""

    def __init__(self, out: IO[str], title: str) -> None:
        self.out = out
        self.title = title
        self.status = "connecting"
        self.message: Message[Any] | None = None
        self.count = 0
        self.live_rows: tuple[Any, ...] = ()
        out.write("\x1b[?25l\x1b[2J")  # hide the cursor, clear the screen
        out.flush()

    def update(self, message: Message[Any]) -> None:
        if message.topic in LIVE_TOPICS:
            # Each message is one event: show them piled up, newest first. A resume brings
            # every row missed (newest first); a snapshot that is not a resume starts afresh.
            new = message.resumed if message.resumed is not None else message.rows
            kept = () if message.snapshot and message.resumed is None else self.live_rows
            self.live_rows = (*new, *kept)[:LIVE_ROWS]
            message = dataclasses.replace(message, rows=self.live_rows)
        self.message = message
        self.count += 1

    def draw(self) -> None:
        size = shutil.get_terminal_size((100, 30))
        status = f"{self.status} | {self.count} message(s)"
        if self.message is not None:
            status += (
                f" | last {time.strftime('%H:%M:%S', time.localtime(self.message.received_at))}"
            )
            if self.message.seq is not None:
                status += f" | seq {self.message.seq}"
        lines = render(self.title, status, self.message, size.columns, size.lines)
        self.out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
        self.out.flush()

    def close(self) -> None:
        self.out.write("\x1b[?25h")
        self.out.flush()
